"""The daemon's compute lock: one holder at a time across opens and processes, dropped by a holder that dies,
an open gate where the file cannot be had, and a decode loop that holds it for every step and call."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from laas.daemon.backends.compute_gate import ComputeGate
from laas.daemon.backends.decode_loop import DecodeLoop

pytestmark = pytest.mark.fast


def held_elsewhere(path: Path) -> bool:
    """Whether some other open file description holds the lock at `path` now."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock this fd took
    return False


@pytest.fixture
def lock(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "run" / "compute.lock"  # its folder does not exist yet: open() makes it


def test_one_holder_at_a_time(lock: Path) -> None:
    first, second = ComputeGate.open(lock), ComputeGate.open(lock)
    assert lock.is_file() and lock.stat().st_mode & 0o777 == 0o600
    entered = threading.Event()

    def take_second() -> None:
        with second:
            entered.set()

    with first:
        assert held_elsewhere(lock)
        waiter = threading.Thread(target=take_second)
        waiter.start()
        assert not entered.wait(0.3)  # blocked while the first holds it
    assert entered.wait(10)
    waiter.join()
    assert not held_elsewhere(lock)
    first.close()
    second.close()


def test_the_threads_of_one_process_take_turns_on_one_gate(lock: Path) -> None:
    gate = ComputeGate.open(lock)
    inside: list[int] = []
    overlapped = threading.Event()

    def work(n: int) -> None:
        for _ in range(200):
            with gate:
                inside.append(n)
                if len(inside) > 1:
                    overlapped.set()
                inside.remove(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlapped.is_set() and not held_elsewhere(lock)
    gate.close()


def test_a_holder_that_dies_leaves_it_free(lock: Path) -> None:
    lock.parent.mkdir()
    code = ("import sys, pathlib; from laas.daemon.backends.compute_gate import ComputeGate\n"
            "g = ComputeGate.open(pathlib.Path(sys.argv[1])); g.__enter__(); print('held', flush=True)\n"
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    assert held_elsewhere(lock)
    proc.kill()
    proc.wait()
    gate = ComputeGate.open(lock)
    with gate:  # would block for ever were the dead holder's lock kept
        pass
    gate.close()


def test_a_file_that_cannot_be_opened_gives_an_open_gate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        gate = ComputeGate.open(blocker / "compute.lock")  # its folder is a file
    with gate:
        pass
    assert "will not take turns" in caplog.text and "compute.lock" in caplog.text
    with ComputeGate.open(None):  # none asked for: open, and nothing said
        pass


class Recorder:
    """A scheduler whose steps record whether the lock was held (by the loop) while they ran."""

    closing = False

    def __init__(self, lock: Path, steps: int) -> None:
        self.lock, self.left = lock, steps
        self.held: list[bool] = []
        self.done = threading.Event()

    def has_work(self) -> bool:
        return self.left > 0

    def run_once(self) -> None:
        self.held.append(held_elsewhere(self.lock))
        self.left -= 1
        if not self.left:
            self.done.set()


def test_the_decode_loop_holds_it_for_every_step_and_call(lock: Path) -> None:
    loop = DecodeLoop(lock)
    try:
        assert loop.call(lambda: held_elsewhere(lock)) is True
        scheduler = Recorder(lock, 5)
        loop.add(scheduler)
        loop.call(lambda: None)  # wakes the loop (a scheduler's own submissions do that)
        assert scheduler.done.wait(10)
        assert scheduler.held == [True] * 5
        loop.call(lambda: None)  # returns once the loop has let go of the lock after it
        assert not held_elsewhere(lock)  # and between steps it is free
        other = ComputeGate.open(lock)
        with other:  # while another process's loop computes, this loop's work waits
            result: list[int] = []
            caller = threading.Thread(target=lambda: result.append(loop.call(lambda: 7)))
            caller.start()
            caller.join(0.3)
            assert caller.is_alive() and not result
        caller.join(10)
        assert result == [7]
        other.close()
    finally:
        loop.stop()
