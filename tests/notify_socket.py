"""A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET, for tests."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path


class NotifySocket:
    """Binds a datagram socket and records every message (as KEY=VALUE dicts) with its arrival time."""

    def __init__(self) -> None:
        # Short path: sun_path holds at most 107 bytes, and pytest's tmp_path can be longer.
        self.dir = Path(tempfile.mkdtemp(prefix="laas-notify-"))
        self.path = self.dir / "notify.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in list(self.messages) if key in m]

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60.0, after: int = 0
                 ) -> dict[str, str]:
        """The first message (from index `after` on) that has `key` (equal to `value` when given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, message in list(self.messages)[after:]:
                if key in message and (value is None or message[key] == value):
                    return message
            time.sleep(0.01)
        raise TimeoutError(f"no {key}={value or '*'} notification; got {[m for _, m in self.messages]}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self._sock.close()
        self.path.unlink(missing_ok=True)
        self.dir.rmdir()
