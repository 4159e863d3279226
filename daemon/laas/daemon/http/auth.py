"""The frame of every HTTP API call: its request id, who calls, the scope, the stream slot, the audit and
access lines; the same rules as the gRPC edge (request_log.py, access.py), with the same checks.

Layer: edge (HTTP). A call is opened when a request arrives (:meth:`Gate.open`): its request id is the
client's `x-request-id` header when it is a short token, else a fresh one (sent back as a header and
set in logs.request_id for the lines written while it runs); the caller is identified by its
`Authorization: Bearer <token>` header (access.identify: the same token file, missing or unknown: 401;
under mutual TLS without tokens, the client certificate's subject), the route's scope is checked
(access.require_scope: 403 naming it), a stream takes one of the token's `max_streams_per_token` slots
(access.StreamSlots, shared with gRPC: 429 beyond). The call (app/calls.py) is handed to the use case,
which fills its audit record; how it ended is settled once, and the audit line and the access line
(method, status, milliseconds; never the content) read that one status.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from typing import Any

from starlette.requests import Request

from laas.daemon.access import StreamSlots, bearer, identify, require_scope
from laas.daemon.app.calls import Call, current_call
from laas.daemon.audit import AuditLog, AuditRecord
from laas.daemon.logs import request_id
from laas.daemon.tokens import TokenStore

log = logging.getLogger("laas.daemon.http")

REQUEST_ID_HEADER = "x-request-id"
CLIENT_CERT_KEY = "laas.client_cert"  # the ASGI scope's key for a client certificate's subject (serving.py)
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _peer(request: Request) -> str:
    client = request.client
    if client is None:
        return "unix:"
    return f"ipv6:[{client.host}]:{client.port}" if ":" in client.host else f"ipv4:{client.host}:{client.port}"


class HttpCall:
    """One HTTP call in flight: begun by Gate.open, ended by end() (once)."""

    def __init__(self, method: str, rid: str, record: AuditRecord, audit: AuditLog) -> None:
        self.method = method
        self.rid = rid
        self.call = Call()
        self.record = record
        self._audit = audit
        self._admitted = False
        self._slot: contextlib.ExitStack = contextlib.ExitStack()
        self._started = time.perf_counter()
        self._ended = False

    def end(self, error: BaseException | None) -> str:
        """Settles the call's status and writes its audit and access lines; releases its stream slot."""
        status = self.call.settle(error)
        if self._ended:
            return status
        self._ended = True
        self._slot.close()
        ms = (time.perf_counter() - self._started) * 1000
        self.record.status, self.record.ms = status, ms
        self._audit.write(self.record)
        log.info("%s %s %.1fms", self.method, status, ms)
        return status


class Gate:
    """The HTTP edge's access check, over the gRPC edge's token store, audit log and stream slots."""

    def __init__(self, tokens: TokenStore | None, audit: AuditLog, slots: StreamSlots) -> None:
        self._tokens = tokens
        self._audit = audit
        self._slots = slots

    def open(self, request: Request, method: str, scope: str, generation: bool = False) -> HttpCall:
        """Opens the call; raises (after ending it: a refused call has its lines too) when the caller may not."""
        given = request.headers.get(REQUEST_ID_HEADER, "")
        rid = given if _VALID_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        request_id.set(rid)
        record = AuditRecord(method, "?", _peer(request), rid)
        http_call = HttpCall(method, rid, record, self._audit)
        current_call.set(http_call.call)
        try:
            cert: Any = request.scope.get(CLIENT_CERT_KEY)
            principal = identify(self._tokens, bearer(request.headers.get("authorization", "")), cert)
            record.who = principal.name if principal.id in ("-", "cert") else f"{principal.id} ({principal.name})"
            require_scope(scope, method, principal)
            if generation:  # a stream, whether the client reads it streamed or whole
                http_call._slot.enter_context(self._slots.held(principal))
        except BaseException as e:
            http_call.end(e)
            raise
        c = http_call.call
        c.principal, c.audit, c.audit_log = principal, record, self._audit
        return http_call
