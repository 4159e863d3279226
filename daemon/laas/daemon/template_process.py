"""The daemon's side of the chat-template worker (template_worker.py): one child process per template.

Layer: infrastructure. Each exchange has a deadline; the worker's memory (RSS) is polled while it works.
A worker that overruns either, dies or answers garbage is killed, and the exchange raises TemplateFailed;
the next exchange starts a fresh worker (and compiles the template again). Calls block: run them off the
event loop. One exchange at a time per worker (a lock); the child sees EOF and exits if the daemon dies.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, NoReturn

START_TIMEOUT_S = 30.0  # a fresh interpreter importing jinja2, on a loaded machine
POLL_S = 0.05
MAX_RSS = 1 << 30


class TemplateFailed(Exception):
    """The template's code failed, overran its budget, or the worker died."""


class TemplateRefused(Exception):
    """The template called raise_exception (it refuses the messages)."""


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _child_env() -> dict[str, str]:
    """What the worker needs to start: no secrets (API keys, tokens) from the daemon's environment."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "PYTHONHOME", "LANG", "LC_ALL")}


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


class TemplateProcess:
    def __init__(self, source: str, *, compile_timeout_s: float) -> None:
        self._source = source
        self._compile_timeout_s = compile_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._buffer = bytearray()

    def compile(self) -> None:
        """Starts the worker and compiles the template in it; raises TemplateFailed if it does not compile."""
        with self._lock:
            self._ensure()

    def render(self, context: dict[str, Any], *, limit: int, timeout_s: float) -> str:
        with self._lock:
            self._ensure()
            reply = self._exchange({"render": context, "limit": limit}, timeout_s, limit * 6 + 4096)
        if "refused" in reply:
            raise TemplateRefused(str(reply["refused"]))
        prompt = reply.get("ok")
        if not isinstance(prompt, str):
            raise TemplateFailed(f"the worker answered {str(reply)[:200]}")
        return prompt

    def close(self) -> None:
        with self._lock:
            self._stop()

    # -- the worker ---------------------------------------------------------------------------------------

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._stop()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "laas.daemon.template_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, close_fds=True, cwd="/", env=_child_env())
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        self._buffer = bytearray()
        ready = self._exchange(None, START_TIMEOUT_S, 1024)
        if ready.get("ready") is not True:
            self._fail("the worker did not start")
        try:
            self._exchange({"compile": self._source}, self._compile_timeout_s, 8192)
        except TemplateFailed as e:
            self._fail(str(e))

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            _kill(proc)

    def _fail(self, why: str) -> NoReturn:
        self._stop()
        raise TemplateFailed(why)

    def _exchange(self, request: dict[str, Any] | None, timeout_s: float, max_reply: int) -> dict[str, Any]:
        """Sends `request` (None: only read) and reads one reply line, within `timeout_s`."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        out = json.dumps(request).encode() + b"\n" if request is not None else b""
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            os.set_blocking(proc.stdout.fileno(), False)
            sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
            if out:
                os.set_blocking(proc.stdin.fileno(), False)
                sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
            while (end := self._buffer.find(b"\n")) < 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._fail(f"it ran past its time budget of {timeout_s:g} s")
                if _rss(proc.pid) > MAX_RSS:
                    self._fail(f"it used more than {MAX_RSS >> 20} MiB of memory")
                for key, _ in sel.select(min(left, POLL_S)):
                    if key.fd == proc.stdin.fileno():
                        try:
                            out = out[os.write(key.fd, out[:1 << 16]):]
                        except BlockingIOError:
                            continue
                        except OSError:
                            self._fail("the worker died")
                        if not out:
                            sel.unregister(key.fd)
                    else:
                        chunk = os.read(key.fd, 1 << 16)
                        if not chunk:
                            self._fail("the worker died (it may have run out of memory)")
                        self._buffer += chunk
                        if len(self._buffer) > max_reply:
                            self._fail("its answer is too long")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self._fail("the worker answered garbage")
        if "error" in reply:
            raise TemplateFailed(str(reply["error"]))
        return reply
