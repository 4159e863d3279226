"""Hedged requests end to end: the real daemon with `hedge = true`, two cloud endpoints in front of a real
OpenAI-compatible server (llama_cpp.server) through fault proxies on loopback. The endpoint predicted
fastest sends `: ping` comments and never a token (a stalled upstream); the hedge's backup answers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from laas.client import Client
from tests.cloud_server import CLOUD_MODEL, CloudServer
from tests.daemon_process import DaemonProcess
from tests.fault_proxy import FaultProxy

MODEL = "far-model"  # served by the two endpoints only


@pytest.fixture(scope="module")
def proxies(cloud: CloudServer) -> Iterator[dict[str, FaultProxy]]:
    started = {name: FaultProxy(cloud.url).start() for name in ("stalled", "backup")}
    yield started
    for proxy in started.values():
        proxy.stop()


@pytest.fixture(scope="module")
def daemon(make_home: Callable[..., Path], proxies: dict[str, FaultProxy],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    config = tmp_path_factory.mktemp("hedging") / "laasd.toml"
    remotes = "".join(f"""
[[remotes]]
name = "{name}"
url = "{proxy.url}"
model = "{CLOUD_MODEL}"
models = ["{MODEL}"]
read_timeout_s = 120
ttft_ms = {ttft_ms}
inter_token_ms = 5
""" for (name, proxy), ttft_ms in zip(proxies.items(), (5, 200), strict=True))
    config.write_text("hedge = true\n" + remotes)
    proc = DaemonProcess(make_home(), config).start()
    yield proc
    assert proc.stop() == 0, proc.log


def _wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


def test_a_stalled_endpoint_is_hedged_and_cancelled_and_the_backup_streams(
        daemon: DaemonProcess, proxies: dict[str, FaultProxy]) -> None:
    stalled, backup = proxies["stalled"], proxies["backup"]
    stalled.reset("ping")
    backup.reset()
    with Client(daemon.target) as client:
        chunks = list(client.generate("The capital of France is", model=MODEL, max_tokens=8, temperature=0,
                                      latency_budget_ms=60_000))
    routes = [c.route for c in chunks if c.route is not None]  # the route the first token came from, as a failover
    assert [(r.target, r.failover) for r in routes] == [("backup", True)]
    assert routes[0].reason.startswith("hedged: stalled had not answered after 50 ms"), routes[0].reason
    assert "".join(c.text for c in chunks) and chunks[-1].finish_reason in ("stop", "length")
    assert (stalled.requests, backup.requests, backup.completed) == (1, 1, 1)
    _wait_for(lambda: stalled.abandoned == 1)  # the stalled call was closed, not left to ping on
