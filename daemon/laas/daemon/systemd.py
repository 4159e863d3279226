"""systemd integration: the sd_notify protocol (READY, STATUS, STOPPING, RELOADING, WATCHDOG) and the
watchdog that pings only while a liveness check passes.

Layer: infrastructure. The protocol is a few lines over the datagram socket named by NOTIFY_SOCKET
(see sd_notify(3)), so no library is needed: each message is newline-separated KEY=VALUE lines in one
datagram. Outside systemd (no NOTIFY_SOCKET) every call is a no-op. Notification failures are logged,
never raised: a daemon must not die because its supervisor is slow to read.

Why the watchdog runs a check rather than a timer: `WatchdogSec=` exists to catch a daemon that is
alive but stuck. The ping is sent from a task on the event loop (a blocked loop sends none) and only
after `check()` returns in time (a stuck engine, reported by the liveness check, sends none), so
systemd restarts the service exactly when it stops making progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to the socket systemd named in NOTIFY_SOCKET (a no-op without one)."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Sends KEY=VALUE lines in one datagram; returns whether it was delivered."""
        if self.address is None:
            return False
        # An address starting with "@" is in the abstract namespace (a leading NUL byte).
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, target)
        except OSError as e:
            if not self._warned:  # once: a missing supervisor must not flood the log
                log.warning("cannot notify systemd at %s: %s", self.address, e)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def reloading(self, status: str) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this to its reload request.
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"STATUS={status}", f"MONOTONIC_USEC={now_us}")


def watchdog_interval_s(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """The watchdog timeout systemd set (WATCHDOG_USEC), or None when the watchdog is off or meant for
    another process (WATCHDOG_PID names a different pid)."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


Check = Callable[[], Awaitable[None]]


class Watchdog:
    """Pings WATCHDOG=1 every `timeout_s / 2` while `check()` passes within `timeout_s / 2`.

    `check` raises (any exception) or hangs when the daemon is stuck; the ping is then withheld and
    systemd, after `WatchdogSec`, kills and restarts the service. It resumes once the check passes.
    """

    def __init__(self, notifier: Notifier, timeout_s: float, check: Check) -> None:
        self._notifier = notifier
        self.period_s = timeout_s / 2
        self._check = check
        self.failing: str | None = None  # why the last check failed, while it fails
        self.pings = 0

    async def run(self) -> None:
        log.info("systemd watchdog on: a check every %.2fs", self.period_s)
        while True:
            await self.tick()
            await asyncio.sleep(self.period_s)

    async def tick(self) -> bool:
        """One check and, when it passes, one ping; returns whether it pinged."""
        try:
            await asyncio.wait_for(self._check(), self.period_s)
        except TimeoutError:
            self._fail(f"liveness check did not answer within {self.period_s:.2f}s")
            return False
        except Exception as e:  # any failure withholds the ping: that is the point of the watchdog
            self._fail(str(e) or type(e).__name__)
            return False
        if self.failing is not None:
            log.warning("liveness check passes again; watchdog pings resume")
            self.failing = None
        self.pings += 1
        return self._notifier.notify("WATCHDOG=1")

    def _fail(self, why: str) -> None:
        if self.failing is None:
            log.error("liveness check failed, withholding the watchdog ping: %s", why)
            self._notifier.status(f"stuck: {why}")
        self.failing = why
