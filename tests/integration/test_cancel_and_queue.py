"""Cancellation and deadlines free the model within a decode step; a full queue says RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from laas.client import AsyncClient, Client, DeadlineExceeded, LaasError, ResourceExhausted
from tests.daemon_process import DaemonProcess

# About 30 s of decoding if nothing stops it.
LONG: dict[str, Any] = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}


def _wait_idle(client: Client, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        m = client.model()
        if m.active_requests == 0 and m.queued_requests == 0:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError("the model is still busy")


def test_cancelling_a_stream_stops_the_engine_and_frees_the_model(client: Client) -> None:
    stream = client.generate("Once upon a time", **LONG)
    received = [next(stream) for _ in range(5)]
    assert all(c.text is not None for c in received)
    assert client.model().active_requests == 1
    stream.close()  # the client goes away mid-stream
    assert _wait_idle(client) < 5.0
    after = client.complete("Hello", max_tokens=4, temperature=0)
    assert after.completion_tokens == 4
    assert after.timings["queue_ms"] < 1000  # nobody was still decoding ahead of it


async def test_async_client_cancellation(daemon: DaemonProcess) -> None:
    async with AsyncClient(daemon.target) as aclient:
        count = 0
        async for _chunk in aclient.generate("Once upon a time", **LONG):
            count += 1
            if count == 5:
                break  # the stream is finalized on the event loop, which cancels the call
        start = time.monotonic()
        while (await aclient.model()).active_requests and time.monotonic() - start < 5:
            await asyncio.sleep(0.01)
        assert time.monotonic() - start < 5.0
        result = await aclient.complete("Hello", max_tokens=4, temperature=0)
        assert result.completion_tokens == 4 and result.timings["queue_ms"] < 1000


def test_deadline_stops_generation(client: Client) -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        list(client.generate("Once upon a time", timeout=1.0, **LONG))
    assert time.monotonic() - started < 5
    assert _wait_idle(client) < 5.0
    assert client.complete("Hello", max_tokens=2, temperature=0).completion_tokens == 2


def test_queue_overflow_under_concurrent_clients(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon("parallel = 1\nmax_queue = 2\n")
    clients = 6

    def one(i: int) -> str:
        with Client(daemon.target) as c:
            try:
                result = c.complete(f"Story number {i}:", max_tokens=150, ignore_eos=True, temperature=0)
            except ResourceExhausted as e:
                assert "max_queue=2" in str(e)
                return "exhausted"
            assert result.completion_tokens == 150
            return "served"

    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, range(clients)))
    # One runs, two wait, the rest are refused at once.
    assert sorted(outcomes) == ["exhausted"] * 3 + ["served"] * 3, outcomes
    with Client(daemon.target) as c:
        assert c.complete("Hi", max_tokens=2).completion_tokens == 2


def test_queued_request_waits_its_turn(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon("parallel = 1\nmax_queue = 1\n")
    with Client(daemon.target) as c:
        first = c.generate("Once upon a time", **LONG)
        next(first)
        second = c.generate("Hello", max_tokens=3, temperature=0)
        deadline = time.monotonic() + 5
        while c.model().queued_requests != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.model().queued_requests == 1
        with pytest.raises(LaasError) as info:
            list(c.generate("Third", max_tokens=3))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.close()  # the waiting request runs as soon as the first is cancelled
        chunks = list(second)
        assert chunks[-1].completion_tokens == 3
        assert chunks[-1].timings["queue_ms"] > 0
