"""The router at run time: finds the targets for a model, asks the policy, runs the route, fails over.

Layer: application. `plan` counts the prompt's tokens with the local tokenizer, gathers every target's
estimate and asks policy.choose (pure). `run` streams from the chosen target; when a target fails
before its first token, the next one in the decision's order takes the request; when it fails
mid-stream, the next one continues from the text already delivered, so the client sees one coherent
stream. Each route taken is announced with a RouteChange item in the stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace

from laas.core.errors import NotFound, OutOfRange, ResourceExhausted, TargetFailed, Unavailable
from laas.core.types import Completion, FinishReason, GenerationChunk, TextDelta, Timings, Usage
from laas.daemon.registry import ModelEntry, ModelRegistry
from laas.router.policy import Decision, Policy, Query, TargetKind, choose
from laas.router.redact import Redaction
from laas.router.targets import LocalTarget, RemoteTarget, RoutedRequest

Target = LocalTarget | RemoteTarget


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
    request: RoutedRequest
    query: Query
    decision: Decision
    model: str


class Router:
    def __init__(self, registry: ModelRegistry, remotes: Sequence[RemoteTarget], aliases: dict[str, str],
                 remote_models: dict[str, tuple[str, ...]], default_max_tokens: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._aliases = aliases
        self._default_max_tokens = default_max_tokens
        self._clock = clock
        self._local: dict[str, LocalTarget] = {}
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
    def local(self) -> dict[str, LocalTarget]:
        """A target per local model, following the registry (a SIGHUP reload adds and replaces models);
        a model that stays keeps its learned estimates."""
        entries = {e.name: e for e in self._registry.entries()}
        for name in [n for n, t in self._local.items() if entries.get(n) is not t.entry]:
            del self._local[name]
        for name, entry in entries.items():
            if name not in self._local:
                self._local[name] = LocalTarget(entry, self._registry, self._default_max_tokens, self._clock)
        return self._local

    def targets_for(self, model: str) -> tuple[LocalTarget | None, list[RemoteTarget]]:
        name = model or self._registry.default.name
        local_name = self._aliases.get(name, name)
        local = self.local.get(local_name)
        remotes = [r for r in self.remote.values()
                   if name in self._remote_models.get(r.name, ()) or
                   (not self._remote_models.get(r.name) and name == self._registry.default.name)]
        if local is None and not remotes:
            self._registry.get(model)  # raises NotFound naming the known models
            raise NotFound(f"model {model!r} is not served here", field="model")  # pragma: no cover
        return local, remotes

    async def plan(self, model: str, request: RoutedRequest, policy: Policy, budget_ms: float | None) -> Plan:
        local, remotes = self.targets_for(model)
        if local is not None and (not remotes or policy is Policy.LOCAL_ONLY):
            local.entry.check_servable()  # the device alone: its own error (fetching, failed) is the answer
        prompt_tokens = await self._count(request, local)
        query = Query(prompt_tokens, request.sampling.max_tokens, self._default_max_tokens, policy, budget_ms)
        max_tokens = request.sampling.max_tokens or self._default_max_tokens
        estimates = ([local.estimate(prompt_tokens, self._granted(local, prompt_tokens, request))] if local else [])
        estimates += [r.estimate(prompt_tokens, max_tokens) for r in remotes]
        return Plan(request, query, choose(query, estimates), model or self._registry.default.name)

    def _granted(self, target: LocalTarget, prompt_tokens: int, request: RoutedRequest) -> int:
        """The tokens the device would generate: an unset max_tokens is shortened to the room left."""
        if request.sampling.max_tokens is not None:
            return request.sampling.max_tokens
        return max(min(self._default_max_tokens, target.context_length - prompt_tokens), 1)

    async def _count(self, request: RoutedRequest, local: LocalTarget | None) -> int:
        """Prompt tokens, counted with the model's own tokenizer (the default model's for remote-only models)
        when it is loaded."""
        entry: ModelEntry = local.entry if local is not None else self._registry.default
        async with self._registry.holding(entry) as engine:  # not unloaded while it counts
            if engine is not None:
                counter = self.local.get(entry.name) or LocalTarget(entry, self._registry, self._default_max_tokens,
                                                                    self._clock)
                try:
                    return len((await counter.render(request, engine=engine)).prompt_tokens or ())
                except Unavailable:  # unloaded meanwhile
                    pass
        # The model is not loaded (it loads if the request runs here; planning does not load it):
        # estimate from the text, about 4 bytes a token. The bound request is counted exactly.
        text = request.prompt or "".join(m.content for m in request.messages)
        return len(text.encode()) // 4 + 1

    async def run(self, plan: Plan) -> AsyncGenerator[GenerationChunk | RouteChange | Redaction, None]:
        delivered: list[str] = []
        failures: list[str] = []
        completion_tokens = 0
        request = plan.request
        for estimate in plan.decision.order:
            found = self.local.get(estimate.target) if estimate.kind is TargetKind.LOCAL \
                else self.remote.get(estimate.target)
            if found is None:  # a discovered peer that went away since the plan
                failures.append(f"{estimate.target}: gone")
                continue
            target: Target = found
            if plan.query.policy is Policy.LOCAL_ONLY and target.kind is not TargetKind.LOCAL:
                raise AssertionError(f"a local-only request was routed to {target.name}")  # policy.choose bug
            resumed = "".join(delivered)
            if resumed:
                left = (plan.request.sampling.max_tokens or self._default_max_tokens) - completion_tokens
                if left < 1:  # the broken stream had already delivered every token asked for
                    yield Completion(FinishReason.LENGTH, Usage(0, completion_tokens), Timings())
                    return
                request = plan.request.continued(resumed, left)
            reason = plan.decision.reason if not failures else f"failover after {failures[-1]}"
            yield RouteChange(target.name, target.kind, reason, estimate.predicted_ms, bool(failures), plan.model)
            try:
                max_tokens = request.sampling.max_tokens or self._default_max_tokens
                if isinstance(target, LocalTarget):
                    max_tokens = self._granted(target, plan.query.prompt_tokens, request)
                async for chunk in target.stream(request, plan.query.prompt_tokens, max_tokens, resumed):
                    if isinstance(chunk, TextDelta):
                        delivered.append(chunk.text)
                        completion_tokens += 1
                    elif isinstance(chunk, Completion) and resumed:
                        usage = Usage(chunk.usage.prompt_tokens, completion_tokens)
                        chunk = replace(chunk, usage=usage)
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
