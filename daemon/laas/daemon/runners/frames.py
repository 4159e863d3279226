"""The channel between the daemon and a runner: length-prefixed pickled frames over a socket pair.

Layer: infrastructure. A frame is a tuple whose first item names it (see child.py for the list). The
payloads are the domain's own frozen dataclasses (GenerationRequest, TextDelta, Completion, ModelInfo...),
pickled, so a field another change adds to them crosses the channel with no change here. Pickle is safe
on this channel: both ends are the same program, and the socket pair is private to the two processes.
Errors cross as (module, class, message, field): LaasError keeps `field` out of its args, which pickle
would drop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import operator
import pickle
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, cast

from laas.core.errors import LaasError
from laas.core.types import TextDelta

HEADER = struct.Struct("!I")
MAX_FRAME = 256 << 20  # a frame is a message or a chunk; a model's metadata (its vocabulary) is the largest
READ_SIZE = 1 << 16

Frame = tuple[object, ...]
PackedError = tuple[str, str, str, str | None]


def encode(frame: Frame) -> bytes:
    data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class FrameParser:
    """Frames out of the bytes read from the channel, however they were cut: one read takes every frame
    that has arrived (a stream's tokens come in bursts), not two awaits per frame."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        start = 0
        while len(buffer) - start >= HEADER.size:
            size, = HEADER.unpack_from(buffer, start)
            if size > MAX_FRAME:
                raise LaasError(f"a runner frame of {size} bytes is over the limit of {MAX_FRAME}")
            end = start + HEADER.size + size
            if end > len(buffer):
                break
            with memoryview(buffer) as view, view[start + HEADER.size:end] as body:
                frame = pickle.loads(body)
            if not isinstance(frame, tuple) or not frame:
                raise LaasError(f"a runner sent a malformed frame: {type(frame).__name__}")
            frames.append(frame)
            start = end
        del buffer[:start]
        return frames


async def read_frames(reader: asyncio.StreamReader, parser: FrameParser) -> list[Frame] | None:
    """The frames that have arrived (waiting for at least one), or None when the other end has closed
    the channel (or died)."""
    while True:
        try:
            data = await reader.read(READ_SIZE)
        except ConnectionError:
            return None
        if not data:
            return None
        if frames := parser.feed(data):
            return frames


class FrameProtocol(asyncio.Protocol):
    """The daemon's end of the channel: each frame goes to `handle` from the event loop's read callback as
    it arrives, with no task to wake per token. Until a handler is attached, frames wait in `first` (the
    load's reply) and a list. `closed` is done when the channel ends; `error` says why if it was a bad
    frame."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._parser = FrameParser()
        self._early: list[Frame] = []
        self._handle: Callable[[Frame], None] | None = None
        self.first: asyncio.Future[Frame | None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.error: LaasError | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._parser.feed(data)
        except LaasError as e:
            self.error = e
            assert self.transport is not None
            self.transport.close()
            return
        for frame in frames:
            if self._handle is not None:
                self._handle(frame)
            elif not self.first.done():
                self.first.set_result(frame)
            else:
                self._early.append(frame)

    def attach(self, handle: Callable[[Frame], None]) -> None:
        self._handle = handle
        for frame in self._early:
            handle(frame)
        self._early.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first.done():
            self.first.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)


class FrameWriter:
    """Writes whole frames to the channel from any thread (the runner's event loop and its engine's relay
    thread), one at a time. The socket is non-blocking (the event loop reads it): a full buffer waits
    for room, which is backpressure, never a deadlock, since the daemon's side never blocks. Once the
    channel has broken, frames are dropped: the reader learns of it on its own."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._room = select.poll()
        self._room.register(sock, select.POLLOUT)
        self.broken = False

    def send(self, frame: Frame) -> None:
        data = memoryview(encode(frame))
        with self._lock:
            self._write(data)

    def try_send(self, frame: Frame) -> bool:
        """Sends the frame where that does not wait: for the lock (another thread is writing) or for room
        in the channel. False: nothing of it was sent. (Where the channel takes only part of it, the rest
        waits for room, as `send` does: a frame is never left half written.)"""
        data = memoryview(encode(frame))
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self.broken:
                return True  # dropped, as `send` drops it
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                return False
            except OSError:
                self.broken = True
                return True
            self._write(data[sent:])
            return True
        finally:
            self._lock.release()

    def _write(self, data: memoryview) -> None:
        """With the lock held: writes all of `data`, waiting for room where the channel is full."""
        while data and not self.broken:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                self._room.poll()
                continue
            except OSError:
                self.broken = True
                return
            data = data[sent:]


# A text delta crosses as its fields' values: unpickling a frozen dataclass runs dataclasses' setstate, which
# looks up its fields each time (15% of the daemon's loop per token); the constructor does not.
_DELTA_FIELDS = tuple(f.name for f in dataclasses.fields(TextDelta))
delta_values = operator.attrgetter(*_DELTA_FIELDS)


def delta_from(values: object) -> TextDelta:
    return TextDelta(*cast(tuple[Any, ...], values))


def pack_error(error: BaseException) -> PackedError:
    if isinstance(error, LaasError):
        return type(error).__module__, type(error).__qualname__, error.message, error.field
    return "", "", f"unexpected error in the runner: {error!r}", None


def unpack_error(packed: PackedError) -> LaasError:
    """The LaasError the runner raised, as its own class; an error of no known class becomes a LaasError
    (INTERNAL: a bug)."""
    module, name, message, field = packed
    cls: object = None
    if module.startswith("laas."):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
    if isinstance(cls, type) and issubclass(cls, LaasError):
        try:
            return cls(message, field=field)
        except TypeError:  # a subclass with a constructor of its own
            pass
    return LaasError(message, field=field)
