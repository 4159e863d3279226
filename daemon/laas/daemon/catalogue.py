"""The model catalogue: which models exist and how each is served, built from the settings and the store.

Layer: application (pure: no I/O but listing the store's ONNX packages). A catalogue is a frozen value:
the configured [[models]], every ONNX package in the store that no table names (the folder is the name),
and the default model (fetched into the store on first load when it is the built-in one and not
configured). Reloading the settings builds a new catalogue; :func:`diff` says what changed, and the
registry applies that to the models it has (residency.py holds what changes at run time).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from laas.core.errors import NotFound
from laas.daemon.backends.loader import backend_for
from laas.daemon.onnx_package import find_packages
from laas.daemon.settings import DEFAULT_MODEL_NAME, ModelConfig, Settings
from laas.daemon.store import DEFAULT_MODEL, ModelStore

AUTO_PARALLEL_MAX = 4  # sequences `parallel = 0` gives a model at most (as llama-server's automatic -np)


def auto_parallel(one_bytes: int, kv_bytes_per_sequence: int, budget_bytes: int) -> int:
    """`parallel = 0`: up to AUTO_PARALLEL_MAX sequences, as many as fit their KV cache (a full context each)
    in a quarter of the memory budget while the whole model (`one_bytes` with one sequence) still fits
    it, so a large model on a small device stays at 1 or 2; 1 for a model that keeps no KV cache per
    sequence (it does not batch)."""
    if kv_bytes_per_sequence <= 0:
        return 1
    for parallel in range(AUTO_PARALLEL_MAX, 1, -1):
        kv = parallel * kv_bytes_per_sequence
        if kv <= budget_bytes // 4 and one_bytes + kv - kv_bytes_per_sequence <= budget_bytes:
            return parallel
    return 1


@dataclass(frozen=True, slots=True)
class ModelDefaults:
    """The daemon-wide values a [[models]] table may override (restart-only settings)."""

    max_queue: int = 8
    parallel: int = 0  # 0: automatic, resolved when the model is described (auto_parallel)
    keep_alive_s: float = 300.0
    threads: int = 1
    flash_attn: str = "auto"
    speculation: str = "ngram"
    speculation_draft_min: int = 0

    @staticmethod
    def of(settings: Settings) -> ModelDefaults:
        return ModelDefaults(settings.max_queue, settings.parallel, settings.keep_alive_s, settings.threads,
                             settings.flash_attn, settings.speculation, settings.speculation_draft_min)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model as the catalogue knows it: its config as written, the daemon's defaults resolved."""

    config: ModelConfig
    max_queue: int
    parallel: int  # 0: automatic (the entry holds the value in force)
    keep_alive_s: float  # the model's idle seconds before unloading (< 0 never, 0 at once)
    threads: int
    flash_attn: str
    speculation: str
    speculation_draft_min: int
    fetch: bool = False  # the built-in default model: fetched into the store when missing

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def load_config(self) -> ModelConfig:
        """The config a backend describes and loads with: the daemon's parallel (0: automatic, which the
        entry resolves: ModelEntry.load_config), flash attention and speculation resolved."""
        return self.config.model_copy(update={"parallel": self.parallel,
                                              "flash_attn": self.config.flash_attn or self.flash_attn,
                                              "speculation": self.config.speculation
                                              or ("draft" if self.config.speculation_draft else self.speculation),
                                              "speculation_draft_min": self.speculation_draft_min
                                              if self.config.speculation_draft_min is None
                                              else self.config.speculation_draft_min})

    @staticmethod
    def of(config: ModelConfig, defaults: ModelDefaults, fetch: bool = False) -> ModelSpec:
        backend_for(config)  # an unknown format fails the catalogue, naming the field
        return ModelSpec(
            config,
            defaults.max_queue if config.max_queue is None else config.max_queue,
            defaults.parallel if config.parallel is None else config.parallel,
            defaults.keep_alive_s if config.keep_alive_s is None else config.keep_alive_s,
            config.threads or defaults.threads, defaults.flash_attn, defaults.speculation,
            defaults.speculation_draft_min, fetch)


@dataclass(frozen=True, slots=True)
class Catalogue:
    models: Mapping[str, ModelSpec]
    default: str

    @staticmethod
    def build(models: tuple[ModelConfig, ...], default_model: str, defaults: ModelDefaults, store: ModelStore
              ) -> Catalogue:
        """Raises NotFound for a default model that is neither configured nor the built-in one."""
        specs = {c.name: ModelSpec.of(c, defaults) for c in models}
        configured = {Path(c.path).parts[0] for c in models if Path(c.path).parts}
        for folder in find_packages(store.root):  # nothing is parsed: a broken package fails at load, visibly
            if folder.name not in specs and folder.name not in configured:
                specs[folder.name] = ModelSpec.of(ModelConfig(name=folder.name, path=folder.name, format="onnx"),
                                                  defaults)
        if default_model not in specs:
            if default_model != DEFAULT_MODEL_NAME:
                raise NotFound(f"default_model {default_model!r} is not among the configured models",
                               field="default_model")
            builtin = ModelConfig(name=DEFAULT_MODEL_NAME, path=DEFAULT_MODEL.filename, context_length=4096)
            specs[builtin.name] = ModelSpec.of(builtin, defaults, fetch=True)
        return Catalogue(MappingProxyType(specs), default_model)


@dataclass(frozen=True, slots=True)
class CatalogueDiff:
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    kept: tuple[str, ...] = field(default=())  # the same spec in both

    def as_dict(self) -> dict[str, list[str]]:
        return {"added": list(self.added), "changed": list(self.changed), "removed": list(self.removed)}


def diff(old: Catalogue, new: Catalogue) -> CatalogueDiff:
    """What a reload changes: models only in `new`, in both with another spec, only in `old`, unchanged."""
    both = set(old.models) & set(new.models)
    return CatalogueDiff(
        added=tuple(sorted(set(new.models) - set(old.models))),
        changed=tuple(sorted(n for n in both if old.models[n] != new.models[n])),
        removed=tuple(sorted(set(old.models) - set(new.models))),
        kept=tuple(sorted(n for n in both if old.models[n] == new.models[n])))
