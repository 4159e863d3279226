"""Domain values -> OpenAI JSON: the chat.completion(.chunk), text_completion, embedding and model objects.

Layer: edge (HTTP). Each object gets laas' extra field `laas`: the route on the first chunk of every
route taken (`laas.route`), the routes and timings of a whole answer, the timings on the last chunk.
Tool calls stream as OpenAI's `tool_calls` deltas (id and name first, then the arguments' pieces),
log-probabilities as `logprobs.content` (chat) or the legacy lists (completions).
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

from laas.core.types import Completion, TextDelta, Timings, TokenLogprob, ToolCallDelta
from laas.daemon.app.values import EmbedReply, ModelStatus, RouteInfo, StreamChunk
from laas.daemon.http.schemas import ModelOut

Json = dict[str, Any]


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


def _logprob(t: TokenLogprob) -> Json:
    return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}


def chat_logprobs(tokens: tuple[TokenLogprob, ...]) -> Json:
    return {"content": [_logprob(t) | {"top_logprobs": [_logprob(a) for a in t.top]} for t in tokens],
            "refusal": None}


def text_logprobs(tokens: tuple[TokenLogprob, ...], offset: int) -> Json:
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{a.text: a.logprob for a in t.top} for t in tokens], "text_offset": offsets}


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
        self.logprobs: list[TokenLogprob] = []
        self.calls: list[Json] = []  # whole answer: the tool calls, their arguments joined
        self._role_sent = False
        self._offset = 0  # characters of text sent so far (legacy logprobs' text_offset)

    def _envelope(self, choices: list[Json]) -> Json:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, item: StreamChunk, include_usage: bool) -> Json:
        """The event of one chunk of the use case's stream."""
        if item.model:
            self.model = item.model
        chunk = item.chunk
        finish = chunk.finish_reason.value if isinstance(chunk, Completion) else None
        text = chunk.text if isinstance(chunk, TextDelta) else ""
        tokens = chunk.logprobs if isinstance(chunk, TextDelta) else ()
        if self.chat:
            delta: Json = {"content": text} if text or not self._role_sent else {}
            if isinstance(chunk, ToolCallDelta):
                delta["tool_calls"] = [_call_delta(chunk)]
            if not self._role_sent:
                delta["role"] = "assistant"
                self._role_sent = True
            choice: Json = {"index": 0, "delta": delta, "logprobs": chat_logprobs(tokens) if tokens else None,
                            "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": text_logprobs(tokens, self._offset) if tokens else None,
                      "finish_reason": finish}
            self._offset += len(text)
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
        chunk = item.chunk
        if isinstance(chunk, Completion):
            self.final = chunk
        elif isinstance(chunk, ToolCallDelta):
            while len(self.calls) <= chunk.index:
                self.calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            call = self.calls[chunk.index]
            call["id"] = chunk.id or call["id"]
            call["function"]["name"] = chunk.name or call["function"]["name"]
            call["function"]["arguments"] += chunk.arguments
        else:
            self.text.append(chunk.text)
            self.logprobs.extend(chunk.logprobs)

    def whole(self) -> Json:
        assert self.final is not None
        text = "".join(self.text)
        finish = self.final.finish_reason.value
        tokens = tuple(self.logprobs)
        if self.chat:
            message: Json = {"role": "assistant", "content": text if text or not self.calls else None,
                             "refusal": None}
            if self.calls:
                message["tool_calls"] = self.calls
            choice: Json = {"index": 0, "message": message, "logprobs": chat_logprobs(tokens) if tokens else None,
                            "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": text_logprobs(tokens, 0) if tokens else None,
                      "finish_reason": finish}
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage_json(self.final),
                "laas": {"routes": self.routes, "timings": timings_json(self.final)}}


def _call_delta(chunk: ToolCallDelta) -> Json:
    """A tool call's piece as OpenAI streams it: the first with id, type and name, then argument fragments."""
    out: Json = {"index": chunk.index, "function": {"arguments": chunk.arguments}}
    if chunk.id:
        out["id"] = chunk.id
        out["type"] = "function"
    if chunk.name:
        out["function"]["name"] = chunk.name
    return out


def embeddings_json(reply: EmbedReply, encoding: str) -> Json:
    def encoded(vector: tuple[float, ...]) -> list[float] | str:
        if encoding == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return list(vector)

    tokens = reply.result.tokens
    return {"object": "list", "model": reply.model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(e.vector)}
                     for i, e in enumerate(reply.result.embeddings)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "laas": {"route": route_json(reply.route)}}
