"""A bounded FIFO queue in front of a model: `parallel` requests run (one unless the model batches),
up to `max_waiting` wait, more are refused.

Layer: domain (asyncio only). Refusing early with RESOURCE_EXHAUSTED keeps latency bounded for the
requests already admitted, and tells the caller (later, the router) to go elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from laas.core.errors import ResourceExhausted


class ModelQueue:
    def __init__(self, name: str, max_waiting: int, parallel: int = 1) -> None:
        self.name = name
        self.max_waiting = max_waiting
        self.parallel = parallel
        self._lock = asyncio.Semaphore(parallel)  # FIFO: waiters acquire in arrival order
        self.waiting = 0
        self.active = 0
        self._idle = asyncio.Event()  # set while no request runs or waits (a reload closes the model then)
        self._idle.set()

    def widen(self, parallel: int) -> None:
        """Lets `parallel` requests run from now on (an automatic value, known once the model is described:
        it only ever grows from the 1 the queue starts with); those waiting start at once."""
        for _ in range(parallel - self.parallel):
            self._lock.release()
        self.parallel = max(self.parallel, parallel)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Holds the model for the body; raises ResourceExhausted when the queue is full."""
        # Busy while a request holds the model or is about to (the lock reads free between a release
        # and the next waiter waking up, so it cannot be the test).
        if self.active + self.waiting >= self.parallel and self.waiting >= self.max_waiting:
            raise ResourceExhausted(
                f"model {self.name!r} is busy and {self.waiting} request(s) are already waiting "
                f"(max_queue={self.max_waiting}); retry later",
            )
        self.waiting += 1
        self._idle.clear()
        try:
            await self._lock.acquire()
        except BaseException:
            self.waiting -= 1
            self._set_idle_if_unused()
            raise
        self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._lock.release()
            self._set_idle_if_unused()

    def _set_idle_if_unused(self) -> None:
        if not self.active and not self.waiting:
            self._idle.set()
