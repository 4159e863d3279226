"""The runner: one model's engine in a process of its own (`python -m laas.daemon.runners.child`).

Layer: infrastructure. The daemon starts it (supervisor.py) with one end of a socket pair as `--fd`. It
dies with the daemon (PR_SET_PDEATHSIG, and a check that the daemon is still its parent), ignores
SIGINT and SIGTERM (a terminal's Ctrl-C and systemd's stop reach the whole group: the daemon drains
its streams first, then closes the runner), loads the engine with the format's own `load`, and serves
it over the channel until told to close or the channel ends.

Frames, daemon -> runner: ("load", path, described, config, threads, cache, gate); ("call", id, method, args, kwargs);
("stream", id, method, args, kwargs); ("cancel", id); ("close",).
Runner -> daemon: ("loaded", info, runtime line, stats) or ("failed", error); ("result", id, value);
("delta", id, text delta's field values, decoded_tokens) (from the engine's decode or relay thread);
("item", id, chunk, decoded_tokens); ("end", id, decoded_tokens); ("error", id, error, decoded_tokens);
("stats", decoded_tokens, stats); ("closed",).
Methods are called by name, so an engine method another change adds is served with no change here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from laas.core.engine import Engine
from laas.core.types import Completion, TextDelta
from laas.daemon.backends.backend import Described, Shared
from laas.daemon.backends.loader import backend_for
from laas.daemon.backends.slot_scheduler import relay_sink
from laas.daemon.runners.frames import (
    Frame,
    FrameParser,
    FrameWriter,
    delta_values,
    pack_error,
    read_frames,
)
from laas.daemon.settings import ModelConfig

log = logging.getLogger("laas.runner")

PR_SET_PDEATHSIG = 1
STATS_INTERVAL_S = 0.1  # while streams run: how often the daemon learns the decoded-token count


def die_with_parent(parent: int) -> None:
    """SIGKILL when the daemon dies (Linux); exits now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


class _DeltaFrames:
    """A stream's text deltas as frames on the channel, from the engine's threads (slot_scheduler.DeltaSink)."""

    def __init__(self, writer: FrameWriter, ident: int, engine: Engine) -> None:
        self._writer = writer
        self._ident = ident
        self._engine = engine

    def _frame(self, delta: TextDelta) -> Frame:
        return "delta", self._ident, delta_values(delta), self._engine.decoded_tokens

    def try_send(self, delta: TextDelta) -> bool:
        return self._writer.try_send(self._frame(delta))

    def send(self, delta: TextDelta) -> None:
        self._writer.send(self._frame(delta))


class Runner:
    def __init__(self, reader: asyncio.StreamReader, writer: FrameWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._engine: Engine | None = None
        self._streams: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy = asyncio.Event()  # a stream runs: the stats go out every STATS_INTERVAL_S

    def _send(self, frame: Frame) -> None:
        self._writer.send(frame)

    @property
    def engine(self) -> Engine:
        assert self._engine is not None
        return self._engine

    async def serve(self) -> None:
        parser = FrameParser()
        frames = await read_frames(self._reader, parser)
        if frames is None or frames[0][0] != "load":
            return
        _, path, described, config, threads, cache, gate = frames[0]
        try:
            self._engine = await self._load(cast(Path, path), cast(Described, described), cast(ModelConfig, config),
                                            cast(int, threads), cast(Path | None, cache),
                                            cast(Path | None, gate))
        except Exception as e:
            self._send(("failed", pack_error(e)))
            return
        runtime = self._runtime(cast(ModelConfig, config), cast(int, threads))
        self._send(("loaded", self.engine.info, runtime, self._stats()))
        self._spawn(self._report_stats())
        try:
            await self._dispatch(parser, frames[1:])
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.engine.aclose()
        self._send(("closed",))

    async def _load(self, path: Path, described: Described, config: ModelConfig, threads: int,
                    cache: Path | None, gate: Path | None) -> Engine:
        return await backend_for(config).load(path, described, config, threads, Shared(cache=cache, gate=gate))

    def _runtime(self, config: ModelConfig, threads: int) -> str:
        """The native runtime's line for the daemon's log (its version and build)."""
        backend = backend_for(config)
        return backend.runtime(threads) if backend.runtime is not None else ""

    async def _dispatch(self, parser: FrameParser, frames: list[Frame]) -> None:
        """Acts on `frames` (what came with the load), then on every frame read, until the close."""
        while True:
            for frame in frames:
                if not self._handle(frame):
                    return
            if (read := await read_frames(self._reader, parser)) is None:
                return
            frames = read

    def _handle(self, frame: Frame) -> bool:
        """Acts on one frame from the daemon; False for the close."""
        kind = frame[0]
        if kind == "call":
            _, ident, name, args, kwargs = frame
            self._spawn(self._call(cast(int, ident), cast(str, name), cast(tuple[Any, ...], args),
                                   cast(dict[str, Any], kwargs)))
        elif kind == "stream":
            _, ident, name, args, kwargs = frame
            sid = cast(int, ident)
            stream = self._spawn(self._stream(sid, cast(str, name), cast(tuple[Any, ...], args),
                                            cast(dict[str, Any], kwargs)))
            self._streams[sid] = stream
            self._busy.set()
            stream.add_done_callback(functools.partial(self._cancelled_early, sid))
        elif kind == "cancel":
            cancelled = self._streams.get(cast(int, frame[1]))
            if cancelled is not None:
                cancelled.cancel()
        elif kind == "close":
            return False
        return True

    def _cancelled_early(self, ident: int, task: asyncio.Task[None]) -> None:
        """A stream cancelled in the same read as it came (before its task ran) still ends."""
        if task.cancelled():
            self._forget(ident)
            self._send(("end", ident, self.engine.decoded_tokens))

    def _forget(self, ident: int) -> None:
        self._streams.pop(ident, None)
        if not self._streams:
            self._busy.clear()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _call(self, ident: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        method = cast(Callable[..., Awaitable[object]], getattr(self.engine, name))
        try:
            result = await method(*args, **kwargs)
        except Exception as e:
            self._send(("error", ident, pack_error(e), self.engine.decoded_tokens))
            return
        self._send(("result", ident, result))

    async def _stream(self, ident: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        engine = self.engine

        # In this task's own context: the engine's threads write its deltas, and this loop does no work per token.
        relay_sink.set(_DeltaFrames(self._writer, ident, engine))
        try:
            method = cast(Callable[..., AsyncGenerator[object, None]], getattr(engine, name))
            async with contextlib.aclosing(method(*args, **kwargs)) as stream:
                async for item in stream:
                    if isinstance(item, Completion):  # the figures are current when the caller sees the end
                        self._send(("stats", engine.decoded_tokens, self._stats()))
                    self._send(("item", ident, item, engine.decoded_tokens))
        except asyncio.CancelledError:
            pass  # the daemon closed the stream: the engine's generator has stopped its sequence
        except Exception as e:
            self._send(("error", ident, pack_error(e), engine.decoded_tokens))
            return
        finally:
            self._forget(ident)
        self._send(("end", ident, engine.decoded_tokens))

    def _stats(self) -> object:
        stats = getattr(self.engine, "stats", None)
        return stats() if callable(stats) else None

    async def _report_stats(self) -> None:
        """The decoded-token count (the liveness check and the contract suite read it) and the engine's batch
        figures (metrics), sent while they change."""
        last: tuple[int, object] = (-1, None)
        while True:
            await self._busy.wait()
            while True:  # until the figures stop changing once no stream runs
                now = (self.engine.decoded_tokens, self._stats())
                if now != last:
                    self._send(("stats", *now))
                    last = now
                elif not self._busy.is_set():
                    break
                await asyncio.sleep(STATS_INTERVAL_S)


async def _main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)  # reads; FrameWriter writes (any thread)
    try:
        await Runner(reader, FrameWriter(sock)).serve()
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="laas runner: one model's engine, served to the daemon")
    parser.add_argument("--fd", type=int, required=True, help="this end of the daemon's socket pair")
    parser.add_argument("--parent", type=int, required=True, help="the daemon's pid")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.dup2(2, 1)  # anything a native library prints goes to stderr (the daemon's log), never elsewhere
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args.fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
