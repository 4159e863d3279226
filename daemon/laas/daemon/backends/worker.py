"""The ONNX engine's bridge: blocking generation in the engine's worker thread, streamed to asyncio.

Layer: infrastructure. The worker hands chunks to the event loop one by one and checks a stop flag
before every decode step; closing or cancelling the stream sets the flag and waits for the worker to
stop, so the model is never released while native code still runs on it. (The GGUF engine's scheduler
thread relays its own streams, and waits the same way: wait_through_cancellation.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor
from typing import cast

from laas.daemon.engine import GenerationChunk
from laas.daemon.errors import LaasError, ModelLoadError

log = logging.getLogger(__name__)

_END = object()  # sentinel: the worker has finished

Emit = Callable[[object], None]
Blocking = Callable[[threading.Event, Emit], None]


async def stream_from_worker(executor: Executor, blocking: Blocking, runtime: str
                             ) -> AsyncGenerator[GenerationChunk, None]:
    """Runs `blocking(stop_flag, emit)` in `executor` and yields what it emits; `runtime` names the native
    library in the error a failure of the worker becomes."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop_flag = threading.Event()

    def emit(item: object) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def run() -> None:
        try:
            blocking(stop_flag, emit)
        except LaasError:
            raise
        except Exception as e:  # native failures become a clear error, not a dead worker
            log.exception("generation failed")
            raise ModelLoadError(f"generation failed in {runtime}: {e}") from e
        finally:
            emit(_END)

    future = loop.run_in_executor(executor, run)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                break
            yield cast(GenerationChunk, item)
        await future  # re-raises a failure of the worker
    finally:
        stop_flag.set()
        await wait_through_cancellation(future)


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
