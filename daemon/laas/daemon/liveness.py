"""The liveness check behind the systemd watchdog: is every engine healthy and making progress?

Layer: application. Run on the event loop by systemd.Watchdog, so a stuck loop fails it by never
running it. It fails when an engine's own health check fails, or when a model has a stream running
(its queue is active) but has decoded no token for `stall_s` seconds: a native call that hangs looks
exactly like that, while an idle model or one that is busy decoding does not. `stall_s` must cover the
slowest prompt evaluation, which decodes no token until it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from laas.core.engine import Engine
from laas.core.errors import LaasError
from laas.daemon.registry import ModelRegistry


class EngineStuck(LaasError):
    """A model holds a stream but makes no progress."""


@dataclass
class _Progress:
    engine: Engine
    tokens: int
    since: float


class LivenessCheck:
    def __init__(self, registry: ModelRegistry, stall_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self.stall_s = stall_s
        self._clock = clock
        self._progress: dict[str, _Progress] = {}

    async def __call__(self) -> None:
        now = self._clock()
        seen = set()
        for model in self._registry.snapshots():
            engine = model.residence.engine
            if engine is None:
                continue
            seen.add(model.name)
            await engine.check_health()
            last = self._progress.get(model.name)
            if last is None or last.engine is not engine or last.tokens != engine.decoded_tokens \
                    or not model.active:
                self._progress[model.name] = _Progress(engine, engine.decoded_tokens, now)
            elif now - last.since > self.stall_s:
                raise EngineStuck(f"model {model.name!r} has a stream running but decoded no token "
                                  f"for {now - last.since:.0f}s")
        for name in set(self._progress) - seen:
            del self._progress[name]
