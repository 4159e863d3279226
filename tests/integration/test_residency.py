"""Model residency through the real daemon: load on first use, keep-alive, LRU eviction within a
memory budget, never under a running stream, LoadModel/UnloadModel, residency in GetModel and metrics."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from laas.client import Client, InvalidArgument, LaasError, NotFound, ResourceExhausted
from laas.daemon.backends.gguf_format import gguf_memory
from laas.daemon.gguf_header import read_gguf_header
from laas.daemon.memory import MiB, resident_bytes
from laas.daemon.store import DEFAULT_MODEL
from laas.v1 import runtime_pb2 as pb
from laas.v1 import runtime_pb2_grpc as pb_grpc
from tests.daemon_process import DaemonProcess

CTX = 512
PROMPT = "The three primary colors are"


def _config(need: int, budget_models: float, extra: str = "") -> str:
    """Models a and b: the default model's file under two names; a budget of `budget_models` of them."""
    models = "".join(f'[[models]]\nname = "{n}"\npath = "{DEFAULT_MODEL.filename}"\ncontext_length = {CTX}\n'
                     for n in ("a", "b"))
    return f'default_model = "a"\nmemory_budget_mb = {int(need * budget_models / MiB)}\n{extra}\n{models}'


@pytest.fixture(scope="module")
def need(model_file: object) -> int:
    return gguf_memory(read_gguf_header(model_file), CTX)  # type: ignore[arg-type]


def _stats(target: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.RuntimeStub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in reply.samples}


def _tree_rss(pid: int) -> int:
    """The resident memory of a process and its descendants (the daemon and its model runners)."""
    total = resident_bytes(pid)
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(_tree_rss(int(child)) for child in children)
    return total


def _until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_model_loads_on_first_use_and_evicts_the_idle_one(start_daemon: Callable[..., DaemonProcess],
                                                            need: int) -> None:
    daemon = start_daemon(_config(need, 1.5))
    with Client(daemon.target) as client:
        models = {m.name: m for m in client.models()}
        a, b = models["a"], models["b"]
        assert (a.state, b.state) == ("ready", "not_loaded")
        # The estimate, or the runner's resident memory when that is more (runners/, the default): the
        # runner's own interpreter and libraries (about 50 MiB), and the buffers that speculation's step
        # timing at load (decodes of up to 49 tokens) touches, as a first long request would.
        assert need <= a.memory_bytes < need + (128 << 20) and b.memory_bytes == 0
        assert b.context_length == CTX and b.size_bytes == a.size_bytes  # from the header, before loading
        assert 290 < a.unloads_in_s <= 300 and a.keep_alive_s == 300
        first = client.complete(PROMPT, model="b", max_tokens=8, temperature=0, ignore_eos=True)
        assert first.completion_tokens == 8 and first.timings["load_ms"] > 0
        models = {m.name: m for m in client.models()}
        assert (models["a"].state, models["b"].state) == ("not_loaded", "ready")  # 1.5 models fit: a made room
        assert models["b"].last_used_unix_s == pytest.approx(time.time(), abs=30)
        again = client.complete(PROMPT, model="a", max_tokens=8, temperature=0, ignore_eos=True)
        assert again.text == first.text and again.timings["load_ms"] > 0  # same file, same greedy text
        warm = client.complete(PROMPT, model="a", max_tokens=8, temperature=0, ignore_eos=True)
        assert warm.timings["load_ms"] == 0
    stats = _stats(daemon.target)
    assert stats[("laas_model_loads_total", (("model", "a"),))] == 2
    assert stats[("laas_model_loads_total", (("model", "b"),))] == 1
    assert stats[("laas_model_unloads_total", (("model", "a"), ("reason", "evicted")))] == 1
    assert stats[("laas_model_unloads_total", (("model", "b"), ("reason", "evicted")))] == 1
    assert stats[("laas_model_memory_bytes", (("model", "a"),))] >= need
    assert stats[("laas_memory_budget_bytes", ())] == int(need * 1.5 / MiB) * MiB
    assert "model b ready" in daemon.log and "model a unloaded (evicted)" in daemon.log


def test_a_busy_model_is_never_unloaded_under_its_stream(start_daemon: Callable[..., DaemonProcess],
                                                         need: int) -> None:
    daemon = start_daemon(_config(need, 1.5))
    with Client(daemon.target) as client:
        stream = client.generate(PROMPT, model="a", max_tokens=200, temperature=0, ignore_eos=True)
        chunks = [next(stream)]
        with pytest.raises(ResourceExhausted) as info:
            client.complete(PROMPT, model="b", max_tokens=4)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.field == "model"
        assert "busy models hold the rest ('a')" in str(info.value)
        assert client.model("b").state == "not_loaded" and not client.model("b").error
        chunks += list(stream)  # the stream in flight is whole
        assert chunks[-1].completion_tokens == 200 and chunks[-1].finish_reason == "length"
        assert client.complete(PROMPT, model="b", max_tokens=4).completion_tokens == 4  # a is idle now
        assert client.model("a").state == "not_loaded"


def test_keep_alive_unloads_an_idle_model_and_frees_its_memory(start_daemon: Callable[..., DaemonProcess],
                                                               need: int) -> None:
    daemon = start_daemon(_config(need, 3))
    assert daemon.proc is not None
    pid = daemon.proc.pid
    with Client(daemon.target) as client:
        before = client.complete(PROMPT, model="b", max_tokens=12, temperature=0, keep_alive_s=-1)
        loaded_rss = _tree_rss(pid)
        assert client.model("b").keep_alive_s == -1 and client.model("b").unloads_in_s == 0
        client.complete(PROMPT, model="b", max_tokens=1, keep_alive_s=0.5)  # the last request's keep-alive wins
        _until(lambda: client.model("b").state == "not_loaded")
        # the weights and KV cache go back to the system (with runners, the default: when b's runner has exited)
        _until(lambda: _tree_rss(pid) < loaded_rss - 50 * MiB)
        assert client.model("a").state == "ready"  # its own keep-alive (300 s) runs on
        after = client.complete(PROMPT, model="b", max_tokens=12, temperature=0)
        assert after.text == before.text and after.timings["load_ms"] > 0
    assert "model b unloaded (idle)" in daemon.log


def test_load_and_unload_model_rpcs(start_daemon: Callable[..., DaemonProcess], need: int) -> None:
    daemon = start_daemon(_config(need, 3))
    with Client(daemon.target) as client:
        loaded = client.load_model("b", keep_alive_s=-1)
        assert loaded.state == "ready" and loaded.loaded and loaded.memory_bytes >= need and loaded.keep_alive_s == -1
        idle = client.unload_model("b")
        assert idle.state == "not_loaded" and idle.memory_bytes == 0
        stream = client.generate(PROMPT, model="a", max_tokens=60, temperature=0, ignore_eos=True)
        chunks = [next(stream)]
        pending = client.unload_model("a")  # busy: unloads when the stream ends, not under it
        assert pending.state == "ready" and pending.keep_alive_s == 0 and pending.active_requests == 1
        chunks += list(stream)
        assert chunks[-1].completion_tokens == 60
        _until(lambda: client.model("a").state == "not_loaded")
        with pytest.raises(NotFound) as missing:
            client.load_model("nope")
        assert missing.value.field == "name"
        with pytest.raises(InvalidArgument) as bad:
            client.load_model("a", keep_alive_s=float("nan"))
        assert bad.value.field == "keep_alive_s"
        with pytest.raises(InvalidArgument) as bad:
            client.complete("Hi", model="a", max_tokens=1, keep_alive_s=float("inf"))
        assert bad.value.field == "keep_alive_s"
        assert client.complete("Hi", model="a", max_tokens=2).completion_tokens == 2  # loads again on use
    assert "model b unloaded (admin)" in daemon.log and "model a unloaded (admin)" in daemon.log


def test_preload_none_serves_at_once_and_loads_on_first_use(start_daemon: Callable[..., DaemonProcess],
                                                            need: int) -> None:
    daemon = start_daemon(_config(need, 3, 'preload = "none"'))
    with Client(daemon.target) as client:
        assert daemon.health() == "SERVING"
        assert {m.state for m in client.models()} == {"not_loaded"}
        results: list[object] = []

        def ask() -> None:
            try:
                results.append(client.complete(PROMPT, max_tokens=6, temperature=0, ignore_eos=True).text)
            except LaasError as e:  # pragma: no cover - reported by the assertion below
                results.append(e)

        threads = [threading.Thread(target=ask) for _ in range(3)]  # all wait for one load
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 3 and len(set(map(str, results))) == 1 and isinstance(results[0], str)
    assert _stats(daemon.target)[("laas_model_loads_total", (("model", "a"),))] == 1


def test_the_cli_loads_lists_and_unloads(start_daemon: Callable[..., DaemonProcess], need: int) -> None:
    daemon = start_daemon(_config(need, 3))

    def laas(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "laas.client.cli", "--target", daemon.target, *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert laas("load", "b", "--keep-alive", "-1").strip() == "b: ready (kept loaded)"
    listing = {line.split()[0]: line for line in laas("models").splitlines()[1:]}
    assert re.search(r"ready \(unloads in (4m5\d|5m00)s\)", listing["a*"])
    _size, memory = re.findall(r"(\d+\.\d)MB", listing["a*"])  # memory: the estimate, or its runner's RSS if more
    assert float(memory) >= round(need / 1e6, 1), listing["a*"]
    assert "ready (kept loaded)" in listing["b"]
    assert laas("unload", "b").strip() == "b: not_loaded"
    assert laas("generate", "Hi", "-m", "b", "-n", "2", "--keep-alive", "0") is not None
    _until(lambda: "not_loaded" in laas("models").splitlines()[2])
