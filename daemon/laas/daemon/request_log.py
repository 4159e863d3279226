"""The frame of every gRPC call: its request id, its status (every error mapped here, once) and its access line.

Layer: edge. A server interceptor, the outermost, so that every method of every service gets the same
frame and no servicer method repeats it. The id is the caller's `x-request-id` metadata when it is a
short token, else a fresh random one; it is sent back as initial metadata `x-request-id` and set in
logs.request_id for every log line written while the call runs. The call (app/calls.py) is opened here
and put in `current_call` for the access check and the use cases.

Errors: a LaasError raised anywhere below (the access check, the servicer, the application layer, the
router) becomes its status code through errors.STATUS_TABLE, with the field at fault in the
`laas-field` trailing metadata; any other exception is a bug, logged and answered INTERNAL without
internals. The call's status is settled once (app/calls.py) and read by the access line, the audit
line and the metrics alike. The access line names the method, the status and the time taken; never
the request's content. Health and reflection calls log at DEBUG (probes are frequent), the laas API
at INFO.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from laas.core.errors import FIELD_METADATA_KEY, LaasError, status_for
from laas.daemon.app.calls import Call, current_call
from laas.daemon.logs import request_id

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _request_id(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


async def abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """Ends the call with the status of `error` (raises grpc's AbortError): a LaasError's own, with the
    field at fault; anything else is a bug: INTERNAL, the details in the daemon's log only."""
    if isinstance(error, LaasError):
        metadata = ((FIELD_METADATA_KEY, error.field),) if error.field else ()
        await context.abort(status_for(error), error.message, trailing_metadata=metadata)
    log.error("internal error while serving a request", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; the daemon's log has the details")


class _Frame:
    """One call under its request id: opens the call, logs how it ended, answers its error."""

    def __init__(self, method: str, rid: str) -> None:
        self.method = method
        self.rid = rid
        self.level = logging.INFO if method.startswith("/laas.") else logging.DEBUG
        self.started = time.perf_counter()
        self.call = Call()

    async def begin(self, context: grpc.aio.ServicerContext) -> None:
        request_id.set(self.rid)
        current_call.set(self.call)
        await context.send_initial_metadata(((REQUEST_ID_KEY, self.rid),))

    def end(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        if isinstance(error, grpc.aio.AbortError) and self.call.status is None:  # aborted by grpc's own code
            code = context.code()
            self.call.status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        status = self.call.settle(error)
        log.log(self.level, "%s %s %.1fms", self.method, status, (time.perf_counter() - self.started) * 1000)

    @contextlib.asynccontextmanager
    async def running(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """The call's body runs inside: how it ended is logged, and its error answered."""
        await self.begin(context)
        try:
            yield
        except grpc.aio.AbortError as e:
            self.end(context, e)
            raise
        except Exception as e:
            await self.fail(context, e)
            raise
        except BaseException as e:  # cancelled, or closed by grpc
            self.end(context, e)
            raise
        self.end(context, None)

    async def fail(self, context: grpc.aio.ServicerContext, error: Exception) -> None:
        self.call.settle(error)
        try:
            await abort(context, error)
        finally:
            self.end(context, error)  # the access line after the bug's traceback


def _wrap_unary(behavior: Callable[[Any, Any], Awaitable[Any]], frame: Callable[[], _Frame]
                ) -> Callable[[Any, Any], Awaitable[Any]]:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with frame().running(context):
            return await behavior(request, context)

    return run


def _wrap_stream(behavior: Callable[[Any, Any], Any], frame: Callable[[], _Frame]) -> Callable[[Any, Any], Any]:
    """Wraps a server-streaming behaviour of either kind gRPC accepts: an async generator, or a coroutine
    that writes with context.write (grpc_health's Watch)."""
    if inspect.iscoroutinefunction(behavior):
        return _wrap_unary(behavior, frame)

    async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with frame().running(context):
            async for response in behavior(request, context):
                yield response

    return run


class RequestLogInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:  # reflection: its own errors (access.py)
            return handler
        method = details.method

        def frame() -> _Frame:
            return _Frame(method, _request_id(details))

        if handler.response_streaming:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, frame))
        return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, frame))
