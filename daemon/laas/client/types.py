"""The client's own types, and their conversion from the wire (the client side of the protobuf edge)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from laas.core.errors import FIELD_METADATA_KEY, LaasError, error_for_status
from laas.core.types import ChatMessage, Constraint, TokenLogprob, Tool, ToolCallDelta, ToolChoice, ToolChoiceMode
from laas.v1 import runtime_pb2 as pb

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
           pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}
_TOOL_CHOICE = {ToolChoiceMode.AUTO: pb.TOOL_CHOICE_MODE_AUTO, ToolChoiceMode.NONE: pb.TOOL_CHOICE_MODE_NONE,
                ToolChoiceMode.REQUIRED: pb.TOOL_CHOICE_MODE_REQUIRED,
                ToolChoiceMode.FUNCTION: pb.TOOL_CHOICE_MODE_FUNCTION}


@dataclass(frozen=True, slots=True)
class Route:
    """Where (part of) an answer came from: a local model, a LAN peer or a cloud endpoint, and why."""

    target: str
    kind: str  # "local", "peer" or "cloud"
    reason: str
    predicted_ms: float
    failover: bool
    local_only: bool = False  # the request may not leave the device (client, token, model or daemon rule)
    redacted: int = 0  # personal data items replaced by placeholders before it left the device


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed message: a text delta; the last one also has finish_reason, usage and timings.
    `route` is set on the first message and again after a failover."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Mapping[str, float] = field(default_factory=dict)
    model: str = ""
    route: Route | None = None
    cached_prompt_tokens: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()  # pieces of tool calls (Chat with tools)
    logprobs: tuple[TokenLogprob, ...] = ()  # with logprobs=True: the tokens of `text`


@dataclass(frozen=True, slots=True)
class Result:
    """A whole generation: the joined text, the last chunk's figures and every route taken."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: Mapping[str, float]
    model: str
    routes: tuple[Route, ...] = ()

    @classmethod
    def join(cls, chunks: Iterable[Chunk]) -> Result:
        parts, last, model, routes = [], Chunk(""), "", []
        for c in chunks:
            parts.append(c.text)
            model = model or c.model
            if c.route is not None:
                routes.append(c.route)
            last = c
        return cls("".join(parts), last.finish_reason or "", last.prompt_tokens, last.completion_tokens,
                   last.timings, model, tuple(routes))


@dataclass(frozen=True, slots=True)
class Candidate:
    target: str
    kind: str
    predicted_ms: float
    eligible: bool
    meets_deadline: bool
    note: str


@dataclass(frozen=True, slots=True)
class Explanation:
    """ExplainRoute's answer: the route, its failovers in order, and every candidate's verdict."""

    chosen: Route
    order: tuple[str, ...]
    candidates: tuple[Candidate, ...]
    prompt_tokens: int
    max_tokens: int
    budget_ms: float


def explanation_from_pb(e: pb.RouteExplanation) -> Explanation:
    return Explanation(
        chosen=route_from_pb(e.chosen), order=tuple(e.order),
        candidates=tuple(Candidate(c.route.target, route_from_pb(c.route).kind, c.route.predicted_ms, c.eligible,
                                   c.meets_deadline, c.note) for c in e.candidates),
        prompt_tokens=e.prompt_tokens, max_tokens=e.max_tokens, budget_ms=e.budget_ms)


@dataclass(frozen=True, slots=True)
class ModelDescription:
    name: str
    format: str
    quantization: str
    context_length: int
    trained_context_length: int
    size_bytes: int
    architecture: str
    loaded: bool
    state: str
    is_default: bool
    active_requests: int
    queued_requests: int
    error: str
    memory_bytes: int = 0  # estimated, while loaded
    keep_alive_s: float = 0.0  # idle seconds before it unloads (< 0: never)
    unloads_in_s: float = 0.0  # when loaded, idle and due to unload
    last_used_unix_s: float = 0.0
    embedding_dimensions: int = 0  # an embedding model's vector size (0: a generative model)
    matryoshka_dimensions: tuple[int, ...] = ()
    parallel: int = 1  # requests it decodes at once (continuous batching), the value in force


@dataclass(frozen=True, slots=True)
class Embeddings:
    """An Embed call's answer: one vector per input, in order."""

    vectors: list[list[float]]
    tokens: list[int]  # per input, after truncation
    truncated: list[bool]
    model: str
    route: Route | None

    @property
    def dimensions(self) -> int:
        return len(self.vectors[0]) if self.vectors else 0


def embed_request_pb(inputs: Sequence[str | Sequence[int]], model: str = "", dimensions: int | None = None,
                     normalize: bool | None = None, truncate: bool = False, policy: str | None = None,
                     keep_alive_s: float | None = None) -> pb.EmbedRequest:
    wire = [pb.EmbedInput(text=i) if isinstance(i, str) else pb.EmbedInput(tokens=pb.TokenIds(ids=list(i)))
            for i in inputs]
    return pb.EmbedRequest(model=model, inputs=wire, dimensions=dimensions, normalize=normalize, truncate=truncate,
                           routing=routing_pb(policy), keep_alive_s=keep_alive_s)


def embeddings_from_pb(r: pb.EmbedResponse) -> Embeddings:
    return Embeddings(vectors=[list(e.values) for e in r.embeddings], tokens=[e.tokens for e in r.embeddings],
                      truncated=[e.truncated for e in r.embeddings], model=r.model,
                      route=route_from_pb(r.route) if r.HasField("route") else None)


def route_from_pb(r: pb.RouteInfo) -> Route:
    return Route(target=r.target, kind=pb.TargetKind.Name(r.kind).removeprefix("TARGET_KIND_").lower(),
                 reason=r.reason, predicted_ms=r.predicted_ms, failover=r.failover,
                 local_only=r.local_only, redacted=r.redacted)


def _logprob_from_pb(e: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(e.token_id, e.token, e.logprob, tuple(_logprob_from_pb(t) for t in e.top_logprobs))


def chunk_from_pb(msg: pb.GenerateResponse) -> Chunk:
    route = route_from_pb(msg.route) if msg.HasField("route") else None
    calls = tuple(ToolCallDelta(d.index, d.id, d.name, d.arguments) for d in msg.tool_calls)
    logprobs = tuple(_logprob_from_pb(e) for e in msg.logprobs)
    if msg.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
        return Chunk(text=msg.text, model=msg.model, route=route, tool_calls=calls, logprobs=logprobs)
    t = msg.timings
    timings = {f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields}
    return Chunk(text=msg.text, finish_reason=_FINISH.get(msg.finish_reason, "unknown"),
                 prompt_tokens=msg.usage.prompt_tokens, completion_tokens=msg.usage.completion_tokens,
                 timings=timings, model=msg.model, route=route, cached_prompt_tokens=msg.usage.cached_prompt_tokens,
                 tool_calls=calls, logprobs=logprobs)


def constraint_pb(c: Constraint | None) -> pb.Constraint:
    """A constraint for a request (None: none)."""
    if c is None:
        return pb.Constraint()
    if c.kind.value == "json_object":
        return pb.Constraint(json_object=True)
    out = pb.Constraint()
    setattr(out, c.kind.value, c.text)
    return out


def message_pb(m: Mapping[str, str] | tuple[str, str] | ChatMessage) -> pb.ChatMessage:
    """A chat message: {"role", "content"}, (role, content) or a ChatMessage (with tool calls or results)."""
    if isinstance(m, tuple):
        return pb.ChatMessage(role=m[0], content=m[1])
    if isinstance(m, ChatMessage):
        return pb.ChatMessage(role=m.role, content=m.content, tool_call_id=m.tool_call_id, name=m.name,
                              tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                                          for c in m.tool_calls])
    return pb.ChatMessage(role=m["role"], content=m["content"])


def tools_pb(tools: Sequence[Tool], choice: ToolChoice | None) -> tuple[list[pb.Tool], pb.ToolChoice]:
    choice = choice or ToolChoice()
    return ([pb.Tool(name=t.name, description=t.description, parameters=t.parameters) for t in tools],
            pb.ToolChoice(mode=_TOOL_CHOICE[choice.mode], function=choice.name))


_POLICIES = {"auto": pb.ROUTING_POLICY_AUTO, "local_only": pb.ROUTING_POLICY_LOCAL_ONLY,
             "cloud_only": pb.ROUTING_POLICY_CLOUD_ONLY, "prefer_local": pb.ROUTING_POLICY_PREFER_LOCAL}


def routing_pb(policy: str | None = None, latency_budget_ms: float | None = None) -> pb.Routing:
    """Routing for a request: policy "auto" (default), "local_only", "cloud_only" or "prefer_local"."""
    routing = pb.Routing(policy=_POLICIES[(policy or "auto").lower()])
    if latency_budget_ms is not None:
        routing.latency_budget_ms = latency_budget_ms
    return routing


def model_from_pb(m: pb.Model) -> ModelDescription:
    return ModelDescription(
        name=m.name, format=pb.ModelFormat.Name(m.format).removeprefix("MODEL_FORMAT_").lower(),
        quantization=m.quantization, context_length=m.context_length,
        trained_context_length=m.trained_context_length, size_bytes=m.size_bytes, architecture=m.architecture,
        loaded=m.loaded, state=pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower(),
        is_default=m.is_default, active_requests=m.active_requests, queued_requests=m.queued_requests,
        error=m.error, memory_bytes=m.memory_bytes, keep_alive_s=m.keep_alive_s, unloads_in_s=m.unloads_in_s,
        last_used_unix_s=m.last_used_unix_s, embedding_dimensions=m.embedding_dimensions,
        matryoshka_dimensions=tuple(m.matryoshka_dimensions), parallel=m.parallel or 1,
    )


def sampling_pb(max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                top_k: int | None = None, min_p: float | None = None, seed: int | None = None,
                stop: Sequence[str] = (), repeat_penalty: float | None = None,
                presence_penalty: float | None = None, frequency_penalty: float | None = None,
                ignore_eos: bool = False, logprobs: bool = False, top_logprobs: int = 0) -> pb.SamplingParams:
    values: dict[str, Any] = {k: v for k, v in locals().items() if v is not None and k not in ("stop", "ignore_eos")}
    return pb.SamplingParams(stop=list(stop), ignore_eos=ignore_eos, **values)


def error_from_rpc(e: grpc.RpcError) -> LaasError:
    """The laas error for a failed call, with the field the daemon named in its trailing metadata."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    error = error_for_status(code, details or "")
    trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == FIELD_METADATA_KEY:
            error.field = value if isinstance(value, str) else value.decode()
    return error
