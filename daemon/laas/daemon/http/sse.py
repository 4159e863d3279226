"""Server-sent events of a generation, and a client that goes away.

Layer: edge (HTTP). Each chunk of the use case's stream is one `data: {json}` event; the stream ends with
`data: [DONE]` (after the usage event when `stream_options.include_usage`). An error after the first
event (the status was 200 already) is one event with OpenAI's error body, and no [DONE].

A client that disconnects stops the decode within one step: while the first chunk is awaited (the
queue, the prompt) a watcher of the connection (`http.disconnect`) cancels the wait; after it,
Starlette's StreamingResponse watches the connection and cancels the body, which closes the use
case's stream, and with it the engine's (as a gRPC cancellation does). A slow reader holds only its
own response: the engine's tokens wait in that stream's own queue, and the event loop serves the others.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

from laas.core.errors import Cancelled
from laas.core.types import Completion
from laas.daemon.app.values import StreamChunk
from laas.daemon.http.auth import HttpCall
from laas.daemon.http.errors import sse_error
from laas.daemon.http.replies import Reply

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # json.dumps builds one per call with these


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + _JSON.encode(data).encode() + b"\n\n"


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or Cancelled (the work cancelled) when the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if task.cancelled():
        raise Cancelled("the client went away")
    return task.result()


async def events(first: StreamChunk, rest: AsyncGenerator[StreamChunk, None], reply: Reply, call: HttpCall,
                 include_usage: bool) -> AsyncIterator[bytes]:
    """The response body: every chunk as an event, then [DONE]; ends the call (once) however it ends."""
    error: BaseException | None = None
    try:
        try:
            yield event(reply.chunk(first, include_usage))
            last = first
            async for item in rest:
                yield event(reply.chunk(item, include_usage))
                last = item
            if include_usage and isinstance(last.chunk, Completion):
                reply.final = last.chunk
                yield event(reply.usage_chunk())
            yield DONE
        finally:
            await rest.aclose()
    except Exception as e:
        error = e
        call.call.settle(e)
        yield sse_error(e)
    except BaseException as e:  # cancelled: the client went away
        error = e
        raise
    finally:
        call.end(error)
