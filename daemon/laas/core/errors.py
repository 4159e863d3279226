"""The one error hierarchy of laas, and the one table that maps it to gRPC status codes and HTTP statuses.

Layer: core. Engines, the store and the router raise these; the gRPC edge turns them into status
codes with :func:`status_for`, in one place for every method (daemon/request_log.py), the HTTP edge
into HTTP statuses with :func:`http_status_for` (daemon/http/errors.py), and the client turns status
codes back into them with :func:`error_for_status`. Nothing matches on message text.

    LaasError                       (INTERNAL, 500: a bug, never bad input)
    ├── InvalidArgument             (INVALID_ARGUMENT, 400: a request field is wrong; `field` names it)
    │   ├── RequestTooLarge         (413: a prompt, message or body over its size limit)
    │   └── Unprocessable           (422: the HTTP body does not match the API's schema)
    ├── NotFound                    (NOT_FOUND, 404: no such model)
    ├── OutOfRange                  (OUT_OF_RANGE, 400: prompt + max_tokens beyond the context window)
    ├── ResourceExhausted           (RESOURCE_EXHAUSTED, 429: the model's queue is full)
    │   └── MemoryBudgetExceeded    (the model does not fit the memory budget now)
    ├── Unavailable                 (UNAVAILABLE, 503: retry later)
    │   ├── ModelLoading            (the model is being fetched or loaded)
    │   ├── ShuttingDown            (the daemon is draining)
    │   └── TargetFailed            (a remote target failed; the router fails over to the next)
    ├── Unsupported                 (FAILED_PRECONDITION, 400: the model cannot do this, e.g. a generative
    │                                    model asked for embeddings; `field` names the request field)
    ├── ModelLoadError              (FAILED_PRECONDITION, 409: the model failed to load or validate)
    ├── Unauthenticated             (UNAUTHENTICATED, 401: no valid token)
    ├── PermissionDenied            (PERMISSION_DENIED, 403: the token lacks the method's scope)
    ├── Cancelled                   (CANCELLED, 499: the client went away; nobody reads that answer)
    └── DeadlineExceeded            (DEADLINE_EXCEEDED, 504)

Why a table rather than a `code` attribute on each class: the client needs the reverse mapping too,
and one ordered list (most specific first) serves both directions and both edges. The HTTP statuses
are those OpenAI's SDKs map to their exceptions (BadRequestError, NotFoundError, ConflictError,
UnprocessableEntityError, RateLimitError, ...): a model that failed to load conflicts with the model's
state (409, retrying will not help), a context overflow is a bad request as OpenAI answers it (400).
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


class RequestTooLarge(InvalidArgument):
    """A prompt, message or request body is over its size limit (HTTP 413; over gRPC, INVALID_ARGUMENT)."""


class Unprocessable(InvalidArgument):
    """An HTTP body that is JSON but not of the API's schema (a wrong type, a missing field): HTTP 422."""


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


# Most specific first: the first row whose class matches wins. Columns: the class, its gRPC status code,
# its HTTP status.
STATUS_TABLE: tuple[tuple[type[LaasError], grpc.StatusCode, int], ...] = (
    (RequestTooLarge, grpc.StatusCode.INVALID_ARGUMENT, 413),
    (Unprocessable, grpc.StatusCode.INVALID_ARGUMENT, 422),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (NotFound, grpc.StatusCode.NOT_FOUND, 404),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE, 400),
    (MemoryBudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (ModelLoading, grpc.StatusCode.UNAVAILABLE, 503),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE, 503),
    (TargetFailed, grpc.StatusCode.UNAVAILABLE, 503),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, 503),
    (Unsupported, grpc.StatusCode.FAILED_PRECONDITION, 400),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION, 409),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, 403),
    (Cancelled, grpc.StatusCode.CANCELLED, 499),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (LaasError, grpc.StatusCode.INTERNAL, 500),
)


def _row(error: LaasError) -> tuple[type[LaasError], grpc.StatusCode, int]:
    return next(row for row in STATUS_TABLE if isinstance(error, row[0]))  # LaasError is the last row


def status_for(error: LaasError) -> grpc.StatusCode:
    """The gRPC status code for a laas error."""
    return _row(error)[1]


def http_status_for(error: LaasError) -> int:
    """The HTTP status for a laas error."""
    return _row(error)[2]


def error_for_status(code: grpc.StatusCode, message: str) -> LaasError:
    """The laas error a client raises for a status code (the most general class for that code)."""
    for cls, row_code, _ in reversed(STATUS_TABLE):
        if row_code == code and cls is not LaasError:
            error: LaasError = cls(message)
            return error
    return LaasError(f"{code.name}: {message}")
