"""A model's residency: whether it is loaded, and everything about that which changes at run time.

Layer: application (asyncio only). :class:`Residency` is a small state machine; each transition replaces
its frozen :class:`Residence` (the state at one moment), so a reader holds a value that cannot change
under it. The registry drives the transitions (describe, load, unload, a use ending); the tasks it runs
for a model (the shared load, the keep-alive timer) are held here, beside the state they change.

    NOT_LOADED --start_loading--> LOADING --loaded--> READY --unloaded--> NOT_LOADED
    LOADING --not_loaded (over the budget, cancelled)--> NOT_LOADED
    NOT_LOADED | LOADING --failed--> FAILED   (until a reload)
    LOADING | READY --crashed (its runner died)--> FAILED, retried by the next request after a backoff;
        after `max_crashes` deaths in a row with no request served between: until a reload or a file change
"""

from __future__ import annotations

import asyncio
import enum
import os
from dataclasses import dataclass, replace
from pathlib import Path

from laas.core.engine import Engine
from laas.core.types import ModelInfo


class ModelState(enum.Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Residence:
    """A model's residency at one moment."""

    keep_alive_s: float  # idle seconds before unloading (the last use's; < 0: never)
    state: ModelState = ModelState.NOT_LOADED
    error: str = ""
    engine: Engine | None = None
    described: ModelInfo | None = None  # from the file's metadata, known before (and after) a load
    size_bytes: int = 0
    fetching: bool = False  # the file is being downloaded now (requests get UNAVAILABLE meanwhile)
    memory_bytes: int = 0  # estimated resident bytes while loading or loaded; 0 otherwise
    last_used: float = 0.0  # monotonic: when the last request (or pin) left
    last_used_wall: float = 0.0
    expires_at: float | None = None  # monotonic: when the idle model unloads; None: not scheduled
    unload_when_idle: bool = False  # UnloadModel on a busy model: unload as soon as its streams end
    load_ms: float = 0.0  # how long the last load took (the router adds it for a model not loaded)
    pins: int = 0  # holders that are not queued requests (Tokenize, LoadModel, the router counting)
    crashes: int = 0  # runner deaths in a row with no request served between
    retry: bool = False  # FAILED by a runner's death: the next request starts it again (after restart_at)
    restart_at: float = 0.0  # monotonic: the earliest restart after a death (the backoff)
    crashed_file: FileSignature | None = None  # the model's file when its runner died last

    @property
    def info(self) -> ModelInfo | None:
        """What the engine says of the model, or, while it is not loaded, what its file's metadata says."""
        return self.engine.info if self.engine is not None else self.described

    @property
    def idle_keep_alive_s(self) -> float:
        """Seconds it stays loaded once idle: 0 when UnloadModel asked for it, else the last use's keep-alive."""
        return 0.0 if self.unload_when_idle else self.keep_alive_s


FileSignature = tuple[str, int, int]  # path, mtime_ns, size


def file_signature(path: Path | str) -> FileSignature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return str(path), st.st_mtime_ns, st.st_size


class Residency:
    def __init__(self, keep_alive_s: float) -> None:
        self._now = Residence(keep_alive_s)
        self.loading: asyncio.Task[None] | None = None  # the load in progress, shared by its waiters
        self._expiry: asyncio.Task[None] | None = None  # the idle unload's timer

    @property
    def now(self) -> Residence:
        return self._now

    def _set(self, **changes: object) -> None:
        self._now = replace(self._now, **changes)  # type: ignore[arg-type]

    # -- describing and loading ---------------------------------------------------------------------

    def described(self, info: ModelInfo) -> None:
        self._set(described=info, size_bytes=info.size_bytes)

    def start_loading(self) -> None:
        self._set(state=ModelState.LOADING, error="", retry=False)

    def fetching(self, now: bool) -> None:
        self._set(fetching=now)

    def reserve(self, memory_bytes: int) -> None:
        """The load's estimate: counted against the memory budget from now on."""
        self._set(memory_bytes=memory_bytes)

    def loaded(self, engine: Engine, load_ms: float) -> None:
        self._set(state=ModelState.READY, engine=engine, size_bytes=engine.info.size_bytes, load_ms=load_ms)

    def not_loaded(self) -> None:
        """A load that did not happen (over the budget, cancelled): loadable again later."""
        self._set(state=ModelState.NOT_LOADED, memory_bytes=0)

    def failed(self, error: str) -> None:
        """The model cannot be served (until a reload): requests get `error`."""
        self._set(state=ModelState.FAILED, error=error, memory_bytes=0, retry=False, crashed_file=None)

    def crashed(self, error: str, *, now: float, backoff_s: float, max_crashes: int, file: FileSignature | None
                ) -> Engine | None:
        """The runner died (loading or loaded): FAILED with the cause; the next request retries after the
        backoff (doubled for each death in a row), unless the model has died `max_crashes` times in a row on
        the same file. Returns the dead engine to close, if one was loaded."""
        now_ = self._now
        crashes = now_.crashes + 1 if now_.crashed_file in (None, file) else 1
        engine = self.unloaded()
        self._set(state=ModelState.FAILED, error=error, crashes=crashes, retry=crashes < max_crashes,
                  restart_at=now + backoff_s * 2 ** (crashes - 1), crashed_file=file)
        return engine

    def served(self) -> None:
        """A request completed: the runner deaths before it no longer count as a crash loop."""
        if self._now.crashes:
            self._set(crashes=0, crashed_file=None)

    def unloaded(self) -> Engine | None:
        """READY -> NOT_LOADED: returns the engine to close (None if none was loaded), stops the timer."""
        engine = self._now.engine
        self._set(engine=None, state=ModelState.NOT_LOADED, memory_bytes=0, expires_at=None,
                  unload_when_idle=False)
        if self._expiry is not None and self._expiry is not asyncio.current_task():
            self._expiry.cancel()
        self._expiry = None
        return engine

    # -- uses -----------------------------------------------------------------------------------------

    def pin(self) -> None:
        self._set(pins=self._now.pins + 1)

    def unpin(self) -> None:
        self._set(pins=self._now.pins - 1)

    def unload_when_idle(self) -> None:
        self._set(unload_when_idle=True)

    def used(self, monotonic: float, wall: float, keep_alive_s: float) -> None:
        """A use ended: its keep-alive is the model's from now on; the old timer, if any, stops."""
        self._set(last_used=monotonic, last_used_wall=wall, keep_alive_s=keep_alive_s)

    def arm(self, expires_at: float | None, timer: asyncio.Task[None] | None) -> None:
        """The idle unload's deadline and the task that waits for it (None, None: never unloads)."""
        if self._expiry is not None and self._expiry is not timer:
            self._expiry.cancel()
        self._expiry = timer
        self._set(expires_at=expires_at)
