"""One model the daemon serves: its catalogue spec, its queue and its residency, read through one face.

Layer: application (asyncio only). The registry makes the entries and changes them only through the
residency's transitions (residency.py); everything else reads: the router, the servicer, the metrics and
the liveness check. :meth:`ModelEntry.snapshot` is the frozen view of the whole entry at one moment; the
properties below read the current one.
"""

from __future__ import annotations

from dataclasses import dataclass

from laas.core.engine import Engine
from laas.core.errors import ModelLoadError, ModelLoading
from laas.core.types import ModelInfo
from laas.daemon.catalogue import ModelSpec
from laas.daemon.queueing import ModelQueue
from laas.daemon.residency import ModelState, Residence, Residency, file_signature
from laas.daemon.settings import ModelConfig

__all__ = ["ModelEntry", "ModelSnapshot", "ModelState"]


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """A model at one moment: what the catalogue says, its queue's counts, and its residency."""

    spec: ModelSpec
    is_default: bool
    active: int
    waiting: int
    residence: Residence

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting or self.residence.pins)


class ModelEntry:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.queue = ModelQueue(spec.name, spec.max_queue, spec.parallel or 1)  # automatic: 1 until described
        self.residency = Residency(spec.keep_alive_s)
        self._default = False

    def __repr__(self) -> str:
        return f"ModelEntry({self.name!r}, {self.state.value})"

    def snapshot(self) -> ModelSnapshot:
        return ModelSnapshot(self.spec, self._default, self.queue.active, self.queue.waiting, self.residency.now)

    @property
    def parallel(self) -> int:
        """Requests the model decodes at once: the value in force (an automatic one once described)."""
        return self.queue.parallel

    def resolve_parallel(self, parallel: int) -> None:  # the registry's, when it describes the model
        self.queue.widen(parallel)

    @property
    def load_config(self) -> ModelConfig:
        """The config the backend describes and loads with, with the parallel in force."""
        return self.spec.load_config.model_copy(update={"parallel": self.parallel})

    def set_default(self, is_default: bool) -> None:  # the registry's: a reload may move the default
        self._default = is_default

    # -- the read API (the current residence) ---------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def config(self) -> ModelConfig:
        return self.spec.config

    @property
    def fetch(self) -> bool:
        return self.spec.fetch

    @property
    def is_default(self) -> bool:
        return self._default

    @property
    def state(self) -> ModelState:
        return self.residency.now.state

    @property
    def error(self) -> str:
        return self.residency.now.error

    @property
    def engine(self) -> Engine | None:
        return self.residency.now.engine

    @property
    def described(self) -> ModelInfo | None:
        return self.residency.now.described

    @property
    def info(self) -> ModelInfo | None:
        return self.residency.now.info

    @property
    def size_bytes(self) -> int:
        return self.residency.now.size_bytes

    @property
    def fetching(self) -> bool:
        return self.residency.now.fetching

    @property
    def memory_bytes(self) -> int:
        """The load's estimate, or the runner's resident memory (its RSS) when that is more: a model in a
        runner process is counted by the real figure, Python and the native library's heaps included."""
        now = self.residency.now
        measured = now.engine.resident_bytes() if now.engine is not None else None
        return max(now.memory_bytes, measured or 0)

    @property
    def last_used(self) -> float:
        return self.residency.now.last_used

    @property
    def last_used_wall(self) -> float:
        return self.residency.now.last_used_wall

    @property
    def expires_at(self) -> float | None:
        return self.residency.now.expires_at

    @property
    def keep_alive_s(self) -> float:
        return self.residency.now.keep_alive_s

    @property
    def idle_keep_alive_s(self) -> float:
        return self.residency.now.idle_keep_alive_s

    @property
    def unload_when_idle(self) -> bool:
        return self.residency.now.unload_when_idle

    @property
    def load_ms(self) -> float:
        return self.residency.now.load_ms

    @property
    def pins(self) -> int:
        return self.residency.now.pins

    @property
    def busy(self) -> bool:
        """A request runs or waits on the model, or something holds it: never unloaded then."""
        return bool(self.queue.active or self.queue.waiting or self.residency.now.pins)

    @property
    def servable(self) -> bool:
        """Whether a request may be sent here now: loaded, or loadable on demand (not failed, unless its
        runner died and it restarts on use; not fetching)."""
        return (self.state is not ModelState.FAILED or self.restartable) and not self.fetching

    @property
    def restartable(self) -> bool:
        """FAILED because its runner died, and the next request starts it again: within the crash limit,
        or past it with its file changed since."""
        now = self.residency.now
        if now.state is not ModelState.FAILED:
            return False
        if now.retry:
            return True
        return now.crashed_file is not None and file_signature(now.crashed_file[0]) != now.crashed_file

    def check_servable(self) -> None:
        """Raises the error a request to this model gets now, if any; a model not loaded loads on use."""
        now = self.residency.now
        if now.state is ModelState.FAILED and not self.restartable:
            raise ModelLoadError(f"model {self.name!r} failed to load: {now.error}")
        if now.fetching:
            raise ModelLoading(f"model {self.name!r} is loading (its file is being fetched); retry shortly")

    def ready_engine(self) -> Engine:
        """The engine when loaded, or the error a request that cannot wait for a load gets now."""
        now = self.residency.now
        if now.state is ModelState.READY and now.engine is not None:
            return now.engine
        if now.state is ModelState.FAILED:  # the load this request waited for failed (or its runner died)
            raise ModelLoadError(f"model {self.name!r} failed to load: {now.error}")
        self.check_servable()
        raise ModelLoading(f"model {self.name!r} is {now.state.value.replace('_', ' ')}; retry shortly")
