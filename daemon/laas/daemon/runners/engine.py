"""RunnerEngine: the daemon's face of an engine that runs in a runner process (child.py).

Layer: infrastructure. It starts the runner with the daemon's own interpreter, hands it the model to load,
and forwards every Engine method over the channel by name (frames.py): calls wait for their result,
streams relay their chunks, and closing a stream sends a cancel and waits for the runner's engine to
have stopped its sequence (within one decode step), as an in-process engine does. A method another change
adds to the Engine interface is forwarded as a call with no change here (see the end of this module).

The runner dying (a signal, an exit, the channel breaking) ends every call and stream on it with
EngineCrashed (UNAVAILABLE) and its cause (causes.py: "llama.cpp aborted: GGML_ASSERT(...)"), and
tells whoever registered with on_failure (the model registry marks the model FAILED; the next request
starts a new runner). Unloading the model is the runner's exit: aclose() asks it to close its engine and
waits for it, then kills it if it does not go.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from laas.core.engine import Engine
from laas.core.errors import EngineCrashed, LaasError, ModelLoadError
from laas.core.types import ChatMessage, GenerationChunk, GenerationRequest, ModelInfo, Tool
from laas.daemon.backends.backend import Described
from laas.daemon.memory import resident_bytes
from laas.daemon.runners.causes import death_cause
from laas.daemon.runners.frames import Frame, FrameProtocol, PackedError, delta_from, encode, unpack_error
from laas.daemon.settings import ModelConfig

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 10.0  # a runner asked to close that has not exited by then is killed
STDERR_LINES = 40  # kept for the cause of a death
NATIVE = {"gguf": "llama.cpp", "onnx": "onnxruntime"}
# llama.cpp's abort runs gdb for a backtrace when it finds one: slow, and the assert line says enough.
RUNNER_ENV = {"GGML_NO_BACKTRACE": "1"}
# How long llama.cpp's OpenMP workers spin after a step before they sleep, unless the user's environment
# says (libgomp's default: 300000 spins, about 8 ms on a 2-core AMD EPYC, nearly a step). Models take turns
# under the compute lock (compute_gate.py), and a model that has just had its turn kept a core spinning
# through the next model's step: two streams on two models decoded 0.68x one model's tokens/s together,
# 1.05x at 30000 spins (bench/resident_models.py); one model alone 0.99x of the default's tokens/s at 1
# and at 4 streams (both as bench/http_vs_llama_server.py runs them, 8 alternating rounds in one run).
SPIN_ENV = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
RUNNER_SPINS = "30000"


def runner_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The runner's environment: the daemon's, with RUNNER_ENV, and the spin count where none is set."""
    spins = {} if any(name in environ for name in SPIN_ENV) else {"GOMP_SPINCOUNT": RUNNER_SPINS}
    return {**environ, **spins, **RUNNER_ENV}


@dataclass(eq=False)
class _Stream:
    queue: asyncio.Queue[tuple[str, object]] = field(default_factory=asyncio.Queue)
    ended: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def end(self, kind: str, value: object) -> None:
        self.queue.put_nowait((kind, value))
        if not self.ended.done():
            self.ended.set_result(None)


class RunnerEngine(Engine):
    """One model in a runner process. Construct with :meth:`start`."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, channel: FrameProtocol,
                 stderr: _StderrTail, native: str, info: ModelInfo,
                 stats: object) -> None:
        self._name = name
        self._proc = proc
        self._channel = channel
        assert channel.transport is not None
        self._transport = channel.transport
        self._stderr = stderr
        self._native = native
        self._info = info
        self._stats = stats
        if stats is not None:  # the batch figures the metrics read (GGUF), as the engine itself offers them
            self.stats = self._latest_stats
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[object]] = {}
        self._streams: dict[int, _Stream] = {}
        self._failure_callbacks: list[Callable[[str], None]] = []
        self._closing = False
        self.cause = ""  # why the runner died; "" while it lives (or after a clean close)
        self._reading = asyncio.create_task(self._watch(), name=f"runner-{name}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    async def start(cls, name: str, path: Path, described: Described, config: ModelConfig, threads: int, *,
                    cache: Path | None = None, gate: Path | None = None) -> RunnerEngine:
        """Starts a runner and has it load the model; raises the load's error (ModelLoadError), or
        EngineCrashed with the cause when the runner dies while loading. `cache`, `gate`: the daemon's (Shared)."""
        ours, theirs = socket.socketpair()
        native = NATIVE.get(config.format, config.format)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "laas.daemon.runners.child", "--fd", str(theirs.fileno()),
                "--parent", str(os.getpid()), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=(theirs.fileno(),), env=runner_env(os.environ))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        assert proc.stderr is not None
        stderr = _StderrTail(proc.stderr, name, proc.pid)
        try:
            transport, channel = await asyncio.get_running_loop().create_unix_connection(FrameProtocol, sock=ours)
            transport.write(encode(("load", path, described, config, threads, cache, gate)))
            reply = await channel.first
            if reply is None or reply[0] != "loaded":
                transport.close()
                code = await proc.wait()
                await stderr.finished()
                if reply is not None and reply[0] == "failed":
                    raise unpack_error(cast(PackedError, reply[1]))
                cause = death_cause(code, stderr.lines, native)
                raise EngineCrashed(f"the runner of model {name!r} died while loading it: {cause}")
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await stderr.finished()
            raise
        _, info, runtime, stats = reply
        if runtime:
            log.info("%s", runtime)
        log.info("model %s runs in runner pid %d", name, proc.pid)
        return cls(name, proc, channel, stderr, native, cast(ModelInfo, info), stats)

    # -- the Engine ----------------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._info

    def _latest_stats(self) -> object:
        return self._stats

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        return cast(Sequence[int], await self.call("tokenize", text, add_special=add_special))

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        return cast(GenerationRequest, await self.call("render_chat", tuple(messages), tuple(tools)))

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        return cast(AsyncGenerator[GenerationChunk, None], self.stream("generate", request))

    async def check_health(self) -> None:
        self._check_alive()
        await self.call("check_health")

    def on_failure(self, callback: Callable[[str], None]) -> None:
        self._failure_callbacks.append(callback)

    def resident_bytes(self) -> int | None:
        return resident_bytes(self._proc.pid) if self._proc.returncode is None else 0

    async def aclose(self) -> None:
        """Unloads: the runner closes its engine and exits (killed past CLOSE_TIMEOUT_S)."""
        if not self._closing:
            self._closing = True
            if self._proc.returncode is None and not self.cause:
                try:
                    self._send(("close",))
                    await asyncio.wait_for(self._proc.wait(), CLOSE_TIMEOUT_S)
                except (TimeoutError, ConnectionError, RuntimeError):
                    log.warning("runner of model %s (pid %d) did not close; killing it", self._name, self.pid)
            if self._proc.returncode is None:
                self._proc.kill()
            await self._proc.wait()
        await self._reading
        await self._stderr.finished()

    # -- forwarding by name ----------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.cause:
            raise EngineCrashed(f"model {self._name!r}: {self.cause}")
        if self._closing:
            raise ModelLoadError("engine is closed")

    def _send(self, frame: Frame) -> None:
        if self._transport.is_closing():
            raise ConnectionError("the runner's channel is closed")
        self._transport.write(encode(frame))

    async def call(self, method: str, *args: object, **kwargs: object) -> object:
        """Calls the runner's engine's coroutine method `method` and returns its result (or raises its
        error). A caller that gives up does not stop the work in the runner; it ends with the runner."""
        self._check_alive()
        ident = next(self._ids)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._calls[ident] = future
        try:
            self._send(("call", ident, method, args, kwargs))
            return await future
        finally:
            self._calls.pop(ident, None)

    async def stream(self, method: str, *args: object, **kwargs: object) -> AsyncGenerator[object, None]:
        """Relays the runner's engine's async generator `method`. Closing this one stops that one."""
        self._check_alive()
        ident = next(self._ids)
        stream = self._streams[ident] = _Stream()
        try:
            self._send(("stream", ident, method, args, kwargs))
            while True:
                kind, value = await stream.queue.get()
                if kind == "item":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise cast(LaasError, value)
        finally:
            if not stream.ended.done() and not self.cause:
                try:
                    self._send(("cancel", ident))
                except ConnectionError:
                    pass
                else:
                    await _wait_through_cancellation(stream.ended)
            self._streams.pop(ident, None)

    # -- the channel: frames from the runner, and its end -------------------------------------------

    async def _watch(self) -> None:
        self._channel.attach(self._handle)
        await self._channel.closed
        if self._channel.error is not None:
            log.error("runner of model %s: %s", self._name, self._channel.error)
        self._transport.close()
        code = await self._proc.wait()
        await self._stderr.finished()
        if self._closing:  # closed (or killed after a close that did not finish): not a crash
            self._fail_all(ModelLoadError("engine is closed"))
            return
        self.cause = death_cause(code, self._stderr.lines, self._native)
        log.error("runner of model %s (pid %d) died: %s", self._name, self.pid, self.cause)
        self._fail_all(EngineCrashed(f"model {self._name!r} stopped: {self.cause}"))
        for callback in self._failure_callbacks:
            try:
                callback(self.cause)
            except Exception:
                log.exception("a runner failure callback failed")

    def _handle(self, frame: Frame) -> None:
        kind = frame[0]
        if kind == "delta":  # the most frequent: a stream's text
            _, ident, values, decoded = frame
            self.decoded_tokens = cast(int, decoded)
            stream = self._streams.get(cast(int, ident))
            if stream is not None:
                stream.queue.put_nowait(("item", delta_from(values)))
        elif kind == "item":
            _, ident, item, decoded = frame
            self.decoded_tokens = cast(int, decoded)
            stream = self._streams.get(cast(int, ident))
            if stream is not None:
                stream.queue.put_nowait(("item", item))
        elif kind == "end":
            _, ident, decoded = frame
            self.decoded_tokens = cast(int, decoded)
            if (stream := self._streams.get(cast(int, ident))) is not None:
                stream.end("end", None)
        elif kind == "error":
            _, ident, packed, decoded = frame
            self.decoded_tokens = cast(int, decoded)
            error = unpack_error(cast(PackedError, packed))
            if (stream := self._streams.get(cast(int, ident))) is not None:
                stream.end("error", error)
            elif (future := self._calls.get(cast(int, ident))) is not None and not future.done():
                future.set_exception(error)
        elif kind == "result":
            _, ident, value = frame
            if (future := self._calls.get(cast(int, ident))) is not None and not future.done():
                future.set_result(value)
        elif kind == "stats":
            _, decoded, self._stats = frame
            self.decoded_tokens = cast(int, decoded)

    def _fail_all(self, error: LaasError) -> None:
        for stream in list(self._streams.values()):
            stream.end("error", error)
        for future in list(self._calls.values()):
            if not future.done():
                future.set_exception(error)


async def _wait_through_cancellation(future: asyncio.Future[None]) -> None:
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue


class _StderrTail:
    """Reads the runner's stderr: each line goes to the daemon's log, the last ones are kept for a cause."""

    def __init__(self, stream: asyncio.StreamReader, name: str, pid: int) -> None:
        self.lines: deque[str] = deque(maxlen=STDERR_LINES)
        self._task = asyncio.create_task(self._read(stream, name, pid), name=f"runner-stderr-{name}")

    async def _read(self, stream: asyncio.StreamReader, name: str, pid: int) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the reader's limit: take it in pieces
                line = await stream.read(1 << 16)
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self.lines.append(text)
            log.info("runner %s (pid %d): %s", name, pid, text)

    async def finished(self) -> None:
        await self._task


def _forwarder(method: str) -> Callable[..., Any]:
    async def forward(self: RunnerEngine, *args: object, **kwargs: object) -> object:
        return await self.call(method, *args, **kwargs)

    forward.__name__ = method
    return forward


# Every other coroutine method of the Engine interface (embed; one that another change adds, abstract or with
# a default) is forwarded by name to the runner's engine, which answers it (or raises its default's error).
# A new streaming method needs a line like generate's, through stream().
for _method, _member in inspect.getmembers(Engine, inspect.iscoroutinefunction):
    if not _method.startswith("_") and _method not in vars(RunnerEngine):
        setattr(RunnerEngine, _method, _forwarder(_method))
abc.update_abstractmethods(RunnerEngine)
