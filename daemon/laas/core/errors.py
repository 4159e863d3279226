"""The one error hierarchy of laas, and the one table that maps it to gRPC status codes.

Layer: core. Engines, the store and the router raise these; the gRPC edge turns them into status
codes with :func:`status_for`, in one place for every method (daemon/request_log.py), and the client
turns status codes back into them with :func:`error_for_status`. Nothing matches on message text.

    LaasError                       (INTERNAL: a bug, never bad input)
    ├── InvalidArgument             (INVALID_ARGUMENT: a request field is wrong; `field` names it)
    ├── NotFound                    (NOT_FOUND: no such model)
    ├── OutOfRange                  (OUT_OF_RANGE: prompt + max_tokens beyond the context window)
    ├── ResourceExhausted           (RESOURCE_EXHAUSTED: the model's queue is full)
    ├── Unavailable                 (UNAVAILABLE: retry later)
    │   ├── ModelLoading            (the model is being fetched or loaded)
    │   ├── ShuttingDown            (the daemon is draining)
    │   └── TargetFailed            (a remote target failed; the router fails over to the next)
    ├── Unsupported                 (FAILED_PRECONDITION: the model cannot do this, e.g. a generative
    │                                    model asked for embeddings; `field` names the request field)
    ├── ModelLoadError              (FAILED_PRECONDITION: the model failed to load or validate)
    ├── Unauthenticated             (UNAUTHENTICATED: no valid token)
    ├── PermissionDenied            (PERMISSION_DENIED: the token lacks the method's scope)
    ├── Cancelled                   (CANCELLED: the client went away)
    └── DeadlineExceeded            (DEADLINE_EXCEEDED)

Why a table rather than a `code` attribute on each class: the client needs the reverse mapping too,
and one ordered list (most specific first) serves both directions.
"""

from __future__ import annotations

import grpc

# Trailing metadata key that carries the request field an error is about (e.g. "sampling.top_p").
FIELD_METADATA_KEY = "laas-field"


class LaasError(Exception):
    """Base of every error laas raises on purpose. Unmapped subclasses surface as INTERNAL."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message

    @property
    def code(self) -> grpc.StatusCode:
        return status_for(self)


class InvalidArgument(LaasError):
    """A request field has a value the daemon cannot accept; `field` is its path, e.g. sampling.top_p."""


class NotFound(LaasError):
    """The named model (or other resource) does not exist."""


class OutOfRange(LaasError):
    """The request does not fit the model's context window."""


class ResourceExhausted(LaasError):
    """Too many requests are already waiting for the model."""


class MemoryBudgetExceeded(ResourceExhausted):
    """The model does not fit the memory budget beside the models that are busy (or at all)."""


class Unavailable(LaasError):
    """The daemon cannot serve this now; the same request may succeed later."""


class ModelLoading(Unavailable):
    """The model is still being fetched or loaded."""


class ShuttingDown(Unavailable):
    """The daemon is draining and takes no new requests."""


class TargetFailed(Unavailable):
    """A remote target (cloud endpoint, LAN peer) refused, timed out, broke its stream or sent garbage."""


class Unsupported(LaasError):
    """The model is of the wrong kind for the call: embeddings from a generative model, text from an
    embedding model. Another model would serve it; retrying this one will not."""


class ModelLoadError(LaasError):
    """A model file is missing, invalid or failed to load; retrying will not help until it is fixed."""


class Unauthenticated(LaasError):
    """The call carries no valid token (`authorization: Bearer <token>`) and the daemon requires one."""


class PermissionDenied(LaasError):
    """The caller's token lacks the scope the method needs."""


class Cancelled(LaasError):
    """The request was cancelled by its caller."""


class DeadlineExceeded(LaasError):
    """The request's deadline passed."""


# Most specific first: the first row whose class matches wins.
STATUS_TABLE: tuple[tuple[type[LaasError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (MemoryBudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelLoading, grpc.StatusCode.UNAVAILABLE),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (TargetFailed, grpc.StatusCode.UNAVAILABLE),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unsupported, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (LaasError, grpc.StatusCode.INTERNAL),
)


def status_for(error: LaasError) -> grpc.StatusCode:
    """The gRPC status code for a laas error."""
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL  # unreachable: LaasError is the last row


def error_for_status(code: grpc.StatusCode, message: str) -> LaasError:
    """The laas error a client raises for a status code (the most general class for that code)."""
    for cls, row_code in reversed(STATUS_TABLE):
        if row_code == code and cls is not LaasError:
            error: LaasError = cls(message)
            return error
    return LaasError(f"{code.name}: {message}")
