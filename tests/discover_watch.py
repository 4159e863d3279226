"""Runs the real `laas discover --json` on loopback and collects its events, for the discovery tests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]


class DiscoverWatch:
    def __init__(self, interface: str = "127.0.0.1") -> None:
        cmd = [sys.executable, "-m", "laas.client.cli", "discover", "--json", "--interface", interface]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[Event] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.events.append(json.loads(line))
                self._changed.notify_all()

    def wait_for(self, match: Callable[[Event], bool], timeout: float = 30.0, after: int = 0) -> Event:
        """The first event (from index `after`) that matches; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events[after:]:
                    if match(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching discovery event in {timeout}s; saw {self.events}")
                self._changed.wait(left)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
