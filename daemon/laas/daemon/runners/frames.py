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
import importlib
import pickle
import struct

from laas.core.errors import LaasError

HEADER = struct.Struct("!I")
MAX_FRAME = 256 << 20  # a frame is a message or a chunk; a model's metadata (its vocabulary) is the largest

Frame = tuple[object, ...]
PackedError = tuple[str, str, str, str | None]


def encode(frame: Frame) -> bytes:
    data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None when the other end has closed the channel (or died)."""
    try:
        size, = HEADER.unpack(await reader.readexactly(HEADER.size))
        if size > MAX_FRAME:
            raise LaasError(f"a runner frame of {size} bytes is over the limit of {MAX_FRAME}")
        frame = pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    if not isinstance(frame, tuple) or not frame:
        raise LaasError(f"a runner sent a malformed frame: {type(frame).__name__}")
    return frame


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
