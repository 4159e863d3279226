"""ModelQueue: one request runs, up to max_waiting wait in FIFO order, more are refused at once."""

from __future__ import annotations

import asyncio

import pytest

from laas.core.errors import ResourceExhausted
from laas.daemon.queueing import ModelQueue

# a queue bug shows up as a request waiting forever: fail fast instead of at the global 300 s timeout
pytestmark = pytest.mark.timeout(10)


async def settle() -> None:
    """Lets every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


class Holder:
    """A request that takes a slot and keeps it until released."""

    def __init__(self, q: ModelQueue, name: str, log: list[str]) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.task = asyncio.create_task(self._run(q, name, log))

    async def _run(self, q: ModelQueue, name: str, log: list[str]) -> None:
        async with q.slot():
            log.append(name)
            self.entered.set()
            await self.release.wait()


async def test_single_request_runs_at_once() -> None:
    q = ModelQueue("m", max_waiting=2)
    async with q.slot():
        assert q.active == 1
        assert q.waiting == 0
    assert q.active == 0


async def test_fifo_order_and_waiting_count() -> None:
    q = ModelQueue("m", max_waiting=5)
    log: list[str] = []
    holders = []
    for i in range(5):
        holders.append(Holder(q, f"r{i}", log))
        await settle()
    assert log == ["r0"]
    assert q.active == 1
    assert q.waiting == 4
    for i, h in enumerate(holders):
        h.release.set()
        await settle()
        assert q.waiting == max(0, 3 - i)
    await asyncio.gather(*(h.task for h in holders))
    assert log == ["r0", "r1", "r2", "r3", "r4"]
    assert (q.active, q.waiting) == (0, 0)


async def test_refused_when_max_waiting_reached() -> None:
    q = ModelQueue("small-model", max_waiting=2)
    log: list[str] = []
    holders = [Holder(q, f"r{i}", log) for i in range(3)]
    await settle()
    assert (q.active, q.waiting) == (1, 2)
    with pytest.raises(ResourceExhausted) as info:
        async with asyncio.timeout(1), q.slot():
            pytest.fail("a request past max_waiting must not run")
    msg = str(info.value)
    assert "small-model" in msg and "max_queue=2" in msg and "2 request(s)" in msg
    assert (q.active, q.waiting) == (1, 2)  # the refusal changed nothing
    # once one of the waiters runs, there is room again
    holders[0].release.set()
    await settle()
    assert q.waiting == 1
    late = Holder(q, "late", log)
    await settle()
    assert q.waiting == 2
    for h in [*holders[1:], late]:
        h.release.set()
    await asyncio.gather(*(h.task for h in [*holders, late]))
    assert log == ["r0", "r1", "r2", "late"]


async def test_max_waiting_zero_runs_one_and_refuses_the_rest() -> None:
    q = ModelQueue("m", max_waiting=0)
    log: list[str] = []
    first = Holder(q, "first", log)
    await first.entered.wait()
    for _ in range(3):
        with pytest.raises(ResourceExhausted):
            async with asyncio.timeout(1), q.slot():
                pass
    assert (q.active, q.waiting) == (1, 0)
    first.release.set()
    await first.task
    # free again: the next one runs
    async with q.slot():
        assert q.active == 1


async def test_idle_queue_never_refuses_sequential_requests() -> None:
    q = ModelQueue("m", max_waiting=0)
    for _ in range(10):
        async with q.slot():
            pass
    assert (q.active, q.waiting) == (0, 0)


async def test_release_on_exception() -> None:
    q = ModelQueue("m", max_waiting=1)
    with pytest.raises(ValueError, match="engine failed"):
        async with q.slot():
            raise ValueError("engine failed")
    assert (q.active, q.waiting) == (0, 0)
    assert not q._lock.locked()
    async with q.slot():  # the model is free again
        assert q.active == 1


async def test_exception_in_holder_lets_the_waiter_run() -> None:
    q = ModelQueue("m", max_waiting=1)
    gate = asyncio.Event()
    ran: list[str] = []

    async def failing() -> None:
        async with q.slot():
            await gate.wait()
            raise RuntimeError("boom")

    async def waiter() -> None:
        async with q.slot():
            ran.append("waiter")

    t1 = asyncio.create_task(failing())
    await settle()
    t2 = asyncio.create_task(waiter())
    await settle()
    assert q.waiting == 1
    gate.set()
    with pytest.raises(RuntimeError):
        await t1
    await asyncio.wait_for(t2, 1)
    assert ran == ["waiter"]
    assert (q.active, q.waiting) == (0, 0)


async def test_cancelled_waiter_frees_its_place() -> None:
    q = ModelQueue("m", max_waiting=1)
    log: list[str] = []
    holder = Holder(q, "holder", log)
    await settle()
    waiter = Holder(q, "cancelled", log)
    await settle()
    assert q.waiting == 1
    waiter.task.cancel()
    await settle()
    assert q.waiting == 0
    nxt = Holder(q, "next", log)  # there is room for one waiter again
    await settle()
    assert q.waiting == 1
    holder.release.set()
    nxt.release.set()
    await asyncio.wait_for(asyncio.gather(holder.task, nxt.task), 1)
    assert log == ["holder", "next"]
    assert (q.active, q.waiting) == (0, 0)


async def test_cancelled_holder_releases_the_model() -> None:
    q = ModelQueue("m", max_waiting=1)
    log: list[str] = []
    holder = Holder(q, "holder", log)
    await settle()
    waiter = Holder(q, "waiter", log)
    await settle()
    holder.task.cancel()
    await settle()
    assert log == ["holder", "waiter"]
    assert (q.active, q.waiting) == (1, 0)
    waiter.release.set()
    await waiter.task
    assert (q.active, q.waiting) == (0, 0)


async def test_queues_are_independent() -> None:
    a, b = ModelQueue("a", 0), ModelQueue("b", 0)
    async with a.slot(), b.slot():
        assert a.active == b.active == 1


async def test_no_overshoot_between_a_release_and_the_next_waiter_waking() -> None:
    """The lock reads free for a moment after a release; arrivals in that gap must still count as queued."""
    q = ModelQueue("m", max_waiting=1)
    log: list[str] = []
    first, second = Holder(q, "first", log), Holder(q, "second", log)
    await settle()
    assert (q.active, q.waiting) == (1, 1)

    async def arrive() -> str:
        try:
            async with q.slot():
                return "ran"
        except ResourceExhausted:
            return "refused"

    # In one step: "first" releases, and three requests arrive before "second" wakes up.
    first.release.set()
    late = [asyncio.create_task(arrive()) for _ in range(3)]
    second.release.set()
    outcomes = await asyncio.gather(*late)
    await second.task
    assert outcomes == ["refused"] * 3  # "second" still holds the one waiting place
    assert log == ["first", "second"]


async def test_parallel_slots_run_together_and_the_queue_beyond_them_stays_bounded() -> None:
    q = ModelQueue("m", max_waiting=1, parallel=2)
    log: list[str] = []
    holders = [Holder(q, f"r{i}", log) for i in range(3)]
    await settle()
    assert log == ["r0", "r1"] and q.active == 2 and q.waiting == 1
    with pytest.raises(ResourceExhausted):
        async with q.slot():
            pass
    holders[0].release.set()
    await settle()
    assert log == ["r0", "r1", "r2"] and q.active == 2 and q.waiting == 0
    for h in holders:
        h.release.set()
    await asyncio.gather(*(h.task for h in holders))


async def test_widening_lets_the_waiters_run_at_once() -> None:
    """An automatic `parallel` is known once the model is described: the queue starts at 1 and widens."""
    q = ModelQueue("m", max_waiting=4)
    log: list[str] = []
    holders = [Holder(q, f"r{i}", log) for i in range(4)]
    await settle()
    assert (log, q.active, q.waiting) == (["r0"], 1, 3)
    q.widen(3)
    await settle()
    assert (log, q.active, q.waiting, q.parallel) == (["r0", "r1", "r2"], 3, 1, 3)
    q.widen(2)  # never narrower than now
    assert q.parallel == 3
    for h in holders:
        h.release.set()
    await asyncio.gather(*(h.task for h in holders))
    assert (q.active, q.waiting, len(log)) == (0, 0, 4)
