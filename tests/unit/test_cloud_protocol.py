"""The cloud protocol (router/laas/router/cloud.py) against httpx.MockTransport: no server, no sockets.

OpenAI-compatible streaming (completions and chat), the request body and headers sent, server-sent
events split anywhere and with any line ending, pings and empty deltas, `[DONE]`; every failure (HTTP
error statuses, error events, garbage, a stream that ends early, a refused connection, no token within
the read timeout, an oversized event) becomes TargetFailed without the endpoint's words or the API key;
closing the stream closes the HTTP response. tests/integration/test_cloud_faults.py runs the same
faults over a real loopback server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import httpx
import pytest

from laas.core.errors import TargetFailed
from laas.core.types import (
    ChatMessage,
    Completion,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from laas.router.cloud import CloudConfig, CloudEngine
from laas.router.sse import MAX_EVENT_BYTES

KEY = "sk-unit-0123456789abcdef"
Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


class Body(httpx.AsyncByteStream):
    """A response body sent chunk by chunk; `hang` keeps it open after the chunks; records its closing."""

    def __init__(self, chunks: Sequence[bytes], *, hang: bool = False, between: float = 0.0) -> None:
        self.chunks, self.hang, self.between = list(chunks), hang, between
        self.closed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            if self.between:
                await asyncio.sleep(self.between)  # the endpoint's pace, not a wait for the test
            yield chunk
        if self.hang:
            await asyncio.Event().wait()  # an endpoint that keeps the connection open and sends nothing

    async def aclose(self) -> None:
        self.closed.set()


def sse(*events: object, end: str = "\n") -> bytes:
    """Server-sent events: dicts as JSON data, strings as they are (`: ping`, `data: [DONE]`)."""
    out = []
    for e in events:
        out.append(f"data: {json.dumps(e, ensure_ascii=False)}{end}{end}" if isinstance(e, dict) else f"{e}{end}{end}")
    return "".join(out).encode()


def text_event(text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"choices": [{"text": text, "finish_reason": finish}], **extra}


def chat_event(content: str | None, finish: str | None = None, role: str | None = None) -> dict[str, Any]:
    delta = {k: v for k, v in (("content", content), ("role", role)) if v is not None}
    return {"choices": [{"delta": delta, "finish_reason": finish}]}


class Endpoint:
    """An OpenAI-compatible endpoint as a MockTransport handler: answers every call with `status` and
    `body`, and keeps the requests it got."""

    def __init__(self, body: Body, status: int = 200) -> None:
        self.body, self.status = body, status
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, headers={"content-type": "text/event-stream"}, stream=self.body)

    def json(self, i: int = 0) -> Any:
        return json.loads(self.requests[i].content)


def engine(handler: Handler, *, read_timeout_s: float = 5.0, call_timeout_s: float = 60.0,
           chat_only: bool = False) -> CloudEngine:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return CloudEngine(CloudConfig("cloud", "https://api.example/v1/", "m-1", 4096, api_key=KEY,
                                   read_timeout_s=read_timeout_s, call_timeout_s=call_timeout_s,
                                   chat_only=chat_only), client)


async def run(eng: CloudEngine, request: GenerationRequest | None = None) -> tuple[list[str], Completion]:
    chunks: list[GenerationChunk] = []
    try:
        async for chunk in eng.generate(request or GenerationRequest("Hi", SamplingParams(max_tokens=8))):
            chunks.append(chunk)
    finally:
        await eng.aclose()
    assert isinstance(chunks[-1], Completion) and all(isinstance(c, TextDelta) for c in chunks[:-1])
    return [c.text for c in chunks if isinstance(c, TextDelta)], chunks[-1]


async def fails(eng: CloudEngine) -> TargetFailed:
    with pytest.raises(TargetFailed) as info:
        await run(eng)
    assert KEY not in str(info.value)
    return info.value


async def test_a_completion_streams_its_text_and_the_endpoints_usage() -> None:
    endpoint = Endpoint(Body([sse(text_event("Once"), text_event(" upon"), ": ping",
                                  text_event(" a", "length", usage={"prompt_tokens": 3, "completion_tokens": 3}),
                                  "data: [DONE]")]))
    request = GenerationRequest("Tell me", SamplingParams(max_tokens=3, temperature=0.0, seed=7, stop=("\n",)))
    texts, done = await run(engine(endpoint), request)
    assert texts == ["Once", " upon", " a"]
    assert done.finish_reason is FinishReason.LENGTH
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 3)
    sent = endpoint.requests[0]
    assert str(sent.url) == "https://api.example/v1/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["accept"] == "text/event-stream" and sent.headers["accept-encoding"] == "identity"
    body = endpoint.json()
    assert body["model"] == "m-1" and body["stream"] is True and body["prompt"] == "Tell me"
    assert (body["max_tokens"], body["seed"], body["stop"], body["temperature"]) == (3, 7, ["\n"], 0.0)
    assert "ignore_eos" not in body and "messages" not in body


async def test_chat_sends_messages_and_skips_role_only_and_empty_deltas() -> None:
    endpoint = Endpoint(Body([sse(chat_event(None, role="assistant"), chat_event("Hel"), chat_event(""),
                                  chat_event("lo"), chat_event(None, "stop"), "data: [DONE]", end="\r\n")]))
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    texts, done = await run(engine(endpoint), GenerationRequest("", SamplingParams(ignore_eos=True),
                                                                messages=messages))
    assert texts == ["Hel", "lo"] and done.finish_reason is FinishReason.STOP
    assert done.usage.completion_tokens == 2  # no usage from the endpoint: the text events are counted
    assert str(endpoint.requests[0].url).endswith("/v1/chat/completions")
    body = endpoint.json()
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert body["ignore_eos"] is True and "prompt" not in body and "max_tokens" not in body


async def test_a_chat_only_endpoint_gets_the_prompt_as_a_user_message() -> None:
    endpoint = Endpoint(Body([sse(chat_event("ok", "eos"))]))  # no [DONE]: the end of the body ends it
    texts, done = await run(engine(endpoint, chat_only=True))
    assert texts == ["ok"] and done.finish_reason is FinishReason.STOP
    assert endpoint.json()["messages"] == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("cut", [1, 2, 7, 13, 50])
async def test_events_split_anywhere_give_the_same_stream(cut: int) -> None:
    whole = sse(text_event("é"), text_event("日本"), text_event("ü", "stop"), "data: [DONE]", end="\r\n")
    pieces = [whole[i:i + cut] for i in range(0, len(whole), cut)]  # splits UTF-8 sequences and CRLFs too
    texts, done = await run(engine(Endpoint(Body(pieces))))
    assert texts == ["é", "日本", "ü"] and done.finish_reason is FinishReason.STOP


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503, 599])
async def test_an_error_status_is_target_failed_with_the_status_only(
        status: int, caplog: pytest.LogCaptureFixture) -> None:
    page = f'{{"error": "bad key Authorization: Bearer {KEY}", "detail": "upstream secret"}}'.encode()
    with caplog.at_level(logging.WARNING, logger="laas.router.cloud"):
        error = await fails(engine(Endpoint(Body([page]), status=status)))
    assert f"HTTP {status}" in str(error) and "upstream secret" not in str(error)
    assert "upstream secret" in caplog.text and KEY not in caplog.text  # the log has the body, masked


@pytest.mark.parametrize(("events", "says"), [
    ([{"error": {"message": "overloaded"}}], "reported an error"),
    (["data: {not json"], "unexpected event"),
    ([{"choices": [{"text": 5}]}], "unexpected event"),
    ([{"choices": [{"text": "a"}], "usage": "lots"}], "unexpected event"),
    ([text_event("a"), "data: [DONE]"], "ended before a finish reason"),
    ([text_event("a")], "ended before a finish reason"),
])
async def test_a_broken_stream_is_target_failed(events: list[object], says: str) -> None:
    error = await fails(engine(Endpoint(Body([sse(*events)]))))
    assert says in str(error)
    assert "overloaded" not in str(error)


async def test_a_refused_connection_is_target_failed() -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    assert "ConnectError" in str(await fails(engine(refuse)))


async def test_a_transport_read_timeout_is_target_failed() -> None:
    async def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    assert "ReadTimeout" in str(await fails(engine(stall)))


@pytest.mark.parametrize("chunks", [[], [sse(": ping", chat_event(""), chat_event(None, role="assistant"))]],
                         ids=["silent", "pings-only"])
async def test_no_token_within_the_read_timeout_is_target_failed(chunks: list[bytes]) -> None:
    body = Body(chunks, hang=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    error = await fails(engine(Endpoint(body), read_timeout_s=0.05))
    assert "no token within 0.05s" in str(error)
    assert loop.time() - started < 2.0
    assert body.closed.is_set()


async def test_a_trickle_is_bounded_by_the_call_timeout() -> None:
    body = Body([sse(text_event("x"))] * 1000, between=0.01)
    error = await fails(engine(Endpoint(body), read_timeout_s=1.0, call_timeout_s=0.1))
    assert "longer than 0.1s" in str(error)


async def test_an_oversized_event_is_target_failed() -> None:
    huge = b"data: " + b"x" * (MAX_EVENT_BYTES + 1)
    body = Body([huge[i:i + 65536] for i in range(0, len(huge), 65536)], hang=True)
    assert "more than" in str(await fails(engine(Endpoint(body))))
    assert body.closed.is_set()


async def test_closing_the_stream_closes_the_http_response() -> None:
    body = Body([sse(text_event("a"), text_event("b"))], hang=True)
    eng = engine(Endpoint(body))
    stream = eng.generate(GenerationRequest("Hi"))
    assert await anext(stream) == TextDelta("a")
    assert not body.closed.is_set()
    await stream.aclose()
    await asyncio.wait_for(body.closed.wait(), 5)
    await eng.aclose()
