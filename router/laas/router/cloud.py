"""A cloud endpoint as an Engine: any OpenAI-compatible API with streaming (OpenAI, Azure OpenAI, vLLM,
TGI, llama.cpp's server, Ollama's /v1, another laasd's HTTP front...).

Layer: infrastructure. httpx streams the response; httpx-sse parses the server-sent events. Every
failure (refused connection, timeout, HTTP error status, a stream cut mid-way, an event that is not
the expected JSON) becomes TargetFailed, which the router answers by failing over. Closing the
generator closes the HTTP stream, so a cancelled client request cancels the cloud call too.
The API key is read once from an environment variable or a file and is never logged or repr'd.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import EventSource

from laas.daemon.engine import (
    ChatMessage,
    Completion,
    Engine,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelFormat,
    ModelInfo,
    TextDelta,
    Timings,
    Usage,
)
from laas.daemon.errors import InvalidArgument, TargetFailed

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "eos": FinishReason.STOP}


@dataclass(frozen=True, slots=True)
class CloudConfig:
    name: str
    base_url: str
    model: str
    context_length: int
    api_key: str | None = None
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 30.0
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


class CloudEngine(Engine):
    def __init__(self, config: CloudConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
        self._client = client or httpx.AsyncClient(timeout=timeout, trust_env=False)
        self._info = ModelInfo(ModelFormat.REMOTE, "", config.context_length, config.context_length, 0, "remote")

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        raise InvalidArgument(f"{self.config.name} is a remote endpoint; it does not tokenize here")

    async def render_chat(self, messages: Sequence[ChatMessage]) -> GenerationRequest:
        return GenerationRequest(prompt="", messages=tuple(messages))

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
        if request.messages:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            return "/chat/completions", body
        if self.config.chat_only:
            body["messages"] = [{"role": "user", "content": request.prompt}]
            return "/chat/completions", body
        body["prompt"] = request.prompt
        return "/completions", body

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        path, body = self._body(request)
        headers = {"Accept": "text/event-stream"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        name = self.config.name
        start = time.perf_counter()
        first = last = 0.0
        tokens = 0
        finish: FinishReason | None = None
        usage: dict[str, Any] = {}
        try:
            async with self._client.stream("POST", self.config.base_url.rstrip("/") + path, json=body,
                                           headers=headers) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:200].decode("utf-8", "replace")
                    raise TargetFailed(f"{name}: HTTP {response.status_code}: {detail}")
                async for event in EventSource(response).aiter_sse():
                    if event.data.strip() == "[DONE]":
                        break
                    text, reason, event_usage = _parse_event(name, event.data)
                    usage.update(event_usage)
                    if text:
                        last = time.perf_counter()
                        first = first or last
                        tokens += 1
                        self.decoded_tokens += 1
                        yield TextDelta(text)
                    if reason is not None:
                        finish = _FINISH.get(reason, FinishReason.STOP)
        except httpx.HTTPError as e:
            raise TargetFailed(f"{name}: {type(e).__name__}: {e or 'connection failed'}") from e
        if finish is None:
            raise TargetFailed(f"{name}: the stream ended before a finish reason")
        end = time.perf_counter()
        first = first or end
        yield Completion(
            finish_reason=finish,
            usage=Usage(prompt_tokens=int(usage.get("prompt_tokens", 0)),
                        completion_tokens=int(usage.get("completion_tokens", tokens))),
            timings=Timings(prompt_ms=(first - start) * 1000, decode_ms=(last - first) * 1000 if last else 0.0),
        )

    async def check_health(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


def _parse_event(name: str, data: str) -> tuple[str, str | None, dict[str, Any]]:
    try:
        payload = json.loads(data)
        if "error" in payload:
            raise TargetFailed(f"{name}: the endpoint reported an error: {str(payload['error'])[:200]}")
        usage = payload.get("usage") or {}
        choices = payload.get("choices") or []
        if not choices:
            return "", None, usage
        choice = choices[0]
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content") or ""
        if not isinstance(text, str):
            raise TypeError("text is not a string")
        return text, choice.get("finish_reason"), usage
    except (ValueError, TypeError, AttributeError) as e:
        raise TargetFailed(f"{name}: unexpected event {data[:80]!r}") from e
