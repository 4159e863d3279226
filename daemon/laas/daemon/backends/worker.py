"""Native calls on a model outside its scheduler, and waiting for a sequence to leave the scheduler.

Layer: infrastructure. A stream that is closed or cancelled waits (wait_through_cancellation) until its
sequence has left the scheduler, so the model is never released while native code still runs for it.

Every other native call on a model (tokenizing, evaluation) runs under a :class:`NativeClaims` claim: the
claim ends when the native call returns, not when its caller gives up, and closing the engine refuses new
claims and waits for the running ones before the model is freed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from laas.core.errors import LaasError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class NativeClaims:
    """Claims on a native model: each running native call holds one; close() waits until none is held."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = 0
        self._closed = False

    @property
    def held(self) -> int:
        return self._held

    def _claim(self) -> None:
        with self._cond:
            if self._closed:
                raise Unavailable("the model was unloaded meanwhile (its engine is closed); retry")
            self._held += 1

    def _release(self) -> None:
        with self._cond:
            self._held -= 1
            self._cond.notify_all()

    def call(self, fn: Callable[[], T]) -> T:
        """Runs `fn` here, holding a claim."""
        self._claim()
        try:
            return fn()
        finally:
            self._release()

    async def run(self, fn: Callable[[], T]) -> T:
        """Runs `fn` in a worker thread, holding a claim until it returns. A caller cancelled before `fn`
        starts drops it; one cancelled while it runs is cancelled only once `fn` has returned, so that
        whatever the caller holds (a pin on the model) outlives the native call."""
        self._claim()
        job = _Job(fn, self._release)
        try:
            future = asyncio.get_running_loop().run_in_executor(None, job)
        except BaseException:
            self._release()
            raise
        cancelled = False
        while not future.done():
            try:
                await asyncio.wait((future,))
            except asyncio.CancelledError:
                cancelled = True
                if job.drop():  # not started: it never will, and its claim is released
                    break
        if cancelled:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: the caller is gone
            raise asyncio.CancelledError
        return cast(T, future.result())  # not dropped: fn's own result

    def close(self, timeout: float | None = None) -> bool:
        """Refuses new claims and waits (blocking) until the held ones are released; False on timeout."""
        with self._cond:
            self._closed = True
            return self._cond.wait_for(lambda: self._held == 0, timeout)


class _Job(Generic[T]):
    """One native call queued for a worker thread; it can be dropped until it starts."""

    def __init__(self, fn: Callable[[], T], release: Callable[[], None]) -> None:
        self._fn, self._release = fn, release
        self._lock = threading.Lock()
        self._state = "queued"  # -> running | dropped

    def __call__(self) -> T | None:
        with self._lock:
            if self._state == "dropped":
                return None
            self._state = "running"
        try:
            return self._fn()
        finally:
            self._release()

    def drop(self) -> bool:
        """True (and the claim released) if it had not started; it then returns at once, doing nothing."""
        with self._lock:
            if self._state != "queued":
                return False
            self._state = "dropped"
        self._release()
        return True


async def wait_through_cancellation(future: asyncio.Future[None]) -> None:
    """Waits for `future` (the worker, or a sequence leaving the scheduler) even if this task is cancelled
    meanwhile."""
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue
        except LaasError:
            return
    if not future.cancelled():
        future.exception()  # mark retrieved; the error was already raised to the consumer
