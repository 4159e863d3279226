"""Requests whose bytes do not decode (bad wire format, invalid UTF-8 in a string field).

Layer: edge. gRPC's own handling of a deserializer that raises is UNKNOWN with a traceback in the log,
before any interceptor runs, so before authentication. Instead the access interceptor wraps every
method's request deserializer with `decoding`: a request that fails to decode becomes an `Undecodable`
value, and the interceptor answers it INVALID_ARGUMENT after authenticating the caller. The log gets
one warning line per interval at most, with the count of those it left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MESSAGE = "the request message could not be decoded (malformed protobuf or invalid UTF-8 in a string field)"


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands in for a request message that failed to decode; `reason` is the decoder's error."""

    reason: str


def decoding(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns Undecodable instead of raising."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # any failure to decode client bytes is the client's fault
            return Undecodable(f"{type(e).__name__}: {str(e)[:200]}")

    return decode


class RateLimitedWarning:
    """Logs at most one warning per `interval_s`, saying how many it left out since the last one."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def warn(self, message: str, *args: object) -> bool:
        """Logs the message unless one was logged within the interval; returns whether it logged."""
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._suppressed += 1
                return False
            suppressed, self._suppressed, self._next = self._suppressed, 0, now + self._interval_s
        more = f" ({suppressed} more since the last such line)" if suppressed else ""
        log.warning(message + more, *args)
        return True
