"""A gRPC server interceptor that gives every call a request id and writes one access-log line for it.

Layer: edge. The id is the caller's `x-request-id` metadata when it is a short token, else a fresh
random one; it is sent back as initial metadata `x-request-id` and set in logs.request_id for every
log line written while the call runs. The access line names the method, the status code and the
time taken; never the request's content. Health and reflection calls log at DEBUG (probes are
frequent), the laas API at INFO.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from laas.daemon.logs import request_id

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _request_id(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


class _Call:
    """Runs one call under its request id and logs how it ended."""

    def __init__(self, method: str, rid: str) -> None:
        self.method = method
        self.rid = rid
        self.level = logging.INFO if method.startswith("/laas.") else logging.DEBUG
        self.started = time.perf_counter()

    async def begin(self, context: grpc.aio.ServicerContext) -> None:
        request_id.set(self.rid)
        await context.send_initial_metadata(((REQUEST_ID_KEY, self.rid),))

    def end(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        if isinstance(error, asyncio.CancelledError):
            code = "CANCELLED"
        elif error is not None and not isinstance(error, grpc.aio.AbortError):
            code = "UNKNOWN"
        else:
            status = context.code()
            code = status.name if isinstance(status, grpc.StatusCode) else "OK"
        log.log(self.level, "%s %s %.1fms", self.method, code, (time.perf_counter() - self.started) * 1000)


def _wrap_unary(behavior: Callable[[Any, Any], Awaitable[Any]], call: Callable[[], _Call]
                ) -> Callable[[Any, Any], Awaitable[Any]]:
    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        this = call()
        await this.begin(context)
        try:
            response = await behavior(request, context)
        except BaseException as e:
            this.end(context, e)
            raise
        this.end(context, None)
        return response

    return run


def _wrap_stream(behavior: Callable[[Any, Any], Any], call: Callable[[], _Call]) -> Callable[[Any, Any], Any]:
    """Wraps a server-streaming behaviour of either kind gRPC accepts: an async generator, or a coroutine
    that writes with context.write (grpc_health's Watch)."""
    if inspect.iscoroutinefunction(behavior):
        return _wrap_unary(behavior, call)

    async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        this = call()
        await this.begin(context)
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as e:
            this.end(context, e)
            raise
        this.end(context, None)

    return run


class RequestLogInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:  # laas has no client-streaming calls
            return handler
        method = details.method

        def call() -> _Call:
            return _Call(method, _request_id(details))

        if handler.response_streaming:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, call))
        return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, call))
