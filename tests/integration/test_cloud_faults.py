"""A hostile or broken cloud endpoint, on loopback (tests/fault_proxy.py's synthetic modes): CloudEngine
fails within its bounds, with a reason that carries no secret, and the target's breaker counts it.

Issue 13 items 6 (pings and empty deltas kept a call open forever), 8 (an endless SSE line was buffered
without limit) and 9 (error bodies that echo the Authorization header reached clients)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from laas.core.errors import TargetFailed
from laas.core.types import GenerationRequest, SamplingParams, TextDelta
from laas.router.cloud import CloudConfig, CloudEngine, mask_secrets
from laas.router.latency import CircuitBreaker, RemoteEstimator
from laas.router.policy import TargetKind
from laas.router.remote import RemoteTarget
from laas.router.sse import MAX_EVENT_BYTES
from laas.router.targets import Admitted, RoutedRequest
from tests.fault_proxy import FaultProxy

KEY = "sk-test-5e3a1c0ffee-secret"


@pytest.fixture(scope="module")
def proxy() -> Iterator[FaultProxy]:
    p = FaultProxy("http://127.0.0.1:9").start()  # the synthetic modes never call upstream
    yield p
    p.stop()


def _engine(proxy: FaultProxy, read_timeout_s: float = 0.5, call_timeout_s: float = 60.0) -> CloudEngine:
    return CloudEngine(CloudConfig("cloud", proxy.url, "m", 4096, api_key=KEY, read_timeout_s=read_timeout_s,
                                   call_timeout_s=call_timeout_s))


async def _fail(engine: CloudEngine) -> tuple[TargetFailed, float, int]:
    """Runs one request to its TargetFailed: (the error, seconds it took, text deltas before it)."""
    started, deltas = time.monotonic(), 0
    try:
        with pytest.raises(TargetFailed) as info:
            async for chunk in engine.generate(GenerationRequest(prompt="hi", sampling=SamplingParams(max_tokens=8))):
                deltas += isinstance(chunk, TextDelta)
    finally:
        await engine.aclose()
    return info.value, time.monotonic() - started, deltas


@pytest.mark.parametrize("mode", ["ping", "empty"])
async def test_pings_and_empty_deltas_do_not_keep_a_call_open(proxy: FaultProxy, mode: str) -> None:
    proxy.reset(mode)
    error, took, deltas = await _fail(_engine(proxy))
    assert "no token within 0.5s" in str(error) and deltas == 0
    assert took < 5, took  # before the fix: open for as long as the endpoint kept pinging
    assert proxy.sent_bytes > 0  # it did keep the connection busy


async def test_a_trickle_of_tokens_is_bounded_by_the_call_timeout(proxy: FaultProxy) -> None:
    proxy.reset("trickle")
    error, took, deltas = await _fail(_engine(proxy, read_timeout_s=5, call_timeout_s=1.0))
    assert "longer than 1s" in str(error) and deltas > 3
    assert took < 5, took


async def test_an_endless_line_fails_the_target_at_the_bound(proxy: FaultProxy) -> None:
    proxy.reset("huge")
    error, _, _ = await _fail(_engine(proxy, read_timeout_s=30))
    assert "more than 1048576 bytes" in str(error)
    assert proxy.sent_bytes < 16 * MAX_EVENT_BYTES  # stopped reading near the bound, not at 512 MiB


@pytest.mark.parametrize("mode", ["echo", "echo_event"])
async def test_an_error_that_echoes_the_key_reaches_only_the_log_masked(
        proxy: FaultProxy, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    proxy.reset(mode)
    with caplog.at_level(logging.WARNING, logger="laas.router.cloud"):
        error, _, _ = await _fail(_engine(proxy))
    assert proxy.authorization == [f"Bearer {KEY}"]  # it was sent, and echoed back
    assert KEY not in str(error) and "Bearer" not in str(error)
    assert str(error) == ("cloud: HTTP 401 Unauthorized" if mode == "echo"
                          else "cloud: the endpoint reported an error (the daemon's log has it)")
    assert KEY not in caplog.text and "5e3a1c0ffee" not in caplog.text
    assert "Bearer ***" in caplog.text  # the body is in the log, for the operator


def test_secrets_are_masked() -> None:
    text = ('{"authorization": "Bearer abc.def", "x-api-key": "k123", "note": "sk-proj-AbCdEf123456"} '
            'api_key=hunter2 KEY-raw')
    masked = mask_secrets(text, "KEY-raw")
    for secret in ("abc.def", "k123", "AbCdEf123456", "hunter2", "KEY-raw"):
        assert secret not in masked
    assert "Bearer ***" in masked and "sk-***" in masked


async def test_the_breaker_counts_a_call_that_only_pinged(proxy: FaultProxy) -> None:
    proxy.reset("ping")
    breaker = CircuitBreaker(threshold=1)
    target = RemoteTarget("cloud", TargetKind.CLOUD, _engine(proxy), RemoteEstimator(), breaker, time.monotonic)
    with pytest.raises(TargetFailed):
        async for _ in target.stream(Admitted(RoutedRequest(SamplingParams(max_tokens=4), prompt="hi"), 1, 16)):
            pass
    await target.engine.aclose()
    assert breaker.failures == 1 and breaker.state(time.monotonic()) == "open"
    assert target.estimator.error_rate > 0
