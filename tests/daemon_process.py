"""Runs the real laasd as a subprocess on an ephemeral loopback port, for integration tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from laas.client.channels import Tls, open_channel

_PORT_LINE = re.compile(r"listening on \S+ \(port (\d+)\)")
_HTTP_LINE = re.compile(r"HTTP API on https?://\S+:(\d+)/v1")


class DaemonProcess:
    def __init__(self, home: Path, config: Path | None = None, env: dict[str, str] | None = None,
                 listen: str = "127.0.0.1:0", tls: Tls | None = None, http_listen: str = "127.0.0.1:0") -> None:
        self.tls = tls  # how health checks connect to a daemon with TLS
        self.home = home
        self.listen = listen
        self.config = config
        self.env = env or {}
        self.listen = listen  # must include one TCP address: the log line with its port says it is up
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.http_listen = http_listen  # never the default port: tests run side by side
        self.http_port = 0  # the first TCP port of the HTTP API
        self.lines: list[str] = []
        self._port_seen = threading.Event()
        self._new_line = threading.Condition()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (for the openai SDK's base_url)."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    def start(self, *, wait_serving: bool = True, timeout: float = 120.0) -> DaemonProcess:
        cmd = [sys.executable, "-m", "laas.daemon.cli", "--home", str(self.home)]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        cmd += ["serve", "--listen", self.listen, "--http-listen", self.http_listen]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAAS_")} | self.env
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._port_seen.wait(timeout):
            self.kill()
            raise RuntimeError("laasd did not start listening:\n" + self.log)
        if wait_serving:
            self.wait_health("SERVING", timeout)
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            http = _HTTP_LINE.search(line)
            if http and not self.http_port:
                self.http_port = int(http.group(1))
            match = _PORT_LINE.search(line)
            if match and not self._port_seen.is_set():
                self.port = int(match.group(1))
                self._port_seen.set()

    def wait_for_line(self, *parts: str, timeout: float = 30.0) -> str:
        """The first log line that holds every one of `parts`, waiting for it up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                found = next((line for line in self.lines if all(p in line for p in parts)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or not self._new_line.wait(left):
                    raise TimeoutError(f"no log line with {parts}:\n{self.log}")

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def health(self) -> str:
        with open_channel(self.target, self.tls) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_health(self, status: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"laasd exited with {self.proc.returncode}:\n{self.log}")
            try:
                if self.health() == status:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"laasd did not become {status}:\n{self.log}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
