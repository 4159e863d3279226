"""The router at run time: finds the targets for a model, admits the request, asks the policy, runs the
route, fails over.

Layer: router. `plan` admits the request once (the model's own target renders and counts it, or the
default model's for a model only remote targets serve), gathers every target's estimate and asks
policy.choose (pure). `run` streams from the chosen target; when a target fails before its first
token, the next one in the decision's order takes the request; when it fails mid-stream, the next one
continues from the text already delivered, so the client sees one coherent stream. Each route taken is
announced with a RouteChange item in the stream. Every target is a `Target` (targets.py): the router
never asks which kind of object it holds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace

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
from laas.router.embedding import EmbedCandidate, choose_embedding
from laas.router.policy import Decision, Policy, Query, TargetKind, choose
from laas.router.redact import Redaction
from laas.router.remote import RemoteTarget
from laas.router.targets import Admitted, Device, DeviceTarget, RoutedRequest, Target


@dataclass(frozen=True, slots=True)
class RouteChange:
    """Announces the target that streams what follows, and why."""

    target: str
    kind: TargetKind
    reason: str
    predicted_ms: float
    failover: bool
    model: str


@dataclass(frozen=True, slots=True)
class Plan:
    admitted: Admitted
    query: Query
    decision: Decision
    model: str


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
                 embedding_models: dict[str, dict[str, str]] | None = None) -> None:
        # Per remote target: requested embedding model -> the endpoint's own name for it ([[remotes]]).
        self._embedding_models = embedding_models or {}
        self._device = device
        self._aliases = aliases
        # max_tokens for requests that set none (settings.default_max_tokens; a SIGHUP reload sets it anew)
        self.default_max_tokens = default_max_tokens
        self._clock = clock
        self.remote = {r.name: r for r in remotes}
        # Which remote targets answer for which requested model name ("" means the default model).
        self._remote_models = remote_models

    def add_remote(self, target: RemoteTarget, models: tuple[str, ...]) -> None:
        """Adds (or replaces) a remote target at run time: a LAN peer found by discovery."""
        self.remote[target.name] = target
        self._remote_models[target.name] = models

    def remove_remote(self, name: str) -> None:
        """Drops a remote target; requests already running on it go on (or fail over) undisturbed."""
        self.remote.pop(name, None)
        self._remote_models.pop(name, None)

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

    async def plan(self, model: str, request: RoutedRequest, policy: Policy, budget_ms: float | None) -> Plan:
        local, remotes = self.targets_for(model)
        if local is not None and (not remotes or policy is Policy.LOCAL_ONLY):
            local.check_servable()  # the device alone: its own error (fetching, failed) is the answer
        # A model only remote targets serve is counted with the default model's tokenizer.
        admitted = await self.admit(request, local or self.local.get(self._device.default_model))
        query = Query(admitted.prompt_tokens, request.sampling.max_tokens, self.default_max_tokens, policy,
                      budget_ms)
        targets: list[Target] = [*([local] if local is not None else []), *remotes]
        decision = choose(query, [t.estimate(admitted) for t in targets])
        return Plan(admitted, query, decision, model or self._device.default_model)

    def embed_plan(self, model: str, policy: Policy) -> EmbedPlan:
        """The targets that serve `model`'s embeddings (embedding.py), judged; raises when none may."""
        name = model or self._device.default_model
        local_name = self._aliases.get(name, name)
        local = self.local.get(local_name)
        candidates = [EmbedCandidate(local.embed_estimate(), local_name)] if local is not None else []
        for r in self.remote.values():
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
        for estimate in plan.decision.order:
            target = self._target(estimate.kind, estimate.target)
            if target is None:  # a discovered peer that went away since the plan
                failures.append(f"{estimate.target}: gone")
                continue
            if plan.query.policy is Policy.LOCAL_ONLY and target.kind is not TargetKind.LOCAL:
                raise AssertionError(f"a local-only request was routed to {target.name}")  # policy.choose bug
            resumed = "".join(delivered)
            if resumed:
                if plan.admitted.budget - completion_tokens < 1:  # the broken stream delivered every token asked for
                    yield Completion(FinishReason.LENGTH, Usage(0, completion_tokens), Timings())
                    return
                admitted = plan.admitted.continued(resumed, completion_tokens)
            reason = plan.decision.reason if not failures else f"failover after {failures[-1]}"
            yield RouteChange(target.name, target.kind, reason, estimate.predicted_ms, bool(failures), plan.model)
            try:
                async for chunk in target.stream(admitted):
                    if isinstance(chunk, TextDelta):
                        delivered.append(chunk.text)
                        completion_tokens += 1
                    elif isinstance(chunk, Completion) and resumed:
                        chunk = replace(chunk, usage=Usage(chunk.usage.prompt_tokens, completion_tokens))
                    yield chunk
                return
            except TargetFailed as e:
                failures.append(str(e))
            except (OutOfRange, Unavailable, ResourceExhausted) as e:
                # e.g. the continued prompt no longer fits; a model not loaded found the prompt longer than
                # its estimate, or no room in the memory budget: the next target, if any, takes it
                if not failures and estimate is plan.decision.order[-1]:
                    raise
                failures.append(f"{target.name}: {e}")
        raise Unavailable("every target failed: " + " | ".join(failures) if failures else "no target left")
