"""The one thread that runs llama_decode for every GGUF model of a process (why one: see DecodeLoop).

Layer: infrastructure. Owned by the composition root (the Server), which stops it on shutdown.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol, TypeVar

from laas.core.errors import ModelLoadError
from laas.daemon.backends.compute_gate import ComputeGate

T = TypeVar("T")


class Steppable(Protocol):
    """A scheduler as the loop sees it (batching.Scheduler)."""

    closing: bool

    def has_work(self) -> bool: ...

    def run_once(self) -> None: ...


class DecodeLoop:
    """The one thread that runs every model's scheduler, a step each in turn.

    llama.cpp computes with OpenMP, and OpenMP gives each thread that starts parallel work a team of its
    own: with a thread per loaded model, two models that have decoded mean two teams, more threads than
    cores, and libgomp then puts its workers to sleep between parallel regions instead of spinning: every
    decode of every model got 30-45% slower (measured on 2 cores). One thread keeps one team; the steps
    of different models take turns, and no step waits for a hand-over to another thread.

    Native work outside a scheduler that computes (the step timings a model takes when it loads) runs here
    too (`call`), for the same reason: one decode in a loader thread, and that thread's team halved the
    decode speed of the model it loaded, for as long as it served.

    Whoever creates it owns it: the daemon's Server makes one for all its engines and stops it on shutdown;
    an engine loaded without one (tests, `laas eval`) makes its own and stops it when closed. The thread
    starts with the first scheduler; stop() ends the schedulers still in it and joins the thread.

    Each step and each call holds the daemon's compute lock at `gate` (compute_gate.py), so that loops
    in other processes (another model's runner) take turns with this one; None: no lock.
    """

    def __init__(self, gate: Path | None = None) -> None:
        self._gate = ComputeGate.open(gate)
        self.cond = threading.Condition()  # guards every scheduler's pending queue and closing flag
        self._schedulers: list[Steppable] = []
        self._calls: list[tuple[Callable[[], object], Future[object]]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    def add(self, scheduler: Steppable) -> None:
        with self.cond:
            self._start()
            self._schedulers.append(scheduler)

    def call(self, work: Callable[[], T]) -> T:
        """Runs `work` in the loop's thread, between steps, and returns what it returns (or raises what it
        raises). Blocks: call it off the event loop, never from the loop's own thread."""
        done: Future[object] = Future()
        with self.cond:
            self._start()
            self._calls.append((work, done))
            self.cond.notify_all()
        return done.result()  # type: ignore[return-value]

    def _start(self) -> None:
        """With the lock held: refuses a stopped loop; starts the thread where it is not running."""
        if self._stopping:
            raise ModelLoadError("the decode loop is stopped")
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._main, name="llama-decode", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Closes the schedulers still in the loop (their streams end with an error), then joins the thread.
        Blocks: call it off the event loop. Engines closed afterwards find their scheduler already gone."""
        with self.cond:
            self._stopping = True
            for scheduler in self._schedulers:
                scheduler.closing = True
            calls, self._calls = self._calls, []
            self.cond.notify_all()
            thread = self._thread
        for _, done in calls:
            done.set_exception(ModelLoadError("the decode loop is stopped"))
        if thread is not None:
            thread.join()
        self._gate.close()

    def _main(self) -> None:
        while True:
            with self.cond:
                while not (ready := [s for s in self._schedulers if s.has_work()]) and not self._calls:
                    if self._stopping:
                        return
                    self.cond.wait()
                for gone in (s for s in ready if s.closing):
                    self._schedulers.remove(gone)
                calls, self._calls = self._calls, []
            for work, done in calls:
                try:
                    with self._gate:
                        result = work()
                except BaseException as e:  # the caller raises it
                    done.set_exception(e)
                else:
                    done.set_result(result)
            for scheduler in ready:
                with self._gate:
                    scheduler.run_once()
