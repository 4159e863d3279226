"""Remote targets added and removed at run time (discovered LAN peers): a plan outlives its targets."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from pathlib import Path

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
from laas.router.latency import CircuitBreaker, RemoteEstimator
from laas.router.policy import Policy, Query, TargetKind, choose
from laas.router.remote import RemoteTarget
from laas.router.targets import Admitted, RoutedRequest


class Echo:
    """A remote endpoint that answers with its word."""

    context_length = 4096

    def __init__(self, word: str) -> None:
        self.word = word

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        yield TextDelta(self.word)
        yield Completion(FinishReason.STOP, Usage(1, 1), Timings())

    async def check_health(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _peer(name: str, ttft_ms: float) -> RemoteTarget:
    return RemoteTarget(name, TargetKind.PEER, Echo(name), RemoteEstimator(ttft_ms=ttft_ms), CircuitBreaker(),
                        time.monotonic)


async def test_a_peer_that_left_after_the_plan_is_skipped_and_the_next_takes_the_request(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    registry = ModelRegistry(settings, ModelStore(settings.store), None)  # type: ignore[arg-type]
    router = Router(LocalModels(registry, time.monotonic), [], {}, {}, 16)
    model = settings.default_model
    router.add_remote(_peer("near", 10), (model,))
    router.add_remote(_peer("far", 500), (model,))
    remotes = router.targets_for("")[1]
    assert [r.name for r in remotes] == ["near", "far"]
    request = RoutedRequest(SamplingParams(max_tokens=1), prompt="hi")
    query = Query(1, 1, 16, Policy.CLOUD_ONLY)
    admitted = Admitted(request, 1, 16)
    plan = Plan(admitted, query, choose(query, [r.estimate(admitted) for r in remotes]), model)
    assert plan.decision.chosen.target == "near"
    router.remove_remote("near")  # its goodbye arrives between the plan and the run
    assert [r.name for r in router.targets_for("")[1]] == ["far"]
    items = [item async for item in router.run(plan)]
    routes = [i for i in items if isinstance(i, RouteChange)]
    assert [(r.target, r.failover) for r in routes] == [("far", True)]
    assert "near: gone" in routes[0].reason
    assert [i.text for i in items if isinstance(i, TextDelta)] == ["far"]
