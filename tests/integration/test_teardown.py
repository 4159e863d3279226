"""Teardown of the real daemon, in-process with the real model: shutdown() leaves no thread behind, and a
teardown step that fails does not keep the steps after it from running (server.py's exit stack)."""

from __future__ import annotations

import asyncio
import logging
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from laas.daemon.audit import AuditLog
from laas.daemon.backends.gguf import GgufEngine
from laas.daemon.server import Server
from laas.daemon.settings import Settings, load_settings
from laas.daemon.store import DEFAULT_MODEL
from laas.daemon.systemd import Notifier
from laas.v1 import runtime_pb2, runtime_pb2_grpc

# Threads that outlive a server by design, none of them the daemon's:
# - grpc's aio poller ("Thread-N (_poll_wrapper)"): grpc starts it once per process for every grpc.aio
#   object and keeps it for the process' life (grpcio's completion_queue.pyx.pxi); not the daemon's to stop.
GRPC_KEEPS = ("_poll_wrapper",)
# - the event loop's default executor ("asyncio_N", behind asyncio.to_thread): the loop's own, shut
#   down by asyncio.run when serve() returns, so it is allowed only while the loop still runs.
LOOP_KEEPS = ("asyncio_",)

MODELS = f"""
default_model = "a"
preload = "all"
metrics_listen = "127.0.0.1:0"
drain_grace_s = 5
[[models]]
name = "a"
path = "{DEFAULT_MODEL.filename}"
context_length = 512
[[models]]
name = "b"
path = "{DEFAULT_MODEL.filename}"
context_length = 512
parallel = 2
"""


class ReadyNotifier(Notifier):
    """sd_notify without systemd: READY=1 (sent once health says SERVING) sets an event."""

    def __init__(self) -> None:
        super().__init__(None)
        self.serving = asyncio.Event()

    def ready(self, status: str) -> bool:
        self.serving.set()
        return True


def _settings(make_home: Callable[..., Path], tmp_path: Path) -> Settings:
    config = tmp_path / "laasd.toml"
    config.write_text(MODELS)
    return load_settings(config, environ={}, overrides={"home": make_home(), "listen": "127.0.0.1:0",
                                                               "http_listen": ["127.0.0.1:0"]})


def _named(threads: set[threading.Thread], *parts: str) -> set[threading.Thread]:
    return {t for t in threads if any(p in t.name for p in parts)}


async def _serve_and_use(server: Server) -> set[threading.Thread]:
    """Starts the server, streams from both models and scrapes /metrics; returns the threads running then."""
    notifier = server.notifier
    assert isinstance(notifier, ReadyNotifier)
    port = await server.startup()
    await asyncio.wait_for(notifier.serving.wait(), 120)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = runtime_pb2_grpc.RuntimeStub(channel)
        for model in ("a", "b"):
            request = runtime_pb2.GenerateRequest(model=model, prompt="Once upon a time",
                                                  sampling=runtime_pb2.SamplingParams(max_tokens=4, temperature=0))
            replies = [r async for r in stub.Generate(request, timeout=60)]
            assert replies
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    scraped = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    assert b"laas" in scraped
    return set(threading.enumerate())


def test_shutdown_leaves_no_thread_behind(make_home: Callable[..., Path], tmp_path: Path) -> None:
    before = set(threading.enumerate())
    server = Server(_settings(make_home, tmp_path), notifier=ReadyNotifier(), watchdog_s=5)
    left_in_loop: set[threading.Thread] = set()

    async def run() -> None:
        try:
            serving = await _serve_and_use(server) - before
            # What the test would catch: the threads the daemon runs while serving (one decode thread for
            # both models, a relay per engine, the metrics endpoint).
            assert len(_named(serving, "llama-decode")) == 1
            assert len(_named(serving, "gguf-relay")) == 2
            assert len(_named(serving, "metrics-http")) == 1
        finally:
            await server.shutdown()
        left_in_loop.update(set(threading.enumerate()) - before)

    asyncio.run(run())
    assert not {t.name for t in left_in_loop - _named(left_in_loop, *GRPC_KEEPS, *LOOP_KEEPS)}
    left = set(threading.enumerate()) - before
    assert not {t.name for t in left - _named(left, *GRPC_KEEPS)}
    assert not server.decode_loop.alive


def test_a_failing_teardown_step_does_not_stop_the_ones_after_it(
        make_home: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken_close(self: AuditLog) -> None:
        raise OSError("disk gone")

    closed: list[GgufEngine] = []
    real_aclose = GgufEngine.aclose

    async def counted_aclose(self: GgufEngine) -> None:
        closed.append(self)
        await real_aclose(self)

    monkeypatch.setattr(AuditLog, "close", broken_close)
    monkeypatch.setattr(GgufEngine, "aclose", counted_aclose)
    server = Server(_settings(make_home, tmp_path), notifier=ReadyNotifier())

    async def run() -> None:
        try:
            await _serve_and_use(server)
        finally:
            with caplog.at_level(logging.INFO, logger="laas.daemon.server"):
                await server.shutdown()

    asyncio.run(run())
    assert "shutdown: closing the audit log failed" in caplog.text
    assert len(closed) == 2  # the registry, a step after the audit log, still closed both engines
    assert not server.decode_loop.alive  # and the last step, the decode thread, still ran
    assert caplog.messages[-1] == "stopped"
