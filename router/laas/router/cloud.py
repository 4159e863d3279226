"""A cloud endpoint as a remote Endpoint (remote.py): any OpenAI-compatible API with streaming (OpenAI,
Azure OpenAI, vLLM, TGI, llama.cpp's server, Ollama's /v1, another laasd's HTTP front...).

Layer: infrastructure. httpx streams the response; sse.SseDecoder parses the server-sent events with
a bound on each line and event. Every failure (refused connection, HTTP error status, a stream cut
mid-way, an event that is not the expected JSON or is too large, no token within `read_timeout_s`,
the call past `call_timeout_s`) becomes TargetFailed, which the router answers by failing over (before
the first token: the next target; mid-stream: the next one continues). Pings and empty deltas do not
count as tokens. Closing the generator closes the HTTP stream, so a cancelled client request cancels
the cloud call too. Constraints, tools and logprobs go in OpenAI's form (`response_format` json_schema or
json_object, a GBNF grammar as llama.cpp's `grammar` extension; `tools`, `tool_choice`, the history's
`tool_calls` and `tool` messages; `logprobs`, `top_logprobs`) and come back as domain chunks: streamed
`tool_calls` deltas as ToolCallDelta, `logprobs.content` as TextDelta.logprobs, finish_reason
"tool_calls" as TOOL_CALLS. The API key is read once from an environment variable or a file and is never
logged or repr'd; what the endpoint says about a failure goes to the log (secrets masked), not to
clients, since an error page may echo the request's Authorization header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx

from laas.core.errors import InvalidArgument, TargetFailed
from laas.core.types import (
    ChatMessage,
    Completion,
    ConstraintKind,
    Embedding,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    TextDelta,
    Timings,
    TokenLogprob,
    ToolCallDelta,
    ToolChoiceMode,
    Usage,
)
from laas.router.sse import EventTooLarge, SseDecoder

log = logging.getLogger(__name__)

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "eos": FinishReason.STOP,
           "tool_calls": FinishReason.TOOL_CALLS, "function_call": FinishReason.TOOL_CALLS}


@dataclass(frozen=True, slots=True)
class CloudConfig:
    name: str
    base_url: str
    model: str
    context_length: int
    api_key: str | None = None
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 30.0  # the longest wait for the next token (pings and empty deltas do not count)
    call_timeout_s: float = 600.0  # the longest a whole call may take
    chat_only: bool = False

    def __repr__(self) -> str:  # never print the key
        return f"CloudConfig(name={self.name!r}, base_url={self.base_url!r}, model={self.model!r})"


def read_api_key(env: str | None, file: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The key from a variable or a file (e.g. a systemd credential); raises if configured but missing."""
    environ = dict(os.environ) if environ is None else environ
    if env:
        if not environ.get(env):
            raise InvalidArgument(f"the API key variable {env} is not set", field="api_key_env")
        return environ[env].strip()
    if file:
        try:
            return Path(file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise InvalidArgument(f"cannot read the API key file {file}: {e.strerror}", field="api_key_file") from e
    return None


class CloudEngine:
    """An OpenAI-compatible endpoint: chat messages go to /chat/completions, raw prompts to /completions."""

    def __init__(self, config: CloudConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
        self._client = client or httpx.AsyncClient(timeout=timeout, trust_env=False)

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        s = request.sampling
        body: dict[str, Any] = {"model": self.config.model, "stream": True, "temperature": s.temperature,
                                "top_p": s.top_p, "presence_penalty": s.presence_penalty,
                                "frequency_penalty": s.frequency_penalty}
        if s.max_tokens is not None:
            body["max_tokens"] = s.max_tokens
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if s.ignore_eos:  # an extension (llama.cpp's server, vLLM); sent only when asked for
            body["ignore_eos"] = True
        _constraint(body, request)
        chat = bool(request.messages) or self.config.chat_only
        if s.logprobs:
            if chat:
                body["logprobs"], body["top_logprobs"] = True, s.top_logprobs
            else:
                body["logprobs"] = s.top_logprobs or 1  # /completions: the number of alternatives
        if request.tools:
            body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                               "parameters": json.loads(t.parameters)}}
                             for t in request.tools]
            choice = request.tool_choice
            body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}}
                                   if choice.mode is ToolChoiceMode.FUNCTION else choice.mode.value)
        if request.messages:
            body["messages"] = [_message(m) for m in request.messages]
            return "/chat/completions", body
        if self.config.chat_only:
            body["messages"] = [{"role": "user", "content": request.prompt}]
            return "/chat/completions", body
        body["prompt"] = request.prompt
        return "/completions", body

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        path, body = self._body(request)
        # identity: a compressed body could expand past the event bound inside one decoded chunk
        headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        name, cfg = self.config.name, self.config
        clock = asyncio.get_running_loop().time
        begun = clock()
        whole = begun + cfg.call_timeout_s  # the whole call, however the endpoint trickles
        next_token = begun + cfg.connect_timeout_s + cfg.read_timeout_s  # until the answer's headers, then per text
        start = time.perf_counter()
        first = last = 0.0
        tokens = 0
        finish: FinishReason | None = None
        usage: dict[str, Any] = {}
        named: set[int] = set()  # tool calls whose id and name were sent (some servers repeat them)
        decoder = SseDecoder()
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout_at(min(next_token, whole)):
                    response = await stack.enter_async_context(self._client.stream(
                        "POST", cfg.base_url.rstrip("/") + path, json=body, headers=headers))
                    if response.status_code != 200:
                        raise self._http_failure(response.status_code, await _read_some(response, _ERROR_BODY_BYTES))
                next_token = clock() + cfg.read_timeout_s
                chunks = response.aiter_bytes()
                done = False
                while not done:
                    # Pings (`: ping`), empty deltas and role-only events do not count: only text moves it.
                    async with asyncio.timeout_at(min(next_token, whole)):
                        chunk = await anext(chunks, None)
                    for data in decoder.feed(chunk) if chunk is not None else decoder.close():
                        if data.strip() == "[DONE]":
                            done = True
                            break
                        if not data.strip():
                            continue
                        items, reason, event_usage = self._parse_event(data)
                        usage.update(event_usage)
                        for item in _tool_deltas(items, named):
                            last = time.perf_counter()
                            first = first or last
                            tokens += 1
                            yield item
                            next_token = clock() + cfg.read_timeout_s  # from when the consumer asks again
                        if reason is not None:
                            finish = _FINISH.get(reason, FinishReason.STOP)
                    done = done or chunk is None
        except TimeoutError as e:
            waited = f"the call took longer than {cfg.call_timeout_s:g}s" if clock() >= whole else (
                f"no token within {cfg.read_timeout_s:g}s")
            raise TargetFailed(f"{name}: {waited}") from e
        except EventTooLarge as e:
            raise TargetFailed(f"{name}: the event stream sent {e}") from e
        except httpx.HTTPError as e:
            log.warning("%s: %s: %s", name, type(e).__name__, self._masked(str(e) or "connection failed"))
            raise TargetFailed(f"{name}: {type(e).__name__} (the daemon's log has the details)") from e
        if finish is None:
            raise TargetFailed(f"{name}: the stream ended before a finish reason")
        end = time.perf_counter()
        first = first or end
        yield Completion(
            finish_reason=finish,
            usage=Usage(prompt_tokens=_count(usage.get("prompt_tokens"), 0),
                        completion_tokens=_count(usage.get("completion_tokens"), tokens)),
            timings=Timings(prompt_ms=(first - start) * 1000, decode_ms=(last - first) * 1000 if last else 0.0),
        )

    async def embed(self, model: str, request: EmbeddingRequest) -> EmbeddingResult:
        """POST /embeddings (OpenAI's API) for the endpoint's model `model`. OpenAI's vectors are unit length;
        with normalize off they are returned as the endpoint sends them, and with `dimensions` it cuts them."""
        body: dict[str, Any] = {"model": model, "input": [i if isinstance(i, str) else list(i) for i in request.inputs],
                                "encoding_format": "float"}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        headers = {"Accept-Encoding": "identity"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        name = self.config.name
        try:
            async with asyncio.timeout(self.config.call_timeout_s):
                response = await self._client.post(self.config.base_url.rstrip("/") + "/embeddings", json=body,
                                                   headers=headers)
        except TimeoutError as e:
            raise TargetFailed(f"{name}: the call took longer than {self.config.call_timeout_s:g}s") from e
        except httpx.HTTPError as e:
            log.warning("%s: %s: %s", name, type(e).__name__, self._masked(str(e) or "connection failed"))
            raise TargetFailed(f"{name}: {type(e).__name__} (the daemon's log has the details)") from e
        if response.status_code != 200:
            raise self._http_failure(response.status_code, response.content[:_ERROR_BODY_BYTES])
        try:
            payload = response.json()
            rows = sorted(payload["data"], key=lambda d: int(d["index"]))
            vectors = [tuple(float(x) for x in row["embedding"]) for row in rows]
            if len(vectors) != len(request.inputs) or len({len(v) for v in vectors}) > 1:
                raise ValueError("one vector per input, all of one size, expected")
            tokens = _count((payload.get("usage") or {}).get("prompt_tokens"), 0)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("%s sent an unexpected embeddings answer: %s", name, self._masked(response.text[:200]))
            raise TargetFailed(f"{name}: unexpected embeddings answer (not the expected JSON)") from e
        per_input = tokens // len(vectors) if vectors else 0  # OpenAI counts only the total
        return EmbeddingResult(tuple(Embedding(v, per_input) for v in vectors))

    def _masked(self, text: str) -> str:
        return mask_secrets(text, self.config.api_key)

    def _http_failure(self, status: int, body: bytes) -> TargetFailed:
        """Clients get the status and its standard phrase; the body (which may echo our headers) goes to
        the log, secrets masked. The upstream's own reason phrase is not trusted either."""
        log.warning("%s answered HTTP %d: %s", self.config.name, status,
                    self._masked(body.decode("utf-8", "replace")))
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        return TargetFailed(f"{self.config.name}: HTTP {status} {phrase}")

    def _parse_event(self, data: str) -> tuple[list[GenerationChunk], str | None, dict[str, Any]]:
        name = self.config.name
        try:
            payload = json.loads(data)
            if "error" in payload:
                log.warning("%s reported an error in its stream: %s", name, self._masked(str(payload["error"])[:2000]))
                raise TargetFailed(f"{name}: the endpoint reported an error (the daemon's log has it)")
            usage = payload.get("usage") or {}
            if not isinstance(usage, dict):
                raise TypeError("usage is not an object")
            choices = payload.get("choices") or []
            if not choices:
                return [], None, usage
            choice = choices[0]
            delta = choice.get("delta") or {}
            text = choice.get("text")
            if text is None:
                text = delta.get("content") or ""
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            items: list[GenerationChunk] = []
            logprobs = _logprobs(choice.get("logprobs"))
            if text or logprobs:
                items.append(TextDelta(text, logprobs))
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                name, arguments = function.get("name") or "", function.get("arguments") or ""
                if not isinstance(name, str) or not isinstance(arguments, str):
                    raise TypeError("a tool call's name or arguments are not strings")
                if name or arguments:
                    items.append(ToolCallDelta(int(call.get("index", 0)), str(call.get("id") or ""), name, arguments))
            return items, choice.get("finish_reason"), usage
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
            log.warning("%s sent an unexpected event: %s", name, self._masked(data[:200]))
            raise TargetFailed(f"{name}: unexpected event (not the expected JSON)") from e

    async def check_health(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


def _constraint(body: dict[str, Any], request: GenerationRequest) -> None:
    """A constraint in OpenAI's form (a GBNF grammar as llama.cpp's server takes it). Regex and Lark have no
    OpenAI form: the router sends them only to an endpoint declared capable, as llama.cpp-style `grammar`."""
    c = request.sampling.constraint
    if c is None:
        return
    if c.kind is ConstraintKind.JSON_SCHEMA:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": json.loads(c.text), "strict": True}}
    elif c.kind is ConstraintKind.JSON_OBJECT:
        body["response_format"] = {"type": "json_object"}
    elif c.kind is ConstraintKind.GBNF:
        body["grammar"] = c.text
    elif c.kind is ConstraintKind.REGEX:
        body["regex"] = c.text  # vLLM's extension (guided decoding)
    else:
        body["grammar"] = c.text


def _tool_deltas(items: list[GenerationChunk], named: set[int]) -> list[GenerationChunk]:
    """Tool-call deltas as laas streams them: a call's id and name once, in a delta of their own, then only
    argument fragments (servers differ: some repeat the name in every delta, some send it with arguments)."""
    out: list[GenerationChunk] = []
    for item in items:
        if not isinstance(item, ToolCallDelta):
            out.append(item)
            continue
        if item.index not in named and (item.name or item.id):
            named.add(item.index)
            out.append(ToolCallDelta(item.index, item.id, item.name))
        if item.arguments:
            out.append(ToolCallDelta(item.index, arguments=item.arguments))
    return out


def _message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.name and m.role == "tool":
        out["name"] = m.name
    return out


def _logprobs(value: Any) -> tuple[TokenLogprob, ...]:
    """OpenAI's chat `logprobs.content[]` ({token, logprob, top_logprobs[]}); token ids are not sent (-1)."""
    if not isinstance(value, dict) or not isinstance(value.get("content"), list):
        return ()

    def entry(item: dict[str, Any], top: bool) -> TokenLogprob:
        alternatives = () if not top else tuple(entry(t, False) for t in item.get("top_logprobs") or ())
        return TokenLogprob(-1, str(item["token"]), float(item["logprob"]), alternatives)

    return tuple(entry(item, True) for item in value["content"])


_ERROR_BODY_BYTES = 4096  # of an error answer, kept for the log
# Secrets an endpoint may echo (its own error pages often quote the request): the key itself, bearer
# tokens, OpenAI-style keys and `api-key: ...` / `Authorization: ...` headers.
_SECRET = re.compile(r"(?i)(\b(?:authorization|x-api-key|api[-_]?key)[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic)\s+)?"
                     r"|\bbearer\s+)[^\s\"',;}]+|\bsk-[A-Za-z0-9_-]{6,}")


def mask_secrets(text: str, key: str | None = None) -> str:
    """`text` with the API key and anything that looks like a credential replaced by `***`."""
    if key:
        text = text.replace(key, "***")
    return _SECRET.sub(lambda m: (m.group(1) or "sk-") + "***", text)


async def _read_some(response: httpx.Response, limit: int) -> bytes:
    """At most `limit` bytes of the body (an error page may be endless)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def _count(value: Any, default: int) -> int:
    """A token count from the endpoint's usage, or the default when it is missing or not a count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
