"""Access control of every call: authentication, scopes, streams per caller, and the audit line.

Layer: edge. A gRPC server interceptor, inside the call frame (request_log.py), so that no servicer
method repeats it. For each call:
1. health checks need no token (load balancers and systemd probes carry none);
2. the caller is identified: with a token file, by its `authorization: Bearer <token>` metadata
   (missing or unknown: UNAUTHENTICATED); without one, as `anonymous` (loopback, unix socket, or a
   listener the operator opened on purpose) or by its client certificate under mutual TLS;
3. the method's scope is checked (PERMISSION_DENIED names the scope missing); server reflection
   needs a valid token but no scope;
4. a request whose bytes did not decode is answered INVALID_ARGUMENT (undecodable.py), after 2 and 3;
5. streams in flight per token (or per client certificate's subject) are capped at
   `max_streams_per_token` (RESOURCE_EXHAUSTED); anonymous local callers share the models' queues
   (`max_queue`) instead;
6. the principal and the call's audit record go in the current call (app/calls.py) for the use cases
   (local-only per token, the offload scope; they fill the record and write its STARTED line as they
   begin, so that a call cut by a crash leaves a trace), and the audit log gets the line of its end,
   with the status the call settled on.
A refusal is a LaasError like any other: the call frame answers it with its status.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from laas.core.errors import (
    InvalidArgument,
    LaasError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from laas.daemon.app.calls import Call, current_call
from laas.daemon.audit import AuditLog, AuditRecord
from laas.daemon.logs import request_id
from laas.daemon.request_log import abort
from laas.daemon.tokens import ANONYMOUS, Principal, TokenStore
from laas.daemon.undecodable import MESSAGE as UNDECODABLE
from laas.daemon.undecodable import RateLimitedWarning, Undecodable, decoding

log = logging.getLogger(__name__)

OPEN_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
# The scope each laas.v1 method needs.
METHOD_SCOPES = {
    # Embed: the generate scope (app/runtime.py says why)
    "Generate": "generate", "Chat": "generate", "Embed": "generate", "Tokenize": "generate",
    "ExplainRoute": "generate",
    "ListModels": "models:read", "GetModel": "models:read", "GetStats": "models:read",
    "LoadModel": "models:admin", "UnloadModel": "models:admin",
}
_SERVICE = "/laas.v1.Runtime/"


def stream_key(principal: Principal) -> str:
    """Whose streams are counted together: a token's id, or a client certificate's subject."""
    return f"cert:{principal.name}" if principal.id == "cert" else principal.id


def _current() -> Call:
    call = current_call.get()
    if call is None:  # no call frame outside (a server built without it)
        call = Call()
        current_call.set(call)
    return call


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, tokens: TokenStore | None, audit: AuditLog, max_streams: int) -> None:
        self._tokens = tokens
        self._audit = audit
        self._max_streams = max_streams
        self._streams: Counter[str] = Counter()
        self._undecodable_log = RateLimitedWarning()

    def _identify(self, method: str, context: grpc.aio.ServicerContext) -> Principal:
        if self._tokens is None or not self._tokens.in_force():
            names = (context.auth_context() or {}).get("x509_common_name") or ()
            return Principal("cert", names[0].decode(errors="replace")) if names else ANONYMOUS
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                presented = value[7:].strip()
        try:
            principal = self._tokens.authenticate(presented) if presented else None
        except LaasError as e:  # the token file went missing or unreadable: fail closed, say why in the log
            log.error("%s", e)
            raise Unavailable("tokens cannot be checked now; retry later") from e
        if principal is None:
            raise Unauthenticated("a valid token is required: send the metadata "
                                  "`authorization: Bearer <token>` (see `laasd token create`)")
        return principal

    @staticmethod
    def _authorize(method: str, principal: Principal) -> None:
        scope = METHOD_SCOPES.get(method.removeprefix(_SERVICE)) if method.startswith(_SERVICE) else None
        if method.startswith(_SERVICE) and scope is None:
            raise PermissionDenied(f"{method} is not open to tokens")
        if scope is not None and scope not in principal.scopes:
            raise PermissionDenied(f"this token lacks the scope {scope!r} that "
                         f"{method.removeprefix(_SERVICE)} needs")

    def _check_decoded(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            self._undecodable_log.warn("undecodable %s request from %s: %s", method, context.peer() or "?",
                                       request.reason)
            raise InvalidArgument(UNDECODABLE)

    def _record(self, method: str, principal: Principal, context: grpc.aio.ServicerContext) -> AuditRecord:
        who = principal.name if principal.id in ("-", "cert") else f"{principal.id} ({principal.name})"
        return AuditRecord(method.removeprefix(_SERVICE), who, context.peer() or "", request_id.get())

    def _admit(self, call: Call, record: AuditRecord, principal: Principal) -> None:
        """The caller may go on: the use case sees who calls and fills the record (and writes its STARTED line)."""
        call.principal, call.audit, call.audit_log = principal, record, self._audit

    def _finish(self, record: AuditRecord, call: Call, error: BaseException | None, started: float) -> None:
        record.status = call.settle(error)
        record.ms = (time.perf_counter() - started) * 1000
        self._audit.write(record)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None:
            return handler
        handler = handler._replace(request_deserializer=decoding(handler.request_deserializer))
        if method.startswith(OPEN_PREFIX):  # health: no token; only undecodable requests are refused
            if handler.response_streaming:
                return handler._replace(unary_stream=self._guard_open(handler.unary_stream, method))
            return handler._replace(unary_unary=self._guard_open(handler.unary_unary, method))
        if handler.request_streaming:  # server reflection: a valid token, no scope, no audit line
            return handler._replace(stream_stream=self._guard_reflection(handler.stream_stream, method))
        if handler.response_streaming:
            return handler._replace(unary_stream=self._guard_stream(handler.unary_stream, method))
        return handler._replace(unary_unary=self._guard_unary(handler.unary_unary, method))

    def _guard_open(self, behavior: Callable[[Any, Any], Any], method: str) -> Callable[[Any, Any], Any]:
        """Health's Check (a coroutine) and Watch (a coroutine writing with context.write): both awaited."""
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._check_decoded(method, request, context)
            return await behavior(request, context)

        return run

    def _guard_reflection(self, behavior: Callable[[Any, Any], AsyncIterator[Any]], method: str
                          ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        """Reflection is client-streaming, outside the call frame: it answers its refusals itself."""
        async def run(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                self._identify(method, context)
            except LaasError as e:
                await abort(context, e)

            async def decoded() -> AsyncIterator[Any]:
                async for request in requests:
                    try:
                        self._check_decoded(method, request, context)
                    except LaasError as e:
                        await abort(context, e)
                    yield request

            async for response in behavior(decoded(), context):
                yield response

        return run

    def _guard_unary(self, behavior: Callable[[Any, Any], Awaitable[Any]], method: str
                     ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            call = _current()
            record = AuditRecord(method.removeprefix(_SERVICE), "?", context.peer() or "", request_id.get())
            try:
                principal = self._identify(method, context)
                record = self._record(method, principal, context)
                self._authorize(method, principal)
                self._check_decoded(method, request, context)
                self._admit(call, record, principal)
                response = await behavior(request, context)
            except BaseException as e:
                self._finish(record, call, e, started)
                raise
            self._finish(record, call, None, started)
            return response

        return run

    def _guard_stream(self, behavior: Callable[[Any, Any], AsyncIterator[Any]], method: str
                      ) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            call = _current()
            record = AuditRecord(method.removeprefix(_SERVICE), "?", context.peer() or "", request_id.get())
            counted = ""
            try:
                principal = self._identify(method, context)
                record = self._record(method, principal, context)
                self._authorize(method, principal)
                self._check_decoded(method, request, context)
                key = stream_key(principal)
                if principal is not ANONYMOUS and self._streams[key] >= self._max_streams:
                    raise ResourceExhausted(f"{principal.name} already has "
                                            f"{self._max_streams} streams in flight (max_streams_per_token)")
                counted = key
                self._streams[counted] += 1
                self._admit(call, record, principal)
                async for response in behavior(request, context):
                    yield response
            except BaseException as e:
                self._finish(record, call, e, started)
                raise
            finally:
                if counted:
                    self._streams[counted] -= 1
                    if not self._streams[counted]:
                        del self._streams[counted]
            self._finish(record, call, None, started)

        return run
