"""Runners' pure parts: why a runner died (causes.py), frames and errors across the channel (frames.py), and the
residency's crash transitions (backoff, the crash-loop limit, a served request resets the count)."""

from __future__ import annotations

import asyncio
import pickle
import signal
import socket
import threading

import pytest

from laas.core.engine import Engine
from laas.core.errors import EngineCrashed, InvalidArgument, LaasError, OutOfRange
from laas.core.types import GenerationRequest, ModelFormat, ModelInfo, SamplingParams
from laas.daemon.residency import ModelState, Residency
from laas.daemon.runners.causes import death_cause
from laas.daemon.runners.child import Runner
from laas.daemon.runners.frames import (
    HEADER,
    MAX_FRAME,
    FrameParser,
    FrameWriter,
    encode,
    pack_error,
    read_frames,
    unpack_error,
)
from tests.fakes import FakeEngine

pytestmark = pytest.mark.fast


def test_an_assert_line_is_the_cause() -> None:
    lines = ["llama_model_load: ok", "/src/ggml/src/ggml-cpu/ops.cpp:6356: GGML_ASSERT(n_dims % 2 == 0) failed"]
    assert death_cause(-signal.SIGABRT, lines, "llama.cpp") == "llama.cpp aborted: GGML_ASSERT(n_dims % 2 == 0) failed"


@pytest.mark.parametrize(("code", "words"), [
    (-signal.SIGILL, "illegal instruction (SIGILL) in llama.cpp: rebuild llama-cpp-python for this CPU, without AMX"),
    (-signal.SIGSEGV, "segmentation fault (SIGSEGV) in llama.cpp"),
    (-signal.SIGKILL, "killed (SIGKILL"),
    (-signal.SIGABRT, "llama.cpp aborted (SIGABRT)"),
    (3, "exited with status 3 (MemoryError)"),
])
def test_signals_and_exits_are_named(code: int, words: str) -> None:
    assert words in death_cause(code, ["Traceback ...", "MemoryError"], "llama.cpp")


def test_errors_cross_the_channel_with_their_class_and_field() -> None:
    error = unpack_error(pack_error(OutOfRange("prompt: too long", field="prompt")))
    assert type(error) is OutOfRange and error.field == "prompt" and str(error) == "prompt: too long"
    assert type(unpack_error(pack_error(InvalidArgument("x", field="sampling.top_p")))) is InvalidArgument
    bug = unpack_error(pack_error(ZeroDivisionError("division by zero")))
    assert type(bug) is LaasError and "ZeroDivisionError" in str(bug)
    assert type(unpack_error(("os", "system", "rm -rf", None))) is LaasError  # only laas' own classes


def test_the_parser_takes_frames_however_the_bytes_are_cut() -> None:
    frames = [("item", 1, "a" * n, n) for n in (0, 1, 300, 70_000)] + [("end", 1, 9)]
    data = b"".join(encode(f) for f in frames)
    for step in (1, 7, 4096, len(data)):
        parser = FrameParser()
        got = [f for i in range(0, len(data), step) for f in parser.feed(data[i:i + step])]
        assert got == frames


def test_the_parser_waits_for_a_body_and_refuses_an_oversized_or_malformed_frame() -> None:
    assert FrameParser().feed(encode(("end", 1, 7))[:HEADER.size + 1]) == []
    with pytest.raises(LaasError, match="over the limit"):
        FrameParser().feed(HEADER.pack(MAX_FRAME + 1))
    not_a_tuple = pickle.dumps(["end"])
    with pytest.raises(LaasError, match="malformed frame: list"):
        FrameParser().feed(HEADER.pack(len(not_a_tuple)) + not_a_tuple)


async def test_read_frames_returns_what_has_arrived_then_none_at_eof() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(encode(("item", 1, "text", 7)) + encode(("end", 1, 7)) + encode(("stats", 7, None))[:3])
    parser = FrameParser()
    assert await read_frames(reader, parser) == [("item", 1, "text", 7), ("end", 1, 7)]
    reader.feed_data(encode(("stats", 7, None))[3:])
    reader.feed_eof()
    assert await read_frames(reader, parser) == [("stats", 7, None)]
    assert await read_frames(reader, parser) is None


def test_the_writer_keeps_frames_whole_from_two_threads_past_a_full_buffer() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # as the runner's event loop leaves it
    writer = FrameWriter(ours)
    big = "x" * 300_000  # over the socket's buffer: the writer waits for room
    def write(tag: str) -> None:
        for i in range(50):
            writer.send((tag, i, big if i % 10 == 0 else "y"))
    threads = [threading.Thread(target=write, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    parser, got = FrameParser(), list[tuple[object, ...]]()
    while len(got) < 100:
        got += parser.feed(theirs.recv(1 << 16))
    for t in threads:
        t.join()
    for tag in ("a", "b"):
        assert [f[1] for f in got if f[0] == tag] == list(range(50))  # whole and in each thread's order
    theirs.close()
    writer.send(("after", 0))  # a broken channel drops the frame, raises nothing
    writer.send(("after", 1))
    assert writer.broken
    ours.close()


class _FakeRunner(Runner):
    async def _load(self, *args: object) -> Engine:
        return FakeEngine()

    def _runtime(self, *args: object) -> str:
        return "fake"


async def test_a_stream_cancelled_in_the_same_read_as_it_came_still_ends() -> None:
    """The daemon waits for a cancelled stream's end frame: a cancel that arrives with its stream, before the
    stream's task ran, must still send one; and a stream that runs sends its text, then its end."""
    ours, theirs = socket.socketpair()
    reader, _ = await asyncio.open_unix_connection(sock=theirs)
    ours.setblocking(False)
    runner = _FakeRunner(reader, FrameWriter(theirs))
    serving = asyncio.ensure_future(runner.serve())
    loop = asyncio.get_running_loop()
    parser = FrameParser()

    async def frames(until: str) -> list[tuple[object, ...]]:
        got: list[tuple[object, ...]] = []
        while not got or got[-1][0] != until:
            got += parser.feed(await asyncio.wait_for(loop.sock_recv(ours, 1 << 16), 10))
        return got

    await loop.sock_sendall(ours, encode(("load", "m.gguf", None, None, 1, None, None)))
    assert (await frames("loaded"))[-1][0] == "loaded"
    request = GenerationRequest(prompt="Hello", sampling=SamplingParams(max_tokens=3))
    await loop.sock_sendall(ours, encode(("stream", 1, "generate", (request,), {})) + encode(("cancel", 1)))
    assert [f[:2] for f in await frames("end") if f[0] != "stats"] == [("end", 1)]
    await loop.sock_sendall(ours, encode(("stream", 2, "generate", (request,), {})))
    got = [f for f in await frames("end") if f[0] != "stats"]
    assert [f[0] for f in got] == ["item"] * (len(got) - 2) + ["item", "end"] and len(got) > 2
    await loop.sock_sendall(ours, encode(("close",)))
    await asyncio.wait_for(serving, 10)
    assert (await frames("closed"))[-1] == ("closed",)
    ours.close()
    theirs.close()


def test_crashes_back_off_then_stop_until_the_file_changes() -> None:
    r = Residency(300.0)
    r.described(ModelInfo(ModelFormat.GGUF, "Q4_1", 512, 8192, 1, "llama"))
    file = ("/m.gguf", 1, 2)
    r.start_loading()
    r.crashed("llama.cpp aborted", now=10.0, backoff_s=1.0, max_crashes=3, file=file)
    assert (r.now.state, r.now.retry, r.now.restart_at, r.now.crashes) == (ModelState.FAILED, True, 11.0, 1)
    r.start_loading()
    r.crashed("again", now=20.0, backoff_s=1.0, max_crashes=3, file=file)
    assert (r.now.retry, r.now.restart_at, r.now.crashes, r.now.error) == (True, 22.0, 2, "again")
    r.start_loading()
    r.crashed("again", now=30.0, backoff_s=1.0, max_crashes=3, file=file)
    assert (r.now.retry, r.now.crashes) == (False, 3)
    r.start_loading()
    r.crashed("new file", now=40.0, backoff_s=1.0, max_crashes=3, file=("/m.gguf", 5, 2))
    assert (r.now.retry, r.now.crashes) == (True, 1)  # a changed file starts the count again
    r.served()
    assert r.now.crashes == 0


def test_engine_crashed_is_unavailable() -> None:
    assert EngineCrashed("x").code.name == "UNAVAILABLE"


def test_a_runner_spins_its_openmp_workers_briefly_unless_the_environment_says() -> None:
    from laas.daemon.runners.engine import RUNNER_SPINS, runner_env

    env = runner_env({"PATH": "/bin", "GGML_NO_BACKTRACE": "0"})
    assert env == {"PATH": "/bin", "GOMP_SPINCOUNT": RUNNER_SPINS, "GGML_NO_BACKTRACE": "1"}
    assert runner_env({"GOMP_SPINCOUNT": "infinite"})["GOMP_SPINCOUNT"] == "infinite"  # the user's, kept
    assert "GOMP_SPINCOUNT" not in runner_env({"OMP_WAIT_POLICY": "active"})  # a policy set: no count added
