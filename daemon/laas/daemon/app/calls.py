"""One API call as the application layer sees it, whatever the edge: who calls, its audit record, how it ended.

Layer: application. An edge (the gRPC interceptors in request_log.py and access.py; the coming HTTP
edge) opens a :class:`Call` when a request arrives, names its caller, and passes it to the use cases
(runtime.py), which fill its audit record from domain values. How the call ended is computed here,
once, by :func:`status_of`, and kept in the call: the first to see the end settles it (the use case,
for a stream; the access check, for a call refused before it ran; the edge, for the rest), and the
metrics, the audit line and the access-log line all read the one settled status.

Statuses are the names of gRPC status codes (the error table's, core/errors.py): OK, CANCELLED (the
client went away), the status of a LaasError, INTERNAL for anything else (a bug).
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass
from typing import Any

from laas.core.errors import LaasError, ShuttingDown, status_for
from laas.daemon.audit import AuditLog, AuditRecord
from laas.daemon.tokens import ANONYMOUS, Principal


def status_of(error: BaseException | None) -> str:
    """How a call ended, from what it raised (None: nothing)."""
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    if isinstance(error, LaasError):
        name: str = status_for(error).name
        return name
    return "INTERNAL"


@dataclass(slots=True)
class Call:
    """One call in flight. `audit` is None when the call is not audited (health checks, a caller not yet
    identified): then the use cases fill nothing."""

    principal: Principal = ANONYMOUS
    audit: AuditRecord | None = None
    audit_log: AuditLog | None = None
    status: str | None = None  # how it ended, once settled

    def begin(self, model: str = "", prompt: Any = None) -> None:
        """The use case starts: the audit log's STARTED line, with the model and prompt as the client sent
        them (before any check, so a call refused for its values leaves that line too)."""
        if self.audit is not None:
            self.audit.model = model
            self.audit.prompt = prompt or None
            if self.audit_log is not None:
                self.audit_log.start(self.audit)

    def settle(self, error: BaseException | None) -> str:
        """The call's status: computed from `error` by the first caller, read back by the others."""
        if self.status is None:
            self.status = status_of(error)
        return self.status


# The call the current request runs in; an edge sets it when the request arrives.
current_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar("laas_call", default=None)


class Lifecycle:
    """Whether new calls are accepted, and which streams are in flight (for the drain)."""

    def __init__(self) -> None:
        self.accepting = True
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()

    def check(self) -> None:
        if not self.accepting:
            raise ShuttingDown("the daemon is shutting down; retry on another instance")
