"""One model the daemon serves: its configuration, queue, state, engine and residency.

Layer: application (asyncio only). The registry owns the entries; the router, the servicer, the
metrics and the liveness check read them.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from laas.core.engine import Engine
from laas.core.errors import ModelLoadError, ModelLoading
from laas.core.types import ModelInfo
from laas.daemon.gguf_header import GgufHeader
from laas.daemon.queueing import ModelQueue
from laas.daemon.settings import ModelConfig


class ModelState(enum.Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(eq=False)
class ModelEntry:
    config: ModelConfig
    queue: ModelQueue
    keep_alive_s: float = 300.0  # idle seconds before unloading (the last use's; < 0: never)
    is_default: bool = False
    state: ModelState = ModelState.NOT_LOADED
    error: str = ""
    engine: Engine | None = None
    header: GgufHeader | None = None
    described: ModelInfo | None = None  # from the file's metadata, known before (and after) a load
    size_bytes: int = 0
    fetch: bool = False  # fetch the default model into the store when missing
    fetching: bool = False  # the file is being downloaded now (requests get UNAVAILABLE meanwhile)
    # -- residency (registry.py) --
    memory_bytes: int = 0  # estimated resident bytes while loading or loaded; 0 otherwise
    last_used: float = 0.0  # monotonic: when the last request (or pin) left
    last_used_wall: float = 0.0
    expires_at: float | None = None  # monotonic: when the idle model unloads; None: not scheduled
    unload_when_idle: bool = False  # UnloadModel on a busy model: unload as soon as its streams end
    load_ms: float = 0.0  # how long the last load took (the router adds it for a model not loaded)
    pins: int = 0  # holders that are not queued requests (Tokenize, LoadModel)
    expiry: asyncio.Task[None] | None = field(default=None, repr=False)  # the idle unload's timer
    loading: asyncio.Task[None] | None = field(default=None, repr=False)  # the load in progress, shared

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def busy(self) -> bool:
        """A request runs or waits on the model, or something holds it: never unloaded then."""
        return bool(self.queue.active or self.queue.waiting or self.pins)

    @property
    def idle_keep_alive_s(self) -> float:
        """Seconds it stays loaded once idle: 0 when UnloadModel asked for it, else the last use's keep-alive."""
        return 0.0 if self.unload_when_idle else self.keep_alive_s

    @property
    def servable(self) -> bool:
        """Whether a request may be sent here now: loaded, or loadable on demand (not failed, not fetching)."""
        return self.state is not ModelState.FAILED and not self.fetching

    def check_servable(self) -> None:
        """Raises the error a request to this model gets now, if any; a model not loaded loads on use."""
        if self.state is ModelState.FAILED:
            raise ModelLoadError(f"model {self.name!r} failed to load: {self.error}")
        if self.fetching:
            raise ModelLoading(f"model {self.name!r} is loading (its file is being fetched); retry shortly")

    def ready_engine(self) -> Engine:
        """The engine when loaded, or the error a request that cannot wait for a load gets now."""
        if self.state is ModelState.READY and self.engine is not None:
            return self.engine
        self.check_servable()
        raise ModelLoading(f"model {self.name!r} is {self.state.value.replace('_', ' ')}; retry shortly")

    @property
    def info(self) -> ModelInfo | None:
        """What the engine says of the model, or, while it is not loaded, what its file's metadata says."""
        return self.engine.info if self.engine is not None else self.described
