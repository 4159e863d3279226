"""Errors of the HTTP edge as OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`.

Layer: edge (HTTP). The status comes from the one error table (core/errors.py, its HTTP column), so
the gRPC and HTTP edges answer an error alike; `code` is the table's gRPC status name in lower case
(`invalid_argument`, `resource_exhausted`), `type` the OpenAI name of the status' class
(`invalid_request_error`, `authentication_error`, ...), `param` the field at fault as the HTTP body
names it (the application layer names it as gRPC does: `sampling.top_p` is `top_p` here). 429 and
503 carry `Retry-After`. Anything that is not a LaasError is a bug: 500, the details only in the log.
Body validation (pydantic) errors become Unprocessable (422) naming the field, or InvalidArgument
(400) for an unknown field or a body that is not JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from starlette.responses import JSONResponse

from laas.core.errors import InvalidArgument, LaasError, Unauthenticated, Unprocessable, http_status_for, status_for

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
# OpenAI's `type` for a status (the SDKs read the status; some clients show the type).
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
          429: "rate_limit_error"}
# The domain's field names (the gRPC API's) where the HTTP body names them otherwise.
_PARAMS = {"keep_alive_s": "keep_alive", "routing.latency_budget_ms": "latency_budget_ms",
           "routing.policy": "routing_policy", "text": "input"}


def param_of(field: str | None) -> str | None:
    if not field:
        return None
    return _PARAMS.get(field, field.removeprefix("sampling."))


def error_body(error: LaasError) -> dict[str, Any]:
    status = http_status_for(error)
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": param_of(error.field),
                      "code": status_for(error).name.lower()}}


def error_response(error: BaseException) -> JSONResponse:
    if not isinstance(error, LaasError):
        log.error("internal error while serving an HTTP request", exc_info=error)
        error = LaasError("internal error; the daemon's log has the details")
    status = http_status_for(error)
    headers = {"retry-after": RETRY_AFTER_S} if status in (429, 503) else {}
    if isinstance(error, Unauthenticated):
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(error_body(error), status_code=status, headers=headers)


def sse_error(error: BaseException) -> bytes:
    """An error after the stream began (its status was 200 already): one event with the error body."""
    if not isinstance(error, LaasError):
        log.error("internal error while streaming an HTTP response", exc_info=error)
        error = LaasError("internal error; the daemon's log has the details")
    return f"data: {json.dumps(error_body(error))}\n\n".encode()


def _loc(loc: Sequence[int | str]) -> str:
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
    return where


def validation_error(errors: Sequence[Any]) -> LaasError:
    """The first of pydantic's (FastAPI's) body errors as a LaasError naming the field."""
    if not errors:
        return Unprocessable("the request body does not match the API")
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    # a union's members appear in the location (str, list[...]): not the client's field names
    loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")))]
    field = _loc(loc)
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return InvalidArgument(f"unrecognized request argument supplied: {field}", field=field)
    if kind == "json_invalid" or not field:
        return InvalidArgument(f"the request body is not valid JSON: {first.get('msg', '')}", field=None)
    if kind == "missing":
        return Unprocessable(f"{field} is required", field=field)
    return Unprocessable(f"{field}: {first.get('msg', 'invalid')}", field=field)
