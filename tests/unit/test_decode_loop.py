"""The decode loop runs native work handed to it in its own thread (one OpenMP team per process), between
its schedulers' steps, and gives back what the work returned or raised."""

from __future__ import annotations

import threading

import pytest

from laas.core.errors import ModelLoadError
from laas.daemon.backends.decode_loop import DecodeLoop


class Counter:
    """A scheduler that takes `steps` turns and records the thread that ran them."""

    closing = False

    def __init__(self, steps: int) -> None:
        self.left = steps
        self.threads: set[str] = set()
        self.done = threading.Event()

    def has_work(self) -> bool:
        return self.left > 0

    def run_once(self) -> None:
        self.threads.add(threading.current_thread().name)
        self.left -= 1
        if not self.left:
            self.done.set()


def test_work_runs_in_the_loops_thread_and_returns_or_raises() -> None:
    loop = DecodeLoop()
    try:
        assert loop.call(lambda: threading.current_thread().name) == "llama-decode"
        scheduler = Counter(3)
        loop.add(scheduler)
        assert loop.call(lambda: 42) == 42  # with a scheduler in the loop too

        def fails() -> None:
            raise ValueError("native failure")

        with pytest.raises(ValueError, match="native failure"):
            loop.call(fails)
        assert scheduler.done.wait(10) and scheduler.threads == {"llama-decode"}
        assert loop.alive  # a failed call does not end the loop
    finally:
        loop.stop()
    with pytest.raises(ModelLoadError, match="stopped"):
        loop.call(lambda: 1)
