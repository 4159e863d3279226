"""The model catalogue is a frozen value built from the settings and the store; a reload is a diff of two."""

from __future__ import annotations

from pathlib import Path

import pytest

from laas.core.errors import NotFound
from laas.daemon.catalogue import AUTO_PARALLEL_MAX, Catalogue, ModelDefaults, auto_parallel, diff
from laas.daemon.residency import ModelState, Residency
from laas.daemon.settings import DEFAULT_MODEL_NAME, ModelConfig
from laas.daemon.store import ModelStore

DEFAULTS = ModelDefaults(max_queue=8, parallel=2, keep_alive_s=300.0, threads=4)


def _catalogue(store: ModelStore, *models: ModelConfig, default: str = DEFAULT_MODEL_NAME) -> Catalogue:
    return Catalogue.build(models, default, DEFAULTS, store)


def test_defaults_resolve_and_the_builtin_default_is_fetched(tmp_path: Path) -> None:
    cat = _catalogue(ModelStore(tmp_path), ModelConfig(name="a", path="a.gguf", parallel=1, keep_alive_s=-1))
    a, builtin = cat.models["a"], cat.models[DEFAULT_MODEL_NAME]
    assert (a.parallel, a.max_queue, a.keep_alive_s, a.threads, a.fetch) == (1, 8, -1, 4, False)
    assert builtin.fetch and builtin.parallel == 2 and cat.default == DEFAULT_MODEL_NAME
    assert a.load_config.flash_attn == "auto" and a.config.flash_attn is None  # the config stays as written


def test_parallel_is_automatic_by_default_and_resolved_from_the_kv_cache_and_the_budget() -> None:
    assert ModelDefaults().parallel == 0  # automatic unless configured
    mib = 1 << 20
    assert auto_parallel(190 * mib, 94 * mib, 18_000 * mib) == AUTO_PARALLEL_MAX == 4  # the default model here
    assert auto_parallel(6_000 * mib, 1024 * mib, 12_000 * mib) == 2  # an 8B model, 8k context, 16 GB laptop
    assert auto_parallel(6_000 * mib, 1024 * mib, 6_500 * mib) == 1  # ... on a small board: never 0
    assert auto_parallel(1_000 * mib, 100 * mib, 1_150 * mib) == 2  # a quarter allows 2 (2.9)
    assert auto_parallel(900 * mib, 50 * mib, 1_000 * mib) == 3  # a quarter allows 4, but only 3 fit
    assert auto_parallel(100 * mib, 0, 18_000 * mib) == 1  # no KV cache per sequence: the engine does not batch


def test_an_unknown_default_or_format_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        _catalogue(ModelStore(tmp_path), default="nope")
    assert info.value.field == "default_model"
    with pytest.raises(NotFound) as info:
        _catalogue(ModelStore(tmp_path), ModelConfig.model_construct(name="x", path="x.bin", format="safetensors"))
    assert info.value.field == "models.x.format"


def test_a_reload_is_the_diff_of_two_catalogues(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    a, b, c = (ModelConfig(name=n, path=f"{n}.gguf") for n in "abc")
    old = _catalogue(store, a, b, default="a")
    new = _catalogue(store, a, ModelConfig(name="b", path="b.gguf", context_length=512), c, default="c")
    change = diff(old, new)
    assert change.as_dict() == {"added": ["c"], "changed": ["b"], "removed": []}
    assert diff(new, _catalogue(store, a)).removed == ("b", "c")  # the built-in default comes back instead
    assert "a" in change.kept and diff(new, new).as_dict() == {"added": [], "changed": [], "removed": []}


def test_residency_transitions_replace_a_frozen_value(tmp_path: Path) -> None:
    residency = Residency(keep_alive_s=5.0)
    before = residency.now
    residency.start_loading()
    residency.reserve(1000)
    residency.failed("broken")
    assert before.state is ModelState.NOT_LOADED and before.memory_bytes == 0  # a reader's value never changes
    now = residency.now
    assert (now.state, now.error, now.memory_bytes) == (ModelState.FAILED, "broken", 0)
    with pytest.raises(AttributeError):
        now.state = ModelState.READY  # type: ignore[misc]


def test_a_draft_model_turns_on_draft_speculation_unless_the_model_says_otherwise(tmp_path: Path) -> None:
    cat = _catalogue(ModelStore(tmp_path), ModelConfig(name="a", path="a.gguf", speculation_draft="small.gguf"),
                     ModelConfig(name="b", path="a.gguf", speculation_draft="small.gguf", speculation="off"),
                     ModelConfig(name="c", path="a.gguf"))
    assert cat.models["a"].load_config.speculation == "draft" and cat.models["a"].config.speculation is None
    assert cat.models["b"].load_config.speculation == "off"
    assert cat.models["c"].load_config.speculation == "ngram"  # the daemon's default
