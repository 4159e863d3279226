"""The gRPC servicer of laas.v1.Runtime: the only place protobuf types meet domain types.

Layer: edge. Each method converts the request to domain values (validation.py checks them), asks the
registry and the router policy, and converts the results back. Every LaasError becomes its status
code through errors.STATUS_TABLE, with the field at fault in the `laas-field` trailing metadata; any
other exception is a bug, logged and answered INTERNAL without internals.

Two rules protect callers from each other: an unknown model's NOT_FOUND lists the served models only
to callers with the models:read scope; and a request's keep_alive_s, without the models:admin scope, is
clamped (clamp_keep_alive): it may keep its model loaded longer than the model's keep-alive, up to
MAX_KEEP_ALIVE_S (or the model's own when longer), never shorter (0 would unload it for everyone) and
never forever (< 0 would pin it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc

from laas.core.errors import FIELD_METADATA_KEY, InvalidArgument, LaasError, NotFound, ShuttingDown, status_for
from laas.core.types import Completion, FinishReason, GenerationChunk, ModelFormat, TextDelta, Timings
from laas.daemon import validation
from laas.daemon.access import current_principal
from laas.daemon.metrics import Metrics
from laas.daemon.privacy import PrivacyRules
from laas.daemon.registry import ModelEntry, ModelRegistry, ModelState
from laas.router.dispatch import Plan, RouteChange, Router
from laas.router.policy import Policy, TargetKind
from laas.router.redact import Redaction
from laas.router.targets import RoutedRequest
from laas.v1 import runtime_pb2 as pb
from laas.v1 import runtime_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_FINISH = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}
_FORMAT = {ModelFormat.GGUF: pb.MODEL_FORMAT_GGUF, ModelFormat.ONNX: pb.MODEL_FORMAT_ONNX,
           ModelFormat.REMOTE: pb.MODEL_FORMAT_UNSPECIFIED}
_POLICY = {pb.ROUTING_POLICY_AUTO: Policy.AUTO, pb.ROUTING_POLICY_LOCAL_ONLY: Policy.LOCAL_ONLY,
           pb.ROUTING_POLICY_CLOUD_ONLY: Policy.CLOUD_ONLY, pb.ROUTING_POLICY_PREFER_LOCAL: Policy.PREFER_LOCAL}
_KIND = {TargetKind.LOCAL: pb.TARGET_KIND_LOCAL, TargetKind.PEER: pb.TARGET_KIND_PEER,
         TargetKind.CLOUD: pb.TARGET_KIND_CLOUD}
_STATE = {
    ModelState.NOT_LOADED: pb.MODEL_STATE_NOT_LOADED,
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}
MAX_KEEP_ALIVE_S = 3600.0  # the longest keep-alive a request without models:admin may ask for
_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty",
                      "presence_penalty", "frequency_penalty")


class Lifecycle:
    """Whether new calls are accepted, and which streams are in flight (for the drain)."""

    def __init__(self) -> None:
        self.accepting = True
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()

    def check(self) -> None:
        if not self.accepting:
            raise ShuttingDown("the daemon is shutting down; retry on another instance")


@asynccontextmanager
async def _status_on_error(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Answers a LaasError with its status code (and the field at fault); any other exception is a bug."""
    try:
        yield
    except LaasError as error:
        metadata = ((FIELD_METADATA_KEY, error.field),) if error.field else ()
        await context.abort(status_for(error), error.message, trailing_metadata=metadata)
    except (grpc.aio.AbortError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("internal error while serving a request")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; the daemon's log has the details")


@contextmanager
def _names_hidden(name: str, field: str) -> Iterator[None]:
    """A NOT_FOUND for `field` lists the served models only to callers that may read them (models:read)."""
    try:
        yield
    except NotFound as e:
        if e.field != field or "models:read" in current_principal.get().scopes:
            raise
        raise NotFound(f"{field} {name!r} is not served here", field=field) from None


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


def _sampling(msg: pb.SamplingParams) -> Any:
    fields = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING if msg.HasField(name)}  # type: ignore[arg-type]
    return validation.sampling_from(fields, list(msg.stop), msg.ignore_eos)


def model_to_pb(entry: ModelEntry) -> pb.Model:
    out = pb.Model(
        name=entry.name, loaded=entry.state is ModelState.READY, state=_STATE[entry.state],
        is_default=entry.is_default, active_requests=entry.queue.active, queued_requests=entry.queue.waiting,
        error=entry.error, format=pb.MODEL_FORMAT_GGUF, memory_bytes=entry.memory_bytes,
        keep_alive_s=entry.idle_keep_alive_s, last_used_unix_s=entry.last_used_wall,
    )
    if entry.expires_at is not None and entry.engine is not None and not entry.busy:
        out.unloads_in_s = max(entry.expires_at - time.monotonic(), 0.0)
    info = entry.info
    if info is not None:
        out.format = _FORMAT[info.format]
        out.quantization = info.quantization
        out.context_length = info.context_length
        out.trained_context_length = info.trained_context_length
        out.size_bytes = info.size_bytes
        out.architecture = info.architecture
    return out


def _route_pb(route: RouteChange, local_only: bool = False, redacted: int = 0) -> pb.RouteInfo:
    return pb.RouteInfo(target=route.target, kind=_KIND[route.kind], reason=route.reason,
                        predicted_ms=route.predicted_ms, failover=route.failover, local_only=local_only,
                        redacted=redacted)


def _final(chunk: Completion, ttft_ms: float) -> pb.GenerateResponse:
    t, u = chunk.timings, chunk.usage
    return pb.GenerateResponse(
        finish_reason=_FINISH[chunk.finish_reason],
        usage=pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                       cached_prompt_tokens=u.cached_prompt_tokens),
        timings=pb.Timings(
            queue_ms=t.queue_ms, load_ms=t.load_ms, prompt_ms=t.prompt_ms, decode_ms=t.decode_ms,
            time_to_first_token_ms=ttft_ms,
            prompt_tokens_per_second=Timings.rate(u.prompt_tokens, t.prompt_ms),
            decode_tokens_per_second=Timings.rate(max(u.completion_tokens - 1, 0), t.decode_ms),
        ),
    )


class RuntimeService(pb_grpc.RuntimeServicer):
    def __init__(self, registry: ModelRegistry, router: Router, lifecycle: Lifecycle,
                 privacy: PrivacyRules | None = None, metrics: Metrics | None = None,
                 keep_alive_s: float = 300.0) -> None:
        self._registry = registry
        self._keep_alive_s = keep_alive_s  # the daemon's keep_alive_s, for models that set none
        self._router = router
        self._lifecycle = lifecycle
        self._privacy = privacy or PrivacyRules()
        self._metrics = metrics or Metrics(registry, router)

    # -- streaming generation -------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        async for out in self._stream(context, request):
            yield out

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[pb.GenerateResponse]:
        async for out in self._stream(context, request):
            yield out

    async def _stream(self, context: grpc.aio.ServicerContext, request: pb.GenerateRequest | pb.ChatRequest
                      ) -> AsyncIterator[pb.GenerateResponse]:
        arrived = time.perf_counter()
        self._lifecycle.enter()
        recorder = self._metrics.stream(request.model)  # labelled by a known name only
        status = "CANCELLED"
        try:
            async with _status_on_error(context):
                try:
                    self._lifecycle.check()
                    plan = await self._plan(context, request)
                    ttft_ms = 0.0
                    route: RouteChange | None = None
                    redacted = 0
                    local_only = plan.query.policy is Policy.LOCAL_ONLY
                    async for item in self._router.run(plan):
                        if isinstance(item, RouteChange):
                            route = item  # sent with the next message; a target that fails first is never shown
                            recorder.route = item.target
                            continue
                        if isinstance(item, Redaction):  # the route's target got placeholders for personal data
                            redacted = item.count
                            continue
                        if isinstance(item, TextDelta):
                            recorder.on_delta()
                        else:
                            status = "OK"
                        first = not ttft_ms
                        if first:
                            ttft_ms = (time.perf_counter() - arrived) * 1000
                        out = self._to_pb(item, ttft_ms)
                        if first:
                            out.model = plan.model
                        if route is not None:
                            out.route.CopyFrom(_route_pb(route, local_only, redacted))
                            route, redacted = None, 0
                        yield out
                except LaasError as e:
                    status = status_for(e).name
                    raise
                except Exception:
                    status = "INTERNAL"
                    raise
        finally:
            recorder.finish(status)
            self._lifecycle.leave()

    @staticmethod
    def _to_pb(chunk: GenerationChunk, ttft_ms: float) -> pb.GenerateResponse:
        if isinstance(chunk, Completion):
            return _final(chunk, ttft_ms)
        return pb.GenerateResponse(text=chunk.text)

    async def _plan(self, context: grpc.aio.ServicerContext, request: pb.GenerateRequest | pb.ChatRequest) -> Plan:
        model = validation.model_name(request.model)
        sampling = _sampling(request.sampling)
        self._privacy.check(sampling)
        keep_alive = self._request_keep_alive(
            model, validation.keep_alive(request.keep_alive_s if request.HasField("keep_alive_s") else None))
        if isinstance(request, pb.ChatRequest):
            messages = validation.chat_messages([(m.role, m.content) for m in request.messages])
            routed = RoutedRequest(sampling, messages=messages, keep_alive_s=keep_alive)
        else:
            routed = RoutedRequest(sampling, prompt=validation.prompt(request.prompt), keep_alive_s=keep_alive)
        policy = _POLICY.get(request.routing.policy)
        if policy is None:
            raise InvalidArgument(f"routing.policy {request.routing.policy} is not a known policy",
                                  field="routing.policy")
        if self._privacy.local_only_reason(model or self._registry.default.name, current_principal.get(),
                                           policy is Policy.LOCAL_ONLY):
            policy = Policy.LOCAL_ONLY  # the operator's or the client's word: never leave the device
        budget = request.routing.latency_budget_ms if request.routing.HasField("latency_budget_ms") else None
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise InvalidArgument(f"routing.latency_budget_ms must be > 0; got {budget}",
                                  field="routing.latency_budget_ms")
        remaining = context.time_remaining()
        if budget is None and remaining is not None:
            budget = remaining * 1000
        with _names_hidden(model, "model"):
            return await self._router.plan(model, routed, policy, budget)

    def _request_keep_alive(self, model: str, requested: float | None) -> float | None:
        if requested is None:
            return None
        local = self._privacy.resolved(model or self._registry.default.name)
        entry = next((e for e in self._registry.entries() if e.name == local), None)
        configured = entry.config.keep_alive_s if entry is not None else None
        default = self._keep_alive_s if configured is None else configured
        return clamp_keep_alive(requested, default, "models:admin" in current_principal.get().scopes)

    async def ExplainRoute(self, request: pb.ExplainRouteRequest, context: grpc.aio.ServicerContext
                           ) -> pb.RouteExplanation:
        async with _status_on_error(context):
            which = request.WhichOneof("request")
            if which is None:
                raise InvalidArgument("set generate or chat", field="request")
            plan = await self._plan(context, getattr(request, which))
            d = plan.decision
            chosen = RouteChange(d.chosen.target, d.chosen.kind, d.reason, d.chosen.predicted_ms, False, plan.model)
            return pb.RouteExplanation(
                chosen=_route_pb(chosen, plan.query.policy is Policy.LOCAL_ONLY), order=[e.target for e in d.order],
                candidates=[pb.RouteCandidate(
                    route=pb.RouteInfo(target=j.estimate.target, kind=_KIND[j.estimate.kind],
                                       predicted_ms=j.estimate.predicted_ms),
                    eligible=j.eligible, meets_deadline=j.meets_deadline, note=j.note) for j in d.judged],
                prompt_tokens=plan.query.prompt_tokens,
                max_tokens=plan.query.max_tokens or plan.query.default_max_tokens,
                budget_ms=plan.query.budget_ms or 0.0,
            )
        raise AssertionError("unreachable")

    # -- unary ------------------------------------------------------------------------------------

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
                       ) -> pb.TokenizeResponse:
        async with _status_on_error(context):
            text = validation.prompt(request.text, "text")
            name = validation.model_name(request.model)
            with _names_hidden(name, "model"):
                entry = self._registry.get(name)
            async with self._registry.using(entry) as engine:
                tokens = await engine.tokenize(text, add_special=request.add_special)
            return pb.TokenizeResponse(tokens=list(tokens), count=len(tokens))
        raise AssertionError("unreachable")  # _status_on_error re-raises as a status

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_to_pb(e) for e in self._registry.entries()])

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        """The Prometheus metrics' samples (the same figures the metrics endpoint serves)."""
        return pb.Stats(samples=[pb.Sample(name=s.name, labels=dict(s.labels), value=s.value)
                                 for s in self._metrics.samples()])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        async with _status_on_error(context):
            return model_to_pb(self._registry.get(validation.model_name(request.name, "name"), field="name"))
        raise AssertionError("unreachable")

    # -- admin: residency -------------------------------------------------------------------------

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        async with _status_on_error(context):
            self._lifecycle.check()
            name = validation.model_name(request.name, "name")
            with _names_hidden(name, "name"):
                entry = self._registry.get(name, field="name")
            keep_alive = validation.keep_alive(request.keep_alive_s if request.HasField("keep_alive_s") else None)
            async with self._registry.using(entry, keep_alive):  # raises the load's error (failed, budget)
                pass
            return model_to_pb(entry)
        raise AssertionError("unreachable")

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        async with _status_on_error(context):
            name = validation.model_name(request.name, "name")
            with _names_hidden(name, "name"):
                entry = self._registry.get(name, field="name")
            await self._registry.unload(entry)
            return model_to_pb(entry)
        raise AssertionError("unreachable")
