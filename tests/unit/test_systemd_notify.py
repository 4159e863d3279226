"""The sd_notify protocol and the watchdog, against a real AF_UNIX datagram socket."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from laas.daemon.systemd import Notifier, Watchdog, watchdog_interval_s
from tests.notify_socket import NotifySocket


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def test_notifier_sends_each_message_as_one_datagram(notify: NotifySocket) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(notify.path)})
    assert notifier.ready("serving 1 model(s)")
    assert notifier.status("loading model a\nwith a newline")
    assert notifier.stopping("draining 2 stream(s)")
    assert notifier.reloading("reloading the model list")
    ready = notify.wait_for("READY")
    assert ready["READY"] == "1" and ready["STATUS"] == "serving 1 model(s)" and ready["MAINPID"].isdigit()
    assert notify.wait_for("STATUS", "loading model a with a newline")  # one line, one assignment
    assert notify.wait_for("STOPPING")["STATUS"] == "draining 2 stream(s)"
    reloading = notify.wait_for("RELOADING")
    assert int(reloading["MONOTONIC_USEC"]) > 0


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"laas-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier(f"@{name}").notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.ready("x")


def test_a_dead_supervisor_socket_is_reported_not_raised(notify: NotifySocket,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(notify.dir / "nobody-listens.sock"))
    assert not notifier.notify("WATCHDOG=1")
    assert not notifier.notify("WATCHDOG=1")
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(environ, pid=4242) == expected


async def test_watchdog_pings_only_while_the_check_passes(notify: NotifySocket) -> None:
    healthy = True

    async def check() -> None:
        if not healthy:
            raise RuntimeError("engine stuck")

    watchdog = Watchdog(Notifier(str(notify.path)), 0.2, check)
    assert await watchdog.tick()
    notify.wait_for("WATCHDOG", "1", timeout=5)
    healthy = False
    assert not await watchdog.tick()
    assert watchdog.failing == "engine stuck"
    assert notify.wait_for("STATUS", "stuck: engine stuck", timeout=5)
    assert len(notify.with_key("WATCHDOG")) == 1
    healthy = True
    seen = len(notify.messages)
    assert await watchdog.tick()
    assert watchdog.failing is None
    notify.wait_for("WATCHDOG", "1", timeout=5, after=seen)
    assert len(notify.with_key("WATCHDOG")) == 2


async def test_a_check_that_hangs_withholds_the_ping(notify: NotifySocket) -> None:
    async def hangs() -> None:
        await asyncio.sleep(3600)

    watchdog = Watchdog(Notifier(str(notify.path)), 0.1, hangs)
    assert not await watchdog.tick()
    assert "did not answer" in (watchdog.failing or "")


async def test_a_blocked_event_loop_sends_no_ping(notify: NotifySocket) -> None:
    async def check() -> None:
        return None

    watchdog = Watchdog(Notifier(str(notify.path)), 0.1, check)  # a ping every 0.05 s
    task = asyncio.create_task(watchdog.run())
    await asyncio.sleep(0.3)
    blocked_at = time.monotonic()
    time.sleep(0.6)  # noqa: ASYNC251 -- on purpose: the loop is stuck, nothing on it runs
    unblocked_at = time.monotonic()
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)  # the reader thread catches up
    pings = [t for t, _ in notify.with_key("WATCHDOG")]
    assert len([t for t in pings if t < blocked_at]) >= 3
    assert not [t for t in pings if blocked_at + 0.05 < t < unblocked_at]
    assert len([t for t in pings if t > unblocked_at]) >= 3
