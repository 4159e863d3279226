"""OpenAI JSON <-> the application layer's domain values: the only place the two meet.

Layer: edge (HTTP). Requests become :class:`~laas.daemon.app.values.TextRequest` with the fields as the
client set them (the use case validates them, as for gRPC); chunks of the use case's stream become
OpenAI's chat.completion(.chunk) and text_completion objects, with laas' extra field `laas` (the route
on the first chunk of every route taken; the timings on the last). What laas does not serve is refused
here with InvalidArgument naming the param (400), never ignored: `n` > 1, audio and other modalities,
logit_bias, functions, predicted outputs, web search, echo/best_of/suffix, token-id prompts, images.
The structured-output and tool fields (response_format, tools, tool_choice, logprobs, top_logprobs) are
refused the same way until the application layer serves them.
"""

from __future__ import annotations

import time
from typing import Any

from laas.core.errors import InvalidArgument
from laas.core.types import ChatMessage, Completion, Timings
from laas.daemon.app.values import ModelStatus, RouteInfo, Routing, SamplingFields, StreamChunk, TextRequest
from laas.daemon.http.schemas import ChatCompletionRequest, CompletionRequest, ContentPart, ModelOut, _Sampling
from laas.router.policy import Policy

Json = dict[str, Any]
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _refuse(param: str, what: str) -> InvalidArgument:
    return InvalidArgument(f"{param}: {what} is not supported by laas", field=param)


def _unsupported_common(body: _Sampling) -> None:
    if body.n is not None and body.n != 1:
        raise _refuse("n", f"n = {body.n} (more than one choice)")
    if body.logprobs not in (None, False, 0):
        raise _refuse("logprobs", "logprobs")
    if body.logit_bias:
        raise _refuse("logit_bias", "logit_bias")
    if body.service_tier not in (None, "auto", "default"):
        raise _refuse("service_tier", f"service_tier {body.service_tier!r}")


def _unsupported_chat(body: ChatCompletionRequest) -> None:
    _unsupported_common(body)
    for param in ("top_logprobs", "tools", "functions", "function_call", "audio", "prediction", "web_search_options"):
        if getattr(body, param) is not None:
            raise _refuse(param, param)
    if body.tool_choice not in (None, "none"):
        raise _refuse("tool_choice", "tool_choice")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise _refuse("response_format", f"response_format {body.response_format.get('type')!r}")
    if body.modalities is not None and body.modalities != ["text"]:
        raise _refuse("modalities", f"modalities {body.modalities}")


def _sampling(body: _Sampling, max_tokens: int | None) -> SamplingFields:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingFields(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          min_p=body.min_p, seed=body.seed, repeat_penalty=body.repeat_penalty,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          stop=stop, ignore_eos=body.ignore_eos)


def _routing(body: _Sampling) -> Routing:
    return Routing(policy=Policy(body.routing_policy), latency_budget_ms=body.latency_budget_ms)


def _text_of(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None:
        raise InvalidArgument(f"{where}.content is required", field=f"{where}.content")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _refuse(f"{where}.content[{j}].type", f"content of type {part.type!r}")
        texts.append(part.text)
    return "".join(texts)


def chat_request(body: ChatCompletionRequest) -> TextRequest:
    _unsupported_chat(body)
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise InvalidArgument("set max_tokens or max_completion_tokens, not both", field="max_completion_tokens")
    messages = []
    for i, m in enumerate(body.messages):
        role = _ROLES.get(m.role)
        if role is None:
            if m.role in ("tool", "function"):
                raise _refuse(f"messages[{i}].role", f"role {m.role!r} (tool calls)")
            raise InvalidArgument(f"messages[{i}].role must be one of system, developer, user, assistant; "
                                  f"got {m.role!r}", field=f"messages[{i}].role")
        if m.tool_calls:
            raise _refuse(f"messages[{i}].tool_calls", "tool_calls")
        messages.append(ChatMessage(role, _text_of(m.content, f"messages[{i}]")))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return TextRequest(body.model, messages=tuple(messages), sampling=_sampling(body, max_tokens),
                       keep_alive_s=body.keep_alive, routing=_routing(body))


def completion_request(body: CompletionRequest) -> TextRequest:
    _unsupported_common(body)
    for param in ("best_of", "suffix"):
        if getattr(body, param) is not None and not (param == "best_of" and body.best_of == 1):
            raise _refuse(param, param)
    if body.echo:
        raise _refuse("echo", "echo")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise _refuse("prompt", "a prompt of token ids or several prompts")
        prompt = prompt[0]
    assert isinstance(prompt, str)  # narrowed above: the schema allows str or lists only
    return TextRequest(body.model, prompt=prompt, sampling=_sampling(body, body.max_tokens),
                       keep_alive_s=body.keep_alive, routing=_routing(body))


# -- domain -> OpenAI JSON ----------------------------------------------------------------------------


def route_json(route: RouteInfo) -> Json:
    return {"target": route.target, "kind": route.kind.value, "reason": route.reason,
            "predicted_ms": round(route.predicted_ms, 1), "failover": route.failover, "local_only": route.local_only,
            "redacted": route.redacted}


def route_header(route: RouteInfo) -> str:
    """The x-laas-route header: the target, its kind and the reason, as ASCII."""
    reason = route.reason.replace('"', "'").encode("ascii", "replace").decode()
    value = f'{route.target}; kind={route.kind.value}; reason="{reason}"'
    if route.local_only:
        value += "; local_only"
    return value.encode("ascii", "replace").decode()


def usage_json(chunk: Completion) -> Json:
    u = chunk.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


def timings_json(chunk: Completion) -> Json:
    t, u = chunk.timings, chunk.usage
    return {"queue_ms": t.queue_ms, "load_ms": t.load_ms, "prompt_ms": t.prompt_ms, "decode_ms": t.decode_ms,
            "time_to_first_token_ms": t.time_to_first_token_ms,
            "prompt_tokens_per_second": Timings.rate(u.prompt_tokens, t.prompt_ms),
            "decode_tokens_per_second": Timings.rate(max(u.completion_tokens - 1, 0), t.decode_ms)}


def model_json(status: ModelStatus, created: int) -> Json:
    return ModelOut(id=status.name, created=created).model_dump()


class Reply:
    """The OpenAI objects of one answer, chat or text: chunks while streaming, or the whole at the end."""

    def __init__(self, chat: bool, rid: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid
        self.created = int(time.time())
        self.model = ""
        self.routes: list[Json] = []
        self.route: RouteInfo | None = None  # the last route taken
        self.text: list[str] = []
        self.final: Completion | None = None
        self._role_sent = False

    def _envelope(self, choices: list[Json]) -> Json:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, item: StreamChunk, include_usage: bool) -> Json:
        """The event of one chunk of the use case's stream."""
        if item.model:
            self.model = item.model
        chunk = item.chunk
        finish = chunk.finish_reason.value if isinstance(chunk, Completion) else None
        text = "" if isinstance(chunk, Completion) else chunk.text
        if self.chat:
            delta: Json = {"content": text} if text or not self._role_sent else {}
            if not self._role_sent:
                delta["role"] = "assistant"
                self._role_sent = True
            choice: Json = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        out = self._envelope([choice])
        if include_usage:
            out["usage"] = None
        if item.route is not None or isinstance(chunk, Completion):
            extra: Json = {}
            if item.route is not None:
                extra["route"] = route_json(item.route)
            if isinstance(chunk, Completion):
                extra["timings"] = timings_json(chunk)
            out["laas"] = extra
        return out

    def usage_chunk(self) -> Json:
        """stream_options.include_usage: the last event, with the usage and no choices."""
        assert self.final is not None
        return self._envelope([]) | {"usage": usage_json(self.final)}

    def add(self, item: StreamChunk) -> None:
        """Collects a chunk for the whole answer (no streaming)."""
        if item.model:
            self.model = item.model
        if item.route is not None:
            self.routes.append(route_json(item.route))
            self.route = item.route
        if isinstance(item.chunk, Completion):
            self.final = item.chunk
        else:
            self.text.append(item.chunk.text)

    def whole(self) -> Json:
        assert self.final is not None
        text = "".join(self.text)
        finish = self.final.finish_reason.value
        if self.chat:
            choice: Json = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage_json(self.final),
                "laas": {"routes": self.routes, "timings": timings_json(self.final)}}
