"""The lock a decode step holds, so that the models of one daemon compute in turns, never at once.

Layer: infrastructure. Each model runs in a runner process of its own (runners/), with a decode thread
and a native thread team (llama.cpp's OpenMP team, onnxruntime's pool) as wide as the threads setting:
the cores. Two models decoding at once put twice as many spinning threads on the cores as there are, and
a team's barrier then waits for a descheduled peer, op after op: two streams on two models decoded 40
tok/s together where one decoded 110 (measured on 2 cores), and a model loading while another streamed
timed its steps several times too slow. Taking turns a step at a time keeps each team on the cores alone.

The lock is an flock(2) on a file in the daemon's home: each process opens the file itself (a lock
belongs to an open file description), and the kernel drops it when its holder dies, so a crashed runner
never leaves the others waiting. Held by one model only, it costs two system calls a step.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

FILE = "compute.lock"  # in the daemon's home


class ComputeGate:
    """The daemon's compute lock as one process takes it (`with gate:` around a step). Its threads take
    turns too: a lock of the process's own comes first (an flock is its open file's, whichever thread)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd  # None: the file could not be opened, and the steps run ungated
        self._threads = threading.Lock()

    @classmethod
    def open(cls, path: Path | None) -> ComputeGate:
        """The gate on the lock file at `path`; None, or a file that cannot be opened, gives an open gate
        (steps are not held back: a warning says why where it was asked for)."""
        if path is None:
            return cls(None)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return cls(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as e:
            log.warning("models will not take turns to compute: cannot open %s: %s", path, e)
            return cls(None)

    def __enter__(self) -> None:
        if self._fd is not None:
            self._threads.acquire()
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._threads.release()
                raise

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._threads.release()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
