"""Hedged requests: when a hedge is planned (pure), each target's allowance, and the race in Router.run over
endpoints that answer when the test says so (no I/O: the router's own RemoteTarget around them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from laas.core.errors import TargetFailed
from laas.core.types import (
    Completion,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    Timings,
    Usage,
)
from laas.daemon.local_target import LocalModels
from laas.daemon.registry import ModelRegistry
from laas.daemon.settings import Settings
from laas.daemon.store import ModelStore
from laas.router.dispatch import Plan, RouteChange, Router
from laas.router.hedge import HedgeBudget, HedgeConfig, plan_hedge
from laas.router.latency import CircuitBreaker, RemoteEstimator
from laas.router.policy import Decision, Estimate, Policy, Query, TargetKind, choose
from laas.router.remote import RemoteTarget
from laas.router.targets import Admitted, RoutedRequest

CONFIG = HedgeConfig(after=1.5, min_after_ms=50.0, share=0.5, burst=1.0)


def _estimate(name: str, predicted_ms: float, first_token_ms: float, kind: TargetKind = TargetKind.CLOUD) -> Estimate:
    return Estimate(name, kind, 4096, True, predicted_ms, first_token_ms=first_token_ms)


def _decision(*order: Estimate) -> Decision:
    return Decision(order, "test", ())


@pytest.mark.parametrize(("query", "order", "after_ms"), [
    (Query(10, 8, 16, budget_ms=1000), (_estimate("a", 300, 100), _estimate("b", 400, 200)), 150.0),
    (Query(10, 8, 16, budget_ms=1000), (_estimate("a", 300, 10), _estimate("b", 400, 200)), 50.0),  # the floor
    (Query(10, 8, 16, budget_ms=500), (_estimate("a", 300, 100), _estimate("b", 400, 200)), None),  # too late
    (Query(10, 8, 16), (_estimate("a", 300, 100), _estimate("b", 400, 200)), None),  # no budget
    (Query(10, 8, 16, Policy.LOCAL_ONLY, 1000), (_estimate("a", 300, 100), _estimate("b", 400, 200)), None),
    (Query(10, 8, 16, budget_ms=1000), (_estimate("a", 300, 100),), None),  # nothing to hedge with
    (Query(10, 8, 16, budget_ms=1000), (_estimate("a", 300, 0), _estimate("b", 400, 200)), None),  # no prediction
])
def test_a_hedge_starts_late_enough_to_be_needed_and_early_enough_to_meet_the_budget(
        query: Query, order: tuple[Estimate, ...], after_ms: float | None) -> None:
    hedge = plan_hedge(_decision(*order), query, CONFIG)
    assert (hedge.after_ms if hedge else None) == after_ms
    if hedge is not None:
        assert hedge.backup is order[1]


def test_each_target_takes_at_most_its_share_of_hedges() -> None:
    budget = HedgeBudget(CONFIG)
    assert budget.take("cloud") and not budget.take("cloud")  # the burst (1), then none
    budget.routed(["device", "cloud"])
    assert not budget.take("cloud")  # half a hedge earned
    budget.routed(["device", "cloud"])
    assert budget.take("cloud") and not budget.take("cloud")
    for _ in range(10):
        budget.routed(["cloud"])
    assert budget.take("cloud") and not budget.take("cloud")  # never more than the burst banked
    assert budget.take("device")  # a target's allowance is its own


class Held:
    """An endpoint that answers its word once `go` is set (or fails with `error`), and tells when its
    request was cancelled."""

    context_length = 4096

    def __init__(self, word: str, answer_now: bool = False, error: str = "") -> None:
        self.word = word
        self.go = asyncio.Event()
        if answer_now:
            self.go.set()
        self.error = error
        self.started = 0
        self.cancelled = 0

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.started += 1
        try:
            await self.go.wait()
            if self.error:
                raise TargetFailed(self.error)
            yield TextDelta(self.word)
            yield Completion(FinishReason.STOP, Usage(1, 1), Timings())
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        except GeneratorExit:
            self.cancelled += 1
            raise

    async def check_health(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _router(tmp_path: Path, endpoints: dict[str, Held], hedging: HedgeConfig | None = CONFIG
            ) -> tuple[Router, dict[str, RemoteTarget]]:
    settings = Settings(home=tmp_path)
    registry = ModelRegistry(settings, ModelStore(settings.store), None)  # type: ignore[arg-type]
    router = Router(LocalModels(registry, time.monotonic), [], {}, {}, 16, hedging=hedging)
    targets = {}
    for i, (name, endpoint) in enumerate(endpoints.items()):  # the first predicted fastest
        targets[name] = RemoteTarget(name, TargetKind.CLOUD, endpoint,
                                     RemoteEstimator(ttft_ms=10.0 * (i + 1), inter_token_ms=1.0),
                                     CircuitBreaker(), time.monotonic)
        router.add_remote(targets[name], (settings.default_model,))
    return router, targets


def _plan(router: Router, budget_ms: float | None = 60_000) -> Plan:
    remotes = router.targets_for("")[1]
    request = RoutedRequest(SamplingParams(max_tokens=1), prompt="hi")
    query = Query(1, 1, 16, Policy.CLOUD_ONLY, budget_ms)
    admitted = Admitted(request, 1, 16)
    return Plan(admitted, query, choose(query, [r.estimate(admitted) for r in remotes]), "m")


async def _run(router: Router, plan: Plan) -> tuple[list[RouteChange], str]:
    items = [item async for item in router.run(plan)]
    return ([i for i in items if isinstance(i, RouteChange)],
            "".join(i.text for i in items if isinstance(i, TextDelta)))


async def test_a_late_first_token_starts_the_backup_and_the_first_to_answer_streams(tmp_path: Path) -> None:
    stalled, backup = Held("stalled"), Held("backup", answer_now=True)
    router, targets = _router(tmp_path, {"stalled": stalled, "backup": backup})
    routes, text = await _run(router, _plan(router))
    assert text == "backup"
    assert [(r.target, r.failover) for r in routes] == [("stalled", False), ("backup", True)]
    assert routes[1].reason.startswith("hedged: stalled had not answered after 50 ms")
    assert stalled.cancelled == 1 and backup.started == 1  # the loser's request is cancelled
    assert all(t.estimator.in_flight.count == 0 for t in targets.values())  # both holds released
    assert targets["stalled"].breaker.failures == 0  # a cancelled hedge is no failure of the endpoint


async def test_a_first_token_in_time_starts_no_hedge(tmp_path: Path) -> None:
    quick, backup = Held("quick", answer_now=True), Held("backup", answer_now=True)
    router, _ = _router(tmp_path, {"quick": quick, "backup": backup})
    routes, text = await _run(router, _plan(router))
    assert (text, [r.target for r in routes], backup.started) == ("quick", ["quick"], 0)


async def test_the_primary_answering_after_the_backup_started_still_wins_when_first(tmp_path: Path) -> None:
    slow, backup = Held("slow"), Held("backup")  # neither answers by itself
    router, _ = _router(tmp_path, {"slow": slow, "backup": backup})
    run = asyncio.ensure_future(_run(router, _plan(router)))
    while not backup.started:  # the hedge has started
        await asyncio.sleep(0.01)
    slow.go.set()
    routes, text = await run
    assert (text, [r.target for r in routes]) == ("slow", ["slow"])
    assert backup.cancelled == 1


async def test_a_primary_failing_during_the_race_leaves_the_backup_to_answer(tmp_path: Path) -> None:
    failing, backup = Held("failing", error="failing: HTTP 503"), Held("backup")
    router, targets = _router(tmp_path, {"failing": failing, "backup": backup})
    run = asyncio.ensure_future(_run(router, _plan(router)))
    while not backup.started:
        await asyncio.sleep(0.01)
    failing.go.set()
    while not targets["failing"].breaker.failures:  # its failure is in before the backup answers
        await asyncio.sleep(0.01)
    backup.go.set()
    routes, text = await run
    assert text == "backup" and [r.target for r in routes] == ["failing", "backup"]
    assert targets["failing"].breaker.failures == 1  # its failure counts
    assert all(t.estimator.in_flight.count == 0 for t in targets.values())


async def test_without_a_budget_or_with_hedging_off_nothing_is_hedged(tmp_path: Path) -> None:
    for hedging, budget in ((CONFIG, None), (None, 60_000.0)):
        slow, backup = Held("slow"), Held("backup", answer_now=True)
        router, _ = _router(tmp_path, {"slow": slow, "backup": backup}, hedging)
        run = asyncio.ensure_future(_run(router, _plan(router, budget)))
        await asyncio.sleep(0.2)  # four times the hedge's delay: no hedge may start
        assert backup.started == 0
        slow.go.set()
        assert (await run)[1] == "slow"
