"""Requests that arrive together are routed together (router/cohort.py): each member's decision sees the
holds of those before it, each member's time is predicted beside the whole cohort, and no reservation leaks
when a member's caller goes away. Targets here are pure: the real estimators behind a minimal target."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from laas.core.types import SamplingParams
from laas.router.cohort import CAP_WINDOWS, Cohorts, closes_at
from laas.router.latency import LocalEstimator, RemoteEstimator
from laas.router.load import Hold, HostLoad, InFlight
from laas.router.policy import Estimate, Policy, Query, TargetKind
from laas.router.targets import Admitted, RoutedRequest, Streamed, Target


class _Decided:
    """Decided, never run (the cohort only estimates and reserves)."""

    def stream(self, admitted: Admitted, hold: Hold | None = None) -> AsyncIterator[Streamed]:
        raise AssertionError("a cohort does not run requests")


@dataclass
class Batching(_Decided):
    """A device model that decodes up to 4 streams at once, each step 50% longer per extra stream."""

    name: str = "device"
    kind: TargetKind = TargetKind.LOCAL
    estimator: LocalEstimator = field(default_factory=lambda: LocalEstimator(
        prefill_tps=1000.0, decode_tps=50.0, overhead_ms=0.0, parallel=4, batch_cost=0.5))

    def estimate(self, admitted: Admitted, hold: Hold | None = None) -> Estimate:
        e, n = self.estimator, admitted.max_tokens(4096, self.kind)
        predicted = (e.predict_ms(admitted.prompt_tokens, n, 0.0) if hold is None
                     else e.predict_held(hold, admitted.prompt_tokens, n, 0.0))
        return Estimate(self.name, self.kind, 4096, True, predicted)

    def reserve(self, admitted: Admitted) -> Hold:
        return self.estimator.hold(admitted.prompt_tokens, admitted.max_tokens(4096, self.kind), 0.0)


@dataclass
class Fifo(_Decided):
    """An endpoint that answers laasd's requests one after another."""

    name: str = "cloud"
    kind: TargetKind = TargetKind.CLOUD
    estimator: RemoteEstimator = field(default_factory=lambda: RemoteEstimator(ttft_ms=100.0, inter_token_ms=20.0))

    def estimate(self, admitted: Admitted, hold: Hold | None = None) -> Estimate:
        e, n = self.estimator, admitted.max_tokens(8192, self.kind)
        predicted = (e.predict_ms(admitted.prompt_tokens, n, 0.0) if hold is None
                     else e.predict_held(hold, admitted.prompt_tokens, n, 0.0))
        return Estimate(self.name, self.kind, 8192, True, predicted)

    def reserve(self, admitted: Admitted) -> Hold:
        return self.estimator.hold(admitted.prompt_tokens, admitted.max_tokens(8192, self.kind), 0.0)


def _targets() -> tuple[Batching, Fifo, list[Target]]:
    host = HostLoad()
    device, cloud = Batching(), Fifo()
    device.estimator.in_flight, cloud.estimator.in_flight = InFlight(host), InFlight(host)
    return device, cloud, [device, cloud]


def _request(budget_ms: float, max_tokens: int = 20) -> tuple[Query, Admitted]:
    admitted = Admitted(RoutedRequest(SamplingParams(max_tokens=max_tokens), prompt="hi"), 10, 16)
    return Query(10, max_tokens, 16, Policy.AUTO, budget_ms), admitted


async def test_a_burst_on_the_device_is_predicted_as_the_batch_it_decodes_in() -> None:
    device, cloud, both = _targets()
    alone = device.estimate(_request(5000)[1]).predicted_ms  # 10 ms prefill + 20 steps of 20 ms
    cohorts = Cohorts(window_s=0.01)
    decided = await asyncio.gather(*(cohorts.decide(*_request(5000), both) for _ in range(3)))
    assert [d.chosen.target for d, _ in decided] == ["device"] * 3
    assert device.estimator.in_flight.count == 3 and cloud.estimator.in_flight.count == 0
    # Each of the three waits for the three prompts (10 ms each) and decodes beside the other two, the first
    # included: 20 steps of 20 ms x (1 + 0.5 * 2).
    assert [d.chosen.predicted_ms for d, _ in decided] == [pytest.approx(3 * 10 + 20 * 40)] * 3
    assert alone == pytest.approx(410)
    assert all(d.reason.endswith("(decided with 2 other requests that arrived with it)") for d, _ in decided)
    assert (cohorts.decided, cohorts.requests) == (1, 3)
    for _, hold in decided:
        hold.release()
    assert device.estimator.in_flight.count == 0


async def test_each_decision_sees_the_holds_of_the_members_before_it() -> None:
    device, cloud, both = _targets()
    # The device meets 700 ms for one or two streams (410, 620 ms) but not for three (830 ms); the cloud
    # takes 500 ms for one, 1000 ms for the one after it.
    cohorts = Cohorts(window_s=0.01)
    decided = await asyncio.gather(*(cohorts.decide(*_request(700), both) for _ in range(4)))
    assert [d.chosen.target for d, _ in decided] == ["device", "device", "cloud", "device"]
    assert "no target meets the 700 ms deadline" in decided[3][0].reason  # the fourth: the faster miss
    # predicted as they will run: three streams on the device, one on the cloud
    assert [d.chosen.predicted_ms for d, _ in decided] == [pytest.approx(p) for p in (830, 830, 500, 830)]
    assert (device.estimator.in_flight.count, cloud.estimator.in_flight.count) == (3, 1)


async def test_a_member_cancelled_while_it_waits_is_left_out_and_one_cancelled_after_releases_its_hold() -> None:
    device, _cloud, both = _targets()
    cohorts = Cohorts(window_s=60.0)  # decided when the test says so
    tasks = [asyncio.create_task(cohorts.decide(*_request(5000), both)) for _ in range(3)]
    await asyncio.sleep(0)  # all three wait in the cohort
    tasks[0].cancel()
    await asyncio.sleep(0)
    cohorts.close()  # the window ends: the two left are decided and reserved
    assert device.estimator.in_flight.count == 2
    tasks[1].cancel()  # decided, cancelled before it could resume: its hold goes back
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and isinstance(results[1], asyncio.CancelledError)
    decision, hold = results[2]  # type: ignore[misc]
    assert device.estimator.in_flight.count == 1 and hold.held
    assert decision.reason.endswith("(decided with 1 other request that arrived with it)")
    hold.release()
    assert device.estimator.in_flight.count == 0


async def test_a_member_nothing_fits_gets_its_own_error_and_the_others_are_decided() -> None:
    _device, _cloud, both = _targets()
    cohorts = Cohorts(window_s=0.01)
    too_big = (Query(10, 9000, 16, Policy.AUTO, 5000), Admitted(RoutedRequest(SamplingParams(max_tokens=9000)), 10, 16))
    results = await asyncio.gather(cohorts.decide(*too_big, both),
                                   cohorts.decide(*_request(5000), both), return_exceptions=True)
    assert type(results[0]).__name__ == "OutOfRange"
    decision, hold = results[1]  # type: ignore[misc]
    assert decision.chosen.target == "device" and "decided with" not in decision.reason  # a cohort of one
    hold.release()


async def test_a_remote_fifo_member_waits_only_for_those_ahead_of_it() -> None:
    _, cloud, _ = _targets()
    cohorts = Cohorts(window_s=0.01)
    only: list[Target] = [cloud]  # the device is not a candidate: every member goes to the FIFO endpoint
    decided = await asyncio.gather(*(cohorts.decide(*_request(60_000), only) for _ in range(3)))
    predicted = [d.chosen.predicted_ms for d, _ in decided]
    own = 100 + 20 * 20.0
    assert predicted == [pytest.approx(own), pytest.approx(2 * own), pytest.approx(3 * own)]
    for _, hold in decided:
        hold.release()


def test_a_cohort_stays_open_a_window_after_its_latest_arrival_up_to_a_cap() -> None:
    """A lone request waits one window; a burst spread by a busy client, with gaps under a window, gathers
    whole (closing a window after the first split a burst of four into one and three); none waits past
    the cap."""
    assert closes_at(10.0, 10.0, 0.005) == pytest.approx(10.005)  # alone
    assert closes_at(10.0, 10.004, 0.005) == pytest.approx(10.009)  # the second extends it
    assert closes_at(10.0, 10.012, 0.005) == pytest.approx(10.017)  # and the fourth, 3 ms after the third
    assert CAP_WINDOWS == 4 and closes_at(10.0, 10.018, 0.005) == pytest.approx(10.020)  # never past the cap


async def test_arrivals_within_a_window_of_each_other_are_one_cohort() -> None:
    device, _cloud, both = _targets()
    cohorts = Cohorts(window_s=60.0)  # decided when the test says so
    tasks = [asyncio.create_task(cohorts.decide(*_request(5000), both))]
    await asyncio.sleep(0)
    timer = cohorts._timer
    tasks.append(asyncio.create_task(cohorts.decide(*_request(5000), both)))
    await asyncio.sleep(0)
    assert timer is not None and timer.cancelled() and cohorts._timer is not timer  # the window moved on
    cohorts.close()
    decided = await asyncio.gather(*tasks)
    assert all(d.reason.endswith("(decided with 1 other request that arrived with it)") for d, _ in decided)
    for _, hold in decided:
        hold.release()
    assert device.estimator.in_flight.count == 0
