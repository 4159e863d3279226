"""Server-sent events, parsed with a bound on what one line and one event may buffer.

Layer: domain (pure: bytes in, events out). An endpoint that sends a line without end (or an event of
endless `data:` lines) would otherwise grow the buffer until the daemon runs out of memory; past
`max_bytes` the decoder raises EventTooLarge and the caller treats the endpoint as failed. Lines end
with CRLF, LF or CR (the SSE grammar); comment lines (`: ping`) and fields other than `data` are
dropped; an event is dispatched at its blank line.
"""

from __future__ import annotations

MAX_EVENT_BYTES = 1 << 20  # 1 MiB: far above any streamed delta, far below a memory problem


class EventTooLarge(ValueError):
    """A line or an event grew past the limit."""


class SseDecoder:
    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_bytes
        self._buffer = bytearray()
        self._data: list[bytes] = []
        self._size = 0  # bytes of data held for the event being built

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event that `chunk` completes (raises EventTooLarge past the limit)."""
        self._buffer += chunk
        events: list[str] = []
        start = 0
        buffer = self._buffer
        while True:
            cr, lf = buffer.find(b"\r", start), buffer.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            end = lf if cr < 0 or 0 <= lf < cr else cr
            if end == cr and end + 1 == len(buffer):
                break  # a CR at the end of the chunk: a CRLF may be split, wait for the next byte
            line = bytes(buffer[start:end])
            start = end + 2 if end == cr and buffer[end + 1:end + 2] == b"\n" else end + 1
            if (event := self._line(line)) is not None:
                events.append(event)
        del buffer[:start]
        if len(buffer) > self._max:
            raise EventTooLarge(f"a line of more than {self._max} bytes")
        return events

    def _line(self, line: bytes) -> str | None:
        if not line:
            if not self._data:
                return None
            data, self._data, self._size = b"\n".join(self._data), [], 0
            return data.decode("utf-8", "replace")
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        if name != b"data":
            return None
        value = value.removeprefix(b" ")
        self._size += len(value) + 1
        if self._size > self._max:
            raise EventTooLarge(f"an event of more than {self._max} bytes")
        self._data.append(value)
        return None

    def close(self) -> list[str]:
        """At the end of the stream: an unterminated last line still counts (then the pending event)."""
        events = self.feed(b"\n") if self._buffer else []
        if (event := self._line(b"")) is not None:
            events.append(event)
        return events
