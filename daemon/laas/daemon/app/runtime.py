"""The runtime's use cases, once for every edge: generate and chat, embed, explain the route, tokenize,
the models (list, get, load, unload) and the stats.

Layer: application. Each use case takes domain values (values.py: the request as the client sent it)
and the :class:`~laas.daemon.app.calls.Call` (who calls, its audit record), and gives back domain values
or an async iterator of :class:`~laas.daemon.app.values.StreamChunk`; nothing here knows protobuf,
gRPC or HTTP. Here, once: the audit record (begun before any check, filled from domain values), the
validation (validation.py), the operator's limits and local-only rules (privacy.py), the keep-alive
clamp, the route (every call into the router is in :meth:`Runtime._route`), the metrics of a stream
and the status it ended with (settled in the call, read by the edges' logs).

Two rules protect callers from each other: an unknown model's NOT_FOUND lists the served models only
to callers with the models:read scope; and a request's keep_alive_s, without the models:admin scope, is
clamped (clamp_keep_alive): it may keep its model loaded longer than the model's keep-alive, up to
MAX_KEEP_ALIVE_S (or the model's own when longer), never shorter (0 would unload it for everyone) and
never forever (< 0 would pin it).

Embed runs as generation does: the same lifecycle (refused while draining, waited for by the drain),
validation, local-only rules, audit record and request metrics, and the model's own bounded queue (the
device target runs it in registry.queued). It needs the `generate` scope (access.py): it spends the
same model time on the caller's text, and a token that may generate should not need a new grant to
embed. Its route is the router's embed_plan: only targets serving that very model are eligible.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from laas.core.errors import InvalidArgument, NotFound
from laas.core.types import (
    ChatMessage,
    Completion,
    EmbeddingRequest,
    GenerationChunk,
    SamplingParams,
    TextDelta,
    Tool,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
    Usage,
)
from laas.daemon import constraints, validation
from laas.daemon.app.calls import Call, Lifecycle
from laas.daemon.app.values import (
    Candidate,
    EmbedReply,
    EmbedRequest,
    Explanation,
    ModelStatus,
    RouteInfo,
    StreamChunk,
    TextRequest,
)
from laas.daemon.metrics import Metrics, Sample
from laas.daemon.privacy import PrivacyRules
from laas.daemon.registry import ModelEntry, ModelRegistry
from laas.daemon.tokens import Principal
from laas.daemon.tool_calls import forced_call
from laas.router.dispatch import EmbedPlan, Plan, RouteChange, Router
from laas.router.policy import Decision, Policy
from laas.router.redact import Redaction
from laas.router.targets import RoutedRequest

MAX_KEEP_ALIVE_S = 3600.0  # the longest keep-alive a request without models:admin may ask for

RouterItem = GenerationChunk | RouteChange | Redaction


@dataclass(frozen=True, slots=True)
class Admitted:
    """A text request once validated and ruled on: what the router is asked to route."""

    model: str
    sampling: SamplingParams
    prompt: str
    messages: tuple[ChatMessage, ...]
    keep_alive_s: float | None
    policy: Policy
    budget_ms: float | None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)


def clamp_keep_alive(requested: float | None, default: float, admin: bool) -> float | None:
    """The keep-alive a request gets: as asked with models:admin; without it, within
    [default, max(default, MAX_KEEP_ALIVE_S)] (a negative ask, "forever", gets the upper end), and the
    model's own when that is "forever" already. None: the model's own."""
    if requested is None or admin:
        return requested
    if default < 0:
        return None
    high = max(default, MAX_KEEP_ALIVE_S)
    return high if requested < 0 else min(max(requested, default), high)


@contextmanager
def _names_hidden(name: str, field: str, principal: Principal) -> Iterator[None]:
    """A NOT_FOUND for `field` lists the served models only to callers that may read them (models:read)."""
    try:
        yield
    except NotFound as e:
        if e.field != field or "models:read" in principal.scopes:
            raise
        raise NotFound(f"{field} {name!r} is not served here", field=field) from None


def model_status(entry: ModelEntry) -> ModelStatus:
    """A frozen snapshot of a model's entry, as it is now."""
    unloads_in = None
    if entry.expires_at is not None and entry.engine is not None and not entry.busy:
        unloads_in = max(entry.expires_at - time.monotonic(), 0.0)
    return ModelStatus(
        name=entry.name, state=entry.state, is_default=entry.is_default, active_requests=entry.queue.active,
        queued_requests=entry.queue.waiting, error=entry.error, memory_bytes=entry.memory_bytes,
        keep_alive_s=entry.idle_keep_alive_s, last_used_unix_s=entry.last_used_wall, unloads_in_s=unloads_in,
        info=entry.info, parallel=entry.parallel,
    )


async def _check_constraints(admitted: Admitted) -> None:
    """The request's constraint (or the grammar its tool_choice implies) compiles and admits some output:
    INVALID_ARGUMENT naming the field otherwise, before it is routed. Compiling is blocking: in a thread."""
    forced = forced_call(admitted.tools, admitted.tool_choice)
    if forced is not None:  # each tool's parameters are a usable schema
        await asyncio.to_thread(constraints.check, forced, "tools")
    if admitted.sampling.constraint is not None:
        await asyncio.to_thread(constraints.check, admitted.sampling.constraint)


def _explanation(d: Decision, local_only: bool, prompt_tokens: int, max_tokens: int, budget_ms: float
                 ) -> Explanation:
    chosen = RouteInfo(d.chosen.target, d.chosen.kind, d.reason, d.chosen.predicted_ms, False, local_only)
    return Explanation(
        chosen=chosen, order=tuple(e.target for e in d.order),
        candidates=tuple(Candidate(RouteInfo(j.estimate.target, j.estimate.kind, predicted_ms=j.estimate.predicted_ms),
                                   j.eligible, j.meets_deadline, j.note) for j in d.judged),
        prompt_tokens=prompt_tokens, max_tokens=max_tokens, budget_ms=budget_ms,
    )


def _route_info(change: RouteChange, local_only: bool, redacted: int = 0) -> RouteInfo:
    return RouteInfo(change.target, change.kind, change.reason, change.predicted_ms, change.failover, local_only,
                     redacted)


class Runtime:
    def __init__(self, registry: ModelRegistry, router: Router, lifecycle: Lifecycle,
                 privacy: PrivacyRules | None = None, metrics: Metrics | None = None,
                 keep_alive_s: float = 300.0) -> None:
        self._registry = registry
        self._keep_alive_s = keep_alive_s  # the daemon's keep_alive_s, for models that set none
        self._router = router
        self._lifecycle = lifecycle
        self._privacy = privacy or PrivacyRules()
        self._metrics = metrics or Metrics(registry, router)

    # -- generation ---------------------------------------------------------------------------------

    async def generate(self, request: TextRequest, call: Call) -> AsyncGenerator[StreamChunk, None]:
        """Streams a Generate or Chat request's chunks, the route on the first chunk of each target taken."""
        call.begin(request.model, request.prompt if request.messages is None else request.messages)
        arrived = time.perf_counter()
        self._lifecycle.enter()
        recorder = self._metrics.stream(request.model)  # labelled by a known name only
        error: BaseException | None = None
        try:
            self._lifecycle.check()
            admitted = self._admit(request, call.principal)
            await _check_constraints(admitted)
            plan, run = await self._route(admitted, call.principal, run=True)
            local_only = admitted.policy is Policy.LOCAL_ONLY
            ttft_ms: float | None = None
            route: RouteChange | None = None
            redacted = 0
            async for item in run():
                if isinstance(item, RouteChange):
                    route = item  # sent with the next chunk; a target that fails first is never shown
                    recorder.route = item.target
                    continue
                if isinstance(item, Redaction):  # the route's target got placeholders for personal data
                    redacted = item.count
                    continue
                if isinstance(item, TextDelta | ToolCallDelta):
                    recorder.on_delta()
                first = ttft_ms is None
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - arrived) * 1000
                    if call.audit is not None:
                        call.audit.model = plan.model
                info = None
                if route is not None:
                    info = _route_info(route, local_only, redacted)
                    route, redacted = None, 0
                    if call.audit is not None:
                        call.audit.saw_route(info.target, info.kind.value, info.local_only, info.redacted)
                if isinstance(item, Completion):
                    item = replace(item, timings=replace(item.timings, time_to_first_token_ms=ttft_ms))
                    if call.audit is not None:
                        call.audit.saw_usage(item.usage)
                yield StreamChunk(item, plan.model if first else "", info)
        except BaseException as e:
            error = e
            raise
        finally:
            recorder.finish(call.settle(error))
            self._lifecycle.leave()

    async def explain_route(self, request: TextRequest, call: Call) -> Explanation:
        """The route a Generate or Chat request would take now, and why, without running it."""
        call.begin(request.model, request.prompt if request.messages is None else request.messages)
        admitted = self._admit(request, call.principal)
        await _check_constraints(admitted)
        plan, _ = await self._route(admitted, call.principal)
        q = plan.query
        return _explanation(plan.decision, q.policy is Policy.LOCAL_ONLY, q.prompt_tokens,
                            q.max_tokens or q.default_max_tokens, q.budget_ms or 0.0)

    # -- embeddings -----------------------------------------------------------------------------------

    async def embed(self, request: EmbedRequest, call: Call) -> EmbedReply:
        """The vectors of an Embed request's inputs, from a target that serves that very model."""
        call.begin(request.model, [i if isinstance(i, str) else list(i) for i in request.inputs])
        self._lifecycle.enter()
        recorder = self._metrics.stream(request.model)
        error: BaseException | None = None
        try:
            self._lifecycle.check()
            plan, embedding, keep_alive = self._embed_plan(request, call.principal)
            result, change = await self._router.embed(plan, embedding, keep_alive)
            recorder.route = change.target
            self._metrics.embedded(recorder.model, change.target, len(result.embeddings))
            route = _route_info(change, self._is_local_only(request, call.principal))
            if call.audit is not None:
                call.audit.model = plan.model
                call.audit.saw_route(route.target, route.kind.value, route.local_only, 0)
                call.audit.saw_usage(Usage(result.tokens, 0))
            return EmbedReply(plan.model, result, route)
        except BaseException as e:
            error = e
            raise
        finally:
            recorder.finish(call.settle(error))
            self._lifecycle.leave()

    async def explain_embed(self, request: EmbedRequest, call: Call) -> Explanation:
        """Where an Embed request would run now, and why the other targets are not eligible."""
        call.begin(request.model)
        plan, _, _ = self._embed_plan(request, call.principal)
        return _explanation(plan.decision, self._is_local_only(request, call.principal), 0, 0, 0.0)

    def _is_local_only(self, request: EmbedRequest, principal: Principal) -> bool:
        model = request.model or self._registry.default.name
        return bool(self._privacy.local_only_reason(model, principal, request.routing.policy is Policy.LOCAL_ONLY))

    def _embed_plan(self, request: EmbedRequest, principal: Principal
                    ) -> tuple[EmbedPlan, EmbeddingRequest, float | None]:
        model = validation.model_name(request.model)
        embedding = validation.embedding_request(request.inputs, request.dimensions, request.normalize,
                                                 request.truncate)
        keep_alive = self._request_keep_alive(model, validation.keep_alive(request.keep_alive_s), principal)
        policy = Policy.LOCAL_ONLY if self._is_local_only(request, principal) else request.routing.policy
        with _names_hidden(model, "model", principal):
            plan = self._router.embed_plan(model, policy)
        return plan, embedding, keep_alive

    def _admit(self, request: TextRequest, principal: Principal) -> Admitted:
        """Validates a text request and applies the operator's rules: limits, keep-alive, local-only."""
        model = validation.model_name(request.model)
        s = request.sampling
        sampling = validation.sampling_from(s.given(), list(s.stop), s.ignore_eos, s.logprobs)
        self._privacy.check(sampling)
        keep_alive = self._request_keep_alive(model, validation.keep_alive(request.keep_alive_s), principal)
        prompt: str = ""
        messages: tuple[ChatMessage, ...] = ()
        if request.messages is not None:
            messages = validation.chat_messages(request.messages)
        else:
            prompt = validation.prompt(request.prompt)
        tools = validation.tools(request.tools, request.tool_choice, request.messages is not None)
        if request.constraint is not None:
            if forced_call(tools, request.tool_choice) is not None:
                raise InvalidArgument("constraint: not with tool_choice required or a function (that is a "
                                      "constraint already)", field="constraint")
            sampling = replace(sampling, constraint=request.constraint)
        policy = request.routing.policy
        if self._privacy.local_only_reason(model or self._registry.default.name, principal,
                                           policy is Policy.LOCAL_ONLY):
            policy = Policy.LOCAL_ONLY  # the operator's or the client's word: never leave the device
        budget = request.routing.latency_budget_ms
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise InvalidArgument(f"routing.latency_budget_ms must be > 0; got {budget}",
                                  field="routing.latency_budget_ms")
        if budget is None:
            budget = request.routing.deadline_ms
        choice = request.tool_choice if tools else ToolChoice(ToolChoiceMode.NONE)
        return Admitted(model, sampling, prompt, messages, keep_alive, policy, budget, tools, choice)

    async def _route(self, admitted: Admitted, principal: Principal, run: bool = False
                     ) -> tuple[Plan, Callable[[], AsyncGenerator[RouterItem, None]]]:
        """The one place the application layer calls the router: the plan (the prompt counted, every
        target's estimate, the policy's decision) and the run it starts on demand (the route, failover).
        `run`: the caller starts the run at once (it may be decided with its cohort, reserving its route)."""
        routed = RoutedRequest(admitted.sampling, prompt=admitted.prompt, messages=admitted.messages,
                               keep_alive_s=admitted.keep_alive_s, tools=admitted.tools,
                               tool_choice=admitted.tool_choice)
        with _names_hidden(admitted.model, "model", principal):
            plan = await self._router.plan(admitted.model, routed, admitted.policy, admitted.budget_ms, run)
        return plan, lambda: self._router.run(plan)

    def _request_keep_alive(self, model: str, requested: float | None, principal: Principal) -> float | None:
        if requested is None:
            return None
        local = self._privacy.resolved(model or self._registry.default.name)
        entry = next((e for e in self._registry.entries() if e.name == local), None)
        configured = entry.config.keep_alive_s if entry is not None else None
        default = self._keep_alive_s if configured is None else configured
        return clamp_keep_alive(requested, default, "models:admin" in principal.scopes)

    # -- tokens, models, stats ------------------------------------------------------------------------

    async def tokenize(self, model: str, text: str, add_special: bool, call: Call) -> tuple[int, ...]:
        call.begin(model, text)
        text = validation.prompt(text, "text")
        name = validation.model_name(model)
        with _names_hidden(name, "model", call.principal):
            entry = self._registry.get(name)
        async with self._registry.using(entry) as engine:
            return tuple(await engine.tokenize(text, add_special=add_special))

    async def list_models(self, call: Call) -> list[ModelStatus]:
        call.begin()
        return [model_status(e) for e in self._registry.entries()]

    async def get_model(self, name: str, call: Call) -> ModelStatus:
        call.begin(name)
        return model_status(self._registry.get(validation.model_name(name, "name"), field="name"))

    async def load_model(self, name: str, keep_alive_s: float | None, call: Call) -> ModelStatus:
        """Loads a model (within the memory budget) and keeps it for `keep_alive_s` (None: its own)."""
        call.begin(name)
        self._lifecycle.check()
        name = validation.model_name(name, "name")
        with _names_hidden(name, "name", call.principal):
            entry = self._registry.get(name, field="name")
        async with self._registry.using(entry, validation.keep_alive(keep_alive_s)):  # raises the load's error
            pass
        return model_status(entry)

    async def unload_model(self, name: str, call: Call) -> ModelStatus:
        call.begin(name)
        name = validation.model_name(name, "name")
        with _names_hidden(name, "name", call.principal):
            entry = self._registry.get(name, field="name")
        await self._registry.unload(entry)
        return model_status(entry)

    async def stats(self, call: Call) -> list[Sample]:
        """The Prometheus metrics' samples (the same figures the metrics endpoint serves)."""
        call.begin()
        return self._metrics.samples()
