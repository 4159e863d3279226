"""The router at run time: finds the targets for a model, admits the request, asks the policy, runs the
route, fails over.

Layer: router. `plan` admits the request once (the model's own target renders and counts it, or the
default model's for a model only remote targets serve), gathers every target's estimate and asks
policy.choose (pure). `run` streams from the chosen target; when a target fails before its first
token, the next one in the decision's order takes the request; when it fails mid-stream, the next one
continues from the text already delivered, so the client sees one coherent stream. Each route taken is
announced with a RouteChange item in the stream. Each target taken holds the request's load (load.py)
from the moment it is chosen until its stream ends, however it ends, so that concurrent decisions
account for each other. Every target is a `Target` (targets.py): the router never asks which kind of
object it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import cast

from laas.core.errors import OutOfRange, ResourceExhausted, TargetFailed, Unavailable
from laas.core.types import (
    Completion,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    TextDelta,
    Timings,
    Usage,
)
from laas.router.cohort import Cohorts
from laas.router.embedding import EmbedCandidate, choose_embedding, peer_serves
from laas.router.hedge import Hedge, HedgeBudget, HedgeConfig, plan_hedge
from laas.router.load import Hold
from laas.router.policy import Decision, Policy, Query, TargetKind, choose
from laas.router.redact import Redaction
from laas.router.remote import RemoteTarget
from laas.router.targets import Admitted, Device, DeviceTarget, RoutedRequest, Streamed, Target

# Errors of a target that the next target may recover from (a request's own errors are raised at once).
FAILOVER_ERRORS = (TargetFailed, OutOfRange, Unavailable, ResourceExhausted)


@dataclass(frozen=True, slots=True)
class RouteChange:
    """Announces the target that streams what follows, and why."""

    target: str
    kind: TargetKind
    reason: str
    predicted_ms: float
    failover: bool
    model: str


class _Attempt:
    """One target running the request under its hold; `first` reads up to its first chunk (keeping it and
    what came before, a Redaction), so that two attempts can race to answer first."""

    def __init__(self, target: Target, hold: Hold, admitted: Admitted) -> None:
        self.target = target
        self.hold = hold
        self._items = target.stream(admitted, hold)
        self._head: list[Streamed] = []

    async def first(self) -> None:
        async for item in self._items:
            self._head.append(item)
            if not isinstance(item, Redaction):
                return

    def __aiter__(self) -> AsyncIterator[Streamed]:
        return self._all()

    async def _all(self) -> AsyncGenerator[Streamed, None]:
        head, self._head = self._head, []
        for item in head:
            yield item
        async for item in self._items:
            yield item

    async def close(self) -> None:
        """Stops it (the target sees the request cancelled) and releases its hold."""
        closing = getattr(self._items, "aclose", None)
        if closing is not None:
            with contextlib.suppress(Exception):
                await closing()
        self.hold.release()


@dataclass(frozen=True, slots=True)
class Plan:
    admitted: Admitted
    query: Query
    decision: Decision
    model: str
    hold: Hold | None = None  # the chosen target's reservation, when the decision was made in a cohort


@dataclass(frozen=True, slots=True)
class EmbedPlan:
    """Where an Embed call may run: the decision, and each eligible target's own name for the model."""

    decision: Decision
    model: str  # the model as requested, resolved ("" -> the default)
    serves: dict[str, str]  # target -> its name for the model


class Router:
    def __init__(self, device: Device, remotes: Sequence[RemoteTarget], aliases: dict[str, str],
                 remote_models: dict[str, tuple[str, ...]], default_max_tokens: int,
                 clock: Callable[[], float] = time.monotonic,
                 embedding_models: dict[str, dict[str, str]] | None = None,
                 local_digest: Callable[[str], str | None] | None = None,
                 hedging: HedgeConfig | None = None, gather_s: float = 0.0) -> None:
        # Requests whose route depends on the load, arriving within gather_s of each other, are decided
        # together (cohort.py); 0 decides each at once.
        self._cohorts = Cohorts(gather_s) if gather_s > 0 else None
        # Hedged requests (hedge.py): None turns them off.
        self._hedge_budget = HedgeBudget(hedging) if hedging is not None else None
        # Per remote target: requested embedding model -> the endpoint's own name for it ([[remotes]]).
        self._embedding_models = embedding_models or {}
        # Per discovered peer: embedding model -> the digest it advertises; and the device's digest of a model.
        self._peer_digests: dict[str, Mapping[str, str]] = {}
        self._local_digest = local_digest or (lambda _name: None)
        self._device = device
        self._aliases = aliases
        # max_tokens for requests that set none (settings.default_max_tokens; a SIGHUP reload sets it anew)
        self.default_max_tokens = default_max_tokens
        self._clock = clock
        self.remote = {r.name: r for r in remotes}
        # Which remote targets answer for which requested model name ("" means the default model).
        self._remote_models = remote_models

    def add_remote(self, target: RemoteTarget, models: tuple[str, ...],
                   embedding_digests: Mapping[str, str] | None = None) -> None:
        """Adds (or replaces) a remote target at run time: a LAN peer found by discovery, with the digests of
        the embedding models it advertises (Embed goes there only for a model whose digest is the device's)."""
        self.remote[target.name] = target
        self._remote_models[target.name] = models
        self._peer_digests[target.name] = dict(embedding_digests or {})

    def remove_remote(self, name: str) -> None:
        """Drops a remote target; requests already running on it go on (or fail over) undisturbed."""
        self.remote.pop(name, None)
        self._remote_models.pop(name, None)
        self._peer_digests.pop(name, None)

    @property
    def local(self) -> Mapping[str, DeviceTarget]:
        """A target per local model (the device follows its registry: a SIGHUP reload adds and replaces models)."""
        return self._device.targets()

    def targets_for(self, model: str) -> tuple[DeviceTarget | None, list[RemoteTarget]]:
        default = self._device.default_model
        name = model or default
        local = self.local.get(self._aliases.get(name, name))
        remotes = [r for r in self.remote.values()
                   if name in self._remote_models.get(r.name, ()) or
                   (not self._remote_models.get(r.name) and name == default)]
        if local is None and not remotes:
            raise self._device.not_served(model)
        return local, remotes

    async def admit(self, request: RoutedRequest, counter: DeviceTarget | None) -> Admitted:
        """The request admitted once: rendered and counted by `counter` (the model's own target) when it is
        loaded; else provisional, its tokens estimated from the text (the device renders it in its turn)."""
        bound = await counter.render(request) if counter is not None else None
        if bound is None or counter is None:
            return Admitted(request, request.text_tokens(), self.default_max_tokens)
        return Admitted(request, len(bound.prompt_tokens or ()), self.default_max_tokens, bound, counter.name)

    async def plan(self, model: str, request: RoutedRequest, policy: Policy, budget_ms: float | None,
                   run: bool = False) -> Plan:
        """Where the request goes. `run`: the caller runs the plan at once (Router.run), so it may be
        decided with its cohort and carry its reservation; an explanation is decided alone, reserving nothing."""
        local, remotes = self.targets_for(model)
        if local is not None and (not remotes or policy is Policy.LOCAL_ONLY):
            local.check_servable()  # the device alone: its own error (fetching, failed) is the answer
        # A model only remote targets serve is counted with the default model's tokenizer.
        admitted = await self.admit(request, local or self.local.get(self._device.default_model))
        query = Query(admitted.prompt_tokens, request.sampling.max_tokens, self.default_max_tokens, policy,
                      budget_ms)
        targets: list[Target] = [*([local] if local is not None else []), *remotes]
        name = model or self._device.default_model
        if (run and self._cohorts is not None and len(targets) > 1 and budget_ms is not None
                and policy in (Policy.AUTO, Policy.PREFER_LOCAL)):
            decision, hold = await self._cohorts.decide(query, admitted, targets)
            return Plan(admitted, query, decision, name, hold)
        decision = choose(query, [t.estimate(admitted) for t in targets])
        return Plan(admitted, query, decision, name)

    def embed_plan(self, model: str, policy: Policy) -> EmbedPlan:
        """The targets that serve `model`'s embeddings (embedding.py), judged; raises when none may."""
        name = model or self._device.default_model
        local_name = self._aliases.get(name, name)
        local = self.local.get(local_name)
        candidates = [EmbedCandidate(local.embed_estimate(), local_name)] if local is not None else []
        reference: list[str | None] = []  # the device's digest, asked for once there is a discovered peer
        for r in self.remote.values():
            advertised = self._peer_digests.get(r.name)
            if advertised is not None and r.embedder is not None:  # a discovered peer: the digests decide
                if not reference:
                    reference.append(self._local_digest(local_name) if local is not None else None)
                serves, refusal = peer_serves(local_name, reference[0], advertised)  # the name it has here
                candidates.append(EmbedCandidate(r.embed_estimate(), serves, refusal=refusal))
                continue
            declared = self._embedding_models.get(r.name, {})
            serves = declared.get(name) if r.embedder is not None else None
            candidates.append(EmbedCandidate(r.embed_estimate(), serves, tuple(declared)))
        if local is None and not any(c.serves for c in candidates):
            raise self._device.not_served(model)
        decision = choose_embedding(name, candidates, policy)
        return EmbedPlan(decision, name, {c.estimate.target: c.serves for c in candidates if c.serves})

    async def embed(self, plan: EmbedPlan, request: EmbeddingRequest, keep_alive_s: float | None
                    ) -> tuple[EmbeddingResult, RouteChange]:
        """Runs an Embed call on the plan's first target, the next on a remote failure (or a full queue)."""
        failures: list[str] = []
        for estimate in plan.decision.order:
            reason = plan.decision.reason if not failures else f"failover after {failures[-1]}"
            route = RouteChange(estimate.target, estimate.kind, reason, estimate.predicted_ms, bool(failures),
                                plan.model)
            try:
                if estimate.kind is TargetKind.LOCAL:
                    local = self.local.get(estimate.target)
                    if local is None:
                        failures.append(f"{estimate.target}: gone")
                        continue
                    return await local.embed(request, keep_alive_s), route
                remote = self.remote.get(estimate.target)
                if remote is None:
                    failures.append(f"{estimate.target}: gone")
                    continue
                return await remote.embed(plan.serves[estimate.target], request), route
            except TargetFailed as e:
                failures.append(str(e))
            except (Unavailable, ResourceExhausted) as e:
                if not failures and estimate is plan.decision.order[-1]:
                    raise
                failures.append(f"{estimate.target}: {e}")
        raise Unavailable("every target failed: " + " | ".join(failures) if failures else "no target left")

    def _target(self, estimate_kind: TargetKind, name: str) -> Target | None:
        return self.local.get(name) if estimate_kind is TargetKind.LOCAL else self.remote.get(name)

    async def run(self, plan: Plan) -> AsyncGenerator[GenerationChunk | RouteChange | Redaction, None]:
        delivered: list[str] = []
        failures: list[str] = []
        completion_tokens = 0
        admitted = plan.admitted
        hedge = self._plan_hedge(plan)
        tried: set[str] = set()
        reserved = plan.hold  # the cohort's reservation on the route (plan.decision.chosen), if it decided
        try:
            for estimate in plan.decision.order:
                if estimate.target in tried:  # the backup of a hedge that lost, or failed
                    continue
                target = self._target(estimate.kind, estimate.target)
                if target is None:  # a discovered peer that went away since the plan
                    failures.append(f"{estimate.target}: gone")
                    if reserved is not None and estimate is plan.decision.chosen:
                        reserved.release()
                    continue
                if plan.query.policy is Policy.LOCAL_ONLY and target.kind is not TargetKind.LOCAL:
                    raise AssertionError(f"a local-only request was routed to {target.name}")  # policy.choose bug
                resumed = "".join(delivered)
                if resumed:
                    if plan.admitted.budget - completion_tokens < 1:  # the broken stream delivered all asked for
                        yield Completion(FinishReason.LENGTH, Usage(0, completion_tokens), Timings())
                        return
                    admitted = plan.admitted.continued(resumed, completion_tokens)
                reason = plan.decision.reason if not failures else f"failover after {failures[-1]}"
                tried.add(target.name)
                # Reserved before anything is yielded: the caller starts the run right after the plan, with no
                # await between, so the next request's plan sees this one's load (a cohort reserved the route
                # when it decided).
                hold = reserved if reserved is not None and estimate is plan.decision.chosen else None
                hold = hold or target.reserve(admitted)
                attempt = _Attempt(target, hold, admitted)
                try:
                    yield RouteChange(target.name, target.kind, reason, estimate.predicted_ms, bool(failures),
                                      plan.model)
                    if hedge is not None and not failures:
                        attempt = await self._hedged(attempt, hedge, admitted, tried, failures)
                        if attempt.target is not target:
                            yield RouteChange(attempt.target.name, attempt.target.kind,
                                              f"hedged: {target.name} had not answered after {hedge.after_ms:.0f} ms",
                                              hedge.backup.predicted_ms, True, plan.model)
                    async for chunk in attempt:
                        if isinstance(chunk, TextDelta):
                            delivered.append(chunk.text)
                            completion_tokens += 1
                        elif isinstance(chunk, Completion):
                            attempt.hold.release()  # now: a caller may stop reading at the completion, not closing us
                            if resumed:
                                chunk = replace(chunk, usage=Usage(chunk.usage.prompt_tokens, completion_tokens))
                        yield chunk
                    return
                except TargetFailed as e:
                    failures.append(str(e))
                except (OutOfRange, Unavailable, ResourceExhausted) as e:
                    # e.g. the continued prompt no longer fits; a model not loaded found the prompt longer
                    # than its estimate, or no room in the memory budget: the next target, if any, takes it
                    if not failures and estimate is plan.decision.order[-1]:
                        raise
                    failures.append(f"{attempt.target.name}: {e}")
                finally:  # completed, cancelled, failed or failing over: its load leaves the target
                    attempt.hold.release()
            raise Unavailable("every target failed: " + " | ".join(failures) if failures else "no target left")
        finally:
            if reserved is not None:
                reserved.release()  # idempotent: the route's attempt released it, unless it never ran

    def _plan_hedge(self, plan: Plan) -> Hedge | None:
        if self._hedge_budget is None:
            return None
        self._hedge_budget.routed([e.target for e in plan.decision.order])
        return plan_hedge(plan.decision, plan.query, self._hedge_budget.config)

    async def _hedged(self, primary: _Attempt, hedge: Hedge, admitted: Admitted, tried: set[str],
                      failures: list[str]) -> _Attempt:
        """The attempt that answers first: `primary`, or the hedge's backup started once `primary` has not
        answered within hedge.after_ms. The other is cancelled (its stream closed, its hold released). A
        failure of one while the other runs goes to `failures`; when both fail, the last error is raised."""
        first = asyncio.ensure_future(primary.first())
        racing = {first: primary}
        try:
            done, _ = await asyncio.wait({first}, timeout=hedge.after_ms / 1000)
            backup_target = None if done else self._target(hedge.backup.kind, hedge.backup.target)
            if backup_target is None or hedge.backup.target in tried or not (
                    self._hedge_budget and self._hedge_budget.take(backup_target.name)):
                await first
                return primary
            tried.add(backup_target.name)
            backup = _Attempt(backup_target, backup_target.reserve(admitted), admitted)
            racing[asyncio.ensure_future(backup.first())] = backup
            pending = set(racing)
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                answered = [task for task in done if task.exception() is None]
                if answered:
                    winner = racing[answered[0]]
                    for task, attempt in racing.items():
                        if attempt is not winner:
                            task.cancel()
                            await asyncio.gather(task, return_exceptions=True)
                            await attempt.close()
                    return winner
                for task in done:
                    error = task.exception()
                    if not isinstance(error, FAILOVER_ERRORS) or not pending:
                        raise cast(BaseException, error)
                    failures.append(str(error) if isinstance(error, TargetFailed)
                                    else f"{racing[task].target.name}: {error}")
                    await racing[task].close()
        except BaseException:
            for task, attempt in racing.items():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await attempt.close()
            raise
