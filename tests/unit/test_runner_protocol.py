"""Runners' pure parts: why a runner died (causes.py), errors across the channel (frames.py), and the
residency's crash transitions (backoff, the crash-loop limit, a served request resets the count)."""

from __future__ import annotations

import asyncio
import signal

import pytest

from laas.core.errors import EngineCrashed, InvalidArgument, LaasError, OutOfRange
from laas.core.types import ModelFormat, ModelInfo
from laas.daemon.residency import ModelState, Residency
from laas.daemon.runners.causes import death_cause
from laas.daemon.runners.frames import encode, pack_error, read_frame, unpack_error

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


async def test_frames_round_trip_and_end_at_eof() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(encode(("item", 1, "text", 7)) + encode(("end", 1, 7)))
    reader.feed_eof()
    assert await read_frame(reader) == ("item", 1, "text", 7)
    assert await read_frame(reader) == ("end", 1, 7)
    assert await read_frame(reader) is None


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
