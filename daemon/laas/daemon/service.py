"""The gRPC servicer of laas.v1.Runtime: the only place protobuf types meet domain types.

Layer: edge. Each method converts its request to the application layer's domain values (app/values.py:
the fields as the client set them), calls the use case (app/runtime.py) with the current call (opened
by the interceptors: request_log.py, access.py) and converts the result back. Nothing else happens
here: validation, privacy, the route, the audit record and the metrics are the application layer's;
every error becomes its status code in one place, the call interceptor (request_log.py), for every
method alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from laas.core.errors import InvalidArgument
from laas.core.types import (
    ChatMessage,
    Completion,
    Constraint,
    ConstraintKind,
    FinishReason,
    ModelFormat,
    Timings,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
)
from laas.daemon.app.calls import Call, current_call
from laas.daemon.app.runtime import Runtime
from laas.daemon.app.values import (
    EmbedReply,
    EmbedRequest,
    Explanation,
    ModelStatus,
    RouteInfo,
    Routing,
    SamplingFields,
    StreamChunk,
    TextRequest,
)
from laas.daemon.registry import ModelState
from laas.router.policy import Policy, TargetKind
from laas.v1 import runtime_pb2 as pb
from laas.v1 import runtime_pb2_grpc as pb_grpc

_FINISH = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
           FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS}
_CONSTRAINT = {"json_schema": ConstraintKind.JSON_SCHEMA, "json_object": ConstraintKind.JSON_OBJECT,
               "regex": ConstraintKind.REGEX, "lark": ConstraintKind.LARK, "gbnf": ConstraintKind.GBNF}
_TOOL_CHOICE = {pb.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO, pb.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
                pb.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
                pb.TOOL_CHOICE_MODE_FUNCTION: ToolChoiceMode.FUNCTION}
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
_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty",
                      "presence_penalty", "frequency_penalty")


def _call() -> Call:
    """The call the interceptors opened (a bare one when the servicer runs without them)."""
    call = current_call.get()
    if call is None:
        call = Call()
        current_call.set(call)
    return call


# -- protobuf -> domain ---------------------------------------------------------------------------------

def _sampling(msg: pb.SamplingParams) -> SamplingFields:
    given = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING if msg.HasField(name)}  # type: ignore[arg-type]
    if msg.top_logprobs:
        given["top_logprobs"] = msg.top_logprobs
    return SamplingFields(**given, stop=tuple(msg.stop), ignore_eos=msg.ignore_eos, logprobs=msg.logprobs)


def _constraint(msg: pb.Constraint) -> Constraint | None:
    which = msg.WhichOneof("kind")
    if which is None:
        return None
    if which == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT) if msg.json_object else None
    return Constraint(_CONSTRAINT[which], getattr(msg, which))


def _message(m: pb.ChatMessage) -> ChatMessage:
    calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls)
    return ChatMessage(m.role, m.content, calls, m.tool_call_id, m.name)


def _tool_choice(msg: pb.ToolChoice) -> ToolChoice:
    mode = _TOOL_CHOICE.get(msg.mode)
    if mode is None:
        raise InvalidArgument(f"tool_choice.mode {msg.mode} is not a known mode", field="tool_choice.mode")
    return ToolChoice(mode, msg.function)


def _text(request: pb.GenerateRequest | pb.ChatRequest, context: grpc.aio.ServicerContext) -> TextRequest:
    policy = _POLICY.get(request.routing.policy)
    if policy is None:
        raise InvalidArgument(f"routing.policy {request.routing.policy} is not a known policy",
                              field="routing.policy")
    remaining = context.time_remaining()
    routing = Routing(
        policy=policy,
        latency_budget_ms=request.routing.latency_budget_ms if request.routing.HasField("latency_budget_ms") else None,
        deadline_ms=remaining * 1000 if remaining is not None else None,
    )
    keep_alive = request.keep_alive_s if request.HasField("keep_alive_s") else None
    constraint = _constraint(request.constraint)
    if isinstance(request, pb.ChatRequest):
        messages = tuple(_message(m) for m in request.messages)
        tools = tuple(Tool(t.name, t.description, t.parameters) for t in request.tools)
        return TextRequest(request.model, messages=messages, sampling=_sampling(request.sampling),
                           keep_alive_s=keep_alive, routing=routing, constraint=constraint, tools=tools,
                           tool_choice=_tool_choice(request.tool_choice))
    return TextRequest(request.model, prompt=request.prompt, sampling=_sampling(request.sampling),
                       keep_alive_s=keep_alive, routing=routing, constraint=constraint)


def _embed(request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> EmbedRequest:
    policy = _POLICY.get(request.routing.policy)
    if policy is None:
        raise InvalidArgument(f"routing.policy {request.routing.policy} is not a known policy",
                              field="routing.policy")
    inputs: list[str | tuple[int, ...]] = []
    for i, item in enumerate(request.inputs):
        which = item.WhichOneof("input")
        if which is None:
            raise InvalidArgument(f"inputs[{i}]: set text or tokens", field=f"inputs[{i}]")
        inputs.append(item.text if which == "text" else tuple(item.tokens.ids))
    return EmbedRequest(
        request.model, tuple(inputs),
        dimensions=request.dimensions if request.HasField("dimensions") else None,
        normalize=request.normalize if request.HasField("normalize") else None,
        truncate=request.truncate,
        keep_alive_s=request.keep_alive_s if request.HasField("keep_alive_s") else None,
        routing=Routing(policy=policy),
    )


# -- domain -> protobuf ---------------------------------------------------------------------------------

def model_to_pb(status: ModelStatus) -> pb.Model:
    out = pb.Model(
        name=status.name, loaded=status.state is ModelState.READY, state=_STATE[status.state],
        is_default=status.is_default, active_requests=status.active_requests,
        queued_requests=status.queued_requests, error=status.error, format=pb.MODEL_FORMAT_GGUF,
        memory_bytes=status.memory_bytes, keep_alive_s=status.keep_alive_s,
        last_used_unix_s=status.last_used_unix_s, parallel=status.parallel,
    )
    if status.unloads_in_s is not None:
        out.unloads_in_s = status.unloads_in_s
    info = status.info
    if info is not None:
        out.format = _FORMAT[info.format]
        out.quantization = info.quantization
        out.context_length = info.context_length
        out.trained_context_length = info.trained_context_length
        out.size_bytes = info.size_bytes
        out.architecture = info.architecture
        out.embedding_dimensions = info.embedding_dimensions
        out.matryoshka_dimensions.extend(info.matryoshka_dimensions)
    return out


def _embed_reply_pb(reply: EmbedReply) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        embeddings=[pb.Embedding(values=e.vector, tokens=e.tokens, truncated=e.truncated)
                    for e in reply.result.embeddings],
        model=reply.model, dimensions=reply.dimensions, prompt_tokens=reply.result.tokens,
        route=_route_pb(reply.route))


def _route_pb(route: RouteInfo) -> pb.RouteInfo:
    return pb.RouteInfo(target=route.target, kind=_KIND[route.kind], reason=route.reason,
                        predicted_ms=route.predicted_ms, failover=route.failover, local_only=route.local_only,
                        redacted=route.redacted)


def _final(chunk: Completion) -> pb.GenerateResponse:
    t, u = chunk.timings, chunk.usage
    return pb.GenerateResponse(
        finish_reason=_FINISH[chunk.finish_reason],
        usage=pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                       cached_prompt_tokens=u.cached_prompt_tokens),
        timings=pb.Timings(
            queue_ms=t.queue_ms, load_ms=t.load_ms, prompt_ms=t.prompt_ms, decode_ms=t.decode_ms,
            time_to_first_token_ms=t.time_to_first_token_ms,
            prompt_tokens_per_second=Timings.rate(u.prompt_tokens, t.prompt_ms),
            decode_tokens_per_second=Timings.rate(max(u.completion_tokens - 1, 0), t.decode_ms),
        ),
    )


def _logprob_pb(entry: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=entry.token_id, token=entry.text, logprob=entry.logprob,
                           top_logprobs=[_logprob_pb(t) for t in entry.top])


def _chunk_pb(item: StreamChunk) -> pb.GenerateResponse:
    chunk = item.chunk
    if isinstance(chunk, Completion):
        out = _final(chunk)
    elif isinstance(chunk, ToolCallDelta):
        out = pb.GenerateResponse(tool_calls=[pb.ToolCallDelta(index=chunk.index, id=chunk.id, name=chunk.name,
                                                               arguments=chunk.arguments)])
    else:
        out = pb.GenerateResponse(text=chunk.text, logprobs=[_logprob_pb(e) for e in chunk.logprobs])
    if item.model:
        out.model = item.model
    if item.route is not None:
        out.route.CopyFrom(_route_pb(item.route))
    return out


def _explanation_pb(e: Explanation) -> pb.RouteExplanation:
    return pb.RouteExplanation(
        chosen=_route_pb(e.chosen), order=list(e.order),
        candidates=[pb.RouteCandidate(route=_route_pb(c.route), eligible=c.eligible,
                                      meets_deadline=c.meets_deadline, note=c.note) for c in e.candidates],
        prompt_tokens=e.prompt_tokens, max_tokens=e.max_tokens, budget_ms=e.budget_ms,
    )


class RuntimeService(pb_grpc.RuntimeServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        async for out in self._stream(request, context):
            yield out

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[pb.GenerateResponse]:
        async for out in self._stream(request, context):
            yield out

    async def _stream(self, request: pb.GenerateRequest | pb.ChatRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[pb.GenerateResponse]:
        call = _call()
        # aclosing: a stream this edge stops reading ends the use case now, not when collected
        async with aclosing(self._runtime.generate(_text(request, context), call)) as chunks:
            async for chunk in chunks:
                yield _chunk_pb(chunk)

    async def ExplainRoute(self, request: pb.ExplainRouteRequest, context: grpc.aio.ServicerContext
                           ) -> pb.RouteExplanation:
        which = request.WhichOneof("request")
        if which is None:
            raise InvalidArgument("set generate, chat or embed", field="request")
        if which == "embed":
            return _explanation_pb(await self._runtime.explain_embed(_embed(request.embed, context), _call()))
        return _explanation_pb(await self._runtime.explain_route(_text(getattr(request, which), context), _call()))

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return _embed_reply_pb(await self._runtime.embed(_embed(request, context), _call()))

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
                       ) -> pb.TokenizeResponse:
        tokens = await self._runtime.tokenize(request.model, request.text, request.add_special, _call())
        return pb.TokenizeResponse(tokens=list(tokens), count=len(tokens))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_to_pb(m) for m in await self._runtime.list_models(_call())])

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        return pb.Stats(samples=[pb.Sample(name=s.name, labels=dict(s.labels), value=s.value)
                                 for s in await self._runtime.stats(_call())])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        return model_to_pb(await self._runtime.get_model(request.name, _call()))

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        keep_alive = request.keep_alive_s if request.HasField("keep_alive_s") else None
        return model_to_pb(await self._runtime.load_model(request.name, keep_alive, _call()))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext) -> pb.Model:
        return model_to_pb(await self._runtime.unload_model(request.name, _call()))
