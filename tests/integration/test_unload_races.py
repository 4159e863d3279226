"""A model is never freed under a native call: tokenizing (Tokenize, the router's planning) racing an
unload (keep_alive_s=0, UnloadModel) leaves the daemon serving, not dead in libllama (issue #13, item 1)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from laas.client import Client, DeadlineExceeded, LaasError
from tests.daemon_process import DaemonProcess

# About 1 MB of words: llama_tokenize takes about a second on it, far longer than the deadlines below.
LONG_TEXT = "hello world " * 87_000


def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _alive(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, f"laasd died:\n{daemon.log[-4000:]}"


def test_a_timed_out_tokenize_then_an_unloading_request_leaves_the_daemon_serving(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    with Client(daemon.target) as client:
        for _ in range(3):
            with pytest.raises(DeadlineExceeded):
                client.tokenize(LONG_TEXT, timeout=0.3)
            result = client.complete("hi", max_tokens=1, keep_alive_s=0, temperature=0)
            assert result.completion_tokens == 1
            client.unload_model()  # deferred while the abandoned tokenization still runs
            _until(lambda: client.model().state == "not_loaded")  # unloaded once it ended
            _alive(daemon)
            assert len(client.tokenize("hello world")) == 2  # loads again
    assert daemon.stop() == 0, daemon.log


def test_long_prompts_beside_unloading_requests_and_a_load_unload_loop(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    deadline = time.monotonic() + 12.0  # the daemon died within 1-11 s of this before the fix

    def hammer(work: Callable[[Client], object]) -> int:
        done = 0
        with Client(daemon.target) as client:
            while time.monotonic() < deadline and done < 300 and daemon.proc is not None \
                    and daemon.proc.poll() is None:
                with contextlib.suppress(LaasError):  # deadlines, a model unloaded meanwhile: any but a crash
                    work(client)
                done += 1
        return done

    workers: list[Callable[[Client], object]] = [
        lambda c: c.complete(LONG_TEXT[:400_000], max_tokens=1, timeout=0.3),
        lambda c: c.tokenize(LONG_TEXT, timeout=0.2),
        lambda c: c.complete("hi", max_tokens=1, keep_alive_s=0, temperature=0, timeout=10),
        lambda c: (c.load_model(timeout=10), c.unload_model(timeout=10)),
    ]
    with ThreadPoolExecutor(len(workers)) as pool:
        counts = [f.result(timeout=120) for f in [pool.submit(hammer, w) for w in workers]]
    _alive(daemon)
    assert min(counts) > 0
    with Client(daemon.target) as client:
        assert client.complete("hi", max_tokens=2, temperature=0).completion_tokens == 2
    assert daemon.stop() == 0, daemon.log
