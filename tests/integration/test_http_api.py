"""The OpenAI-compatible HTTP API against the real daemon and model, with the official `openai` SDK (sync
and async) and curl: chat and text completions (whole and streamed), models, every error class the SDK
raises, the route, request ids, cancellation and a slow reader."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import Stream
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from laas.client import Client, Tls
from laas.daemon import tokens
from tests.certs import CertificateAuthority
from tests.daemon_process import DaemonProcess

MODEL = "smollm2-135m-instruct"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


def _long(sdk: openai.OpenAI) -> Stream[ChatCompletionChunk]:
    """A stream of about 30 s of decoding if nothing stops it."""
    return sdk.chat.completions.create(model=MODEL, messages=HI, stream=True, max_tokens=3000, temperature=0,
                                       extra_body={"ignore_eos": True})


def _sdk(daemon: DaemonProcess, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.http_url, api_key=key, max_retries=0, timeout=120)


def _wait_idle(daemon: DaemonProcess, timeout: float = 5.0) -> float:
    start = time.monotonic()
    with Client(daemon.target) as client:
        while time.monotonic() - start < timeout:
            m = client.model()
            if m.active_requests == 0 and m.queued_requests == 0:
                return time.monotonic() - start
            time.sleep(0.01)
    raise AssertionError("the model is still busy")


def test_chat_whole_and_streamed_say_the_same(daemon: DaemonProcess) -> None:
    sdk = _sdk(daemon)
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=8, temperature=0,
                                                        extra_headers={"x-request-id": "http-test-1"})
    whole = raw.parse()
    assert raw.headers["x-request-id"] == "http-test-1"
    assert raw.headers["x-laas-route"].startswith(f"{MODEL}; kind=local; reason=")
    assert whole.object == "chat.completion" and whole.model == MODEL and whole.id == "chatcmpl-http-test-1"
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert whole.usage is not None and whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8
    extra = whole.model_extra or {}
    assert extra["laas"]["routes"][0]["target"] == MODEL and extra["laas"]["routes"][0]["kind"] == "local"
    assert extra["laas"]["timings"]["time_to_first_token_ms"] > 0

    chunks = list(sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (chunks[0].model_extra or {})["laas"]["route"]["target"] == MODEL
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same answer, whole or streamed


async def test_text_completions_async_match_grpc(daemon: DaemonProcess, client: Client) -> None:
    prompt = "The capital of France is"
    grpc_text = client.complete(prompt, max_tokens=6, temperature=0).text
    async with openai.AsyncOpenAI(base_url=daemon.http_url, api_key="none", max_retries=0) as sdk:
        whole = await sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        assert whole.object == "text_completion" and whole.choices[0].text == grpc_text
        assert whole.choices[0].finish_reason == "length" and whole.usage and whole.usage.completion_tokens == 6
        stream = await sdk.completions.create(model=MODEL, prompt=[prompt], max_tokens=6, temperature=0, stream=True)
        texts = [c.choices[0].text async for c in stream]
        assert "".join(texts) == grpc_text
        chat = await sdk.chat.completions.create(model="", messages=HI, max_tokens=3, seed=7, temperature=0.7,
                                                 top_p=0.9, stop=["\n\n"], presence_penalty=0.1,
                                                 frequency_penalty=0.1, user="u1",
                                                 extra_body={"top_k": 20, "min_p": 0.1, "repeat_penalty": 1.1,
                                                             "routing_policy": "local_only", "keep_alive": 60})
        assert chat.model == MODEL and chat.usage and chat.usage.completion_tokens <= 3
        assert (chat.model_extra or {})["laas"]["routes"][0]["local_only"] is True


def test_models(daemon: DaemonProcess) -> None:
    sdk = _sdk(daemon)
    assert [m.id for m in sdk.models.list()] == [MODEL]
    model = sdk.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "laas" and model.created > 0
    with pytest.raises(openai.NotFoundError) as e:
        sdk.models.retrieve("no-such-model")
    assert e.value.body is not None and "no-such-model" in e.value.message


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n": 2}, "n"),
    ({"top_p": 7.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                 "function": {"name": "g"}}},
     "tool_choice.function"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"extra_body": {"latency_budget_ms": -1}}, "latency_budget_ms"),
    ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[0].type"),
])
def test_bad_requests_name_the_param(daemon: DaemonProcess, kwargs: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": HI, "max_tokens": 2} | kwargs
    with pytest.raises(openai.BadRequestError) as e:
        _sdk(daemon).chat.completions.create(**body)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body
    assert isinstance(e.value.body, dict) and e.value.body["type"] == "invalid_request_error"


def test_not_found_and_unprocessable(daemon: DaemonProcess) -> None:
    sdk = _sdk(daemon)
    with pytest.raises(openai.NotFoundError) as nf:
        sdk.chat.completions.create(model="no-such-model", messages=HI)
    assert nf.value.param == "model" and isinstance(nf.value.body, dict) and nf.value.body["code"] == "not_found"
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        sdk.chat.completions.create(model=MODEL, messages=HI, extra_body={"temperature": "hot"})
    assert bad.value.status_code == 422 and bad.value.param == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as policy:
        sdk.chat.completions.create(model=MODEL, messages=HI, extra_body={"routing_policy": "anywhere"})
    assert policy.value.param == "routing_policy" and "local_only" in policy.value.message
    with pytest.raises(openai.UnprocessableEntityError) as missing:
        sdk.completions.create(model=MODEL, prompt="x", extra_body={"prompt": None})
    assert missing.value.param == "prompt"
    too_big = httpx.post(f"{daemon.http_url}/chat/completions", content=b"{" + b" " * (5 << 20) + b"}",
                         headers={"content-type": "application/json"}, timeout=30)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "invalid_argument"


def test_an_idle_keep_alive_connection_outlives_the_clients_pool(daemon: DaemonProcess) -> None:
    """A pooled connection idle past httpx's expiry (5 s, the openai SDK's) is still open: the server never
    closes one just as a client reuses it (a POST would fail with "Server disconnected")."""
    request = f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{daemon.http_port}\r\n\r\n".encode()

    def answer(sock: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        return data

    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=30) as sock:
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6.5)  # the behaviour under test is the passage of idle time: past the clients' 5 s
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")


def _length(response: bytes) -> int:
    for line in response.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_curl_sees_server_sent_events(daemon: DaemonProcess) -> None:
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True})
    done = subprocess.run(["curl", "-sN", f"{daemon.http_url}/completions", "-H", "content-type: application/json",
                           "-d", body], capture_output=True, text=True, timeout=60, check=True)
    events = done.stdout.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", done.stdout
    data = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert data[0]["laas"]["route"]["kind"] == "local" and data[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for d in data if d["choices"][0]["text"]) >= 2


def test_closing_the_stream_stops_the_decode(daemon: DaemonProcess) -> None:
    sdk = _sdk(daemon)
    stream = _long(sdk)
    received = [next(stream) for _ in range(5)]
    assert received[0].choices[0].delta.role == "assistant"
    with Client(daemon.target) as client:
        assert client.model().active_requests == 1
    stream.close()  # the client goes away mid-stream
    assert _wait_idle(daemon) < 5.0
    after = sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    timings = (after.model_extra or {})["laas"]["timings"]
    assert after.usage and after.usage.completion_tokens == 2 and timings["queue_ms"] < 1000


async def test_async_stream_closed_while_queued_leaves_the_queue(daemon: DaemonProcess) -> None:
    """A stream waiting for its turn (before any chunk) that the client abandons leaves the queue at once."""
    async with openai.AsyncOpenAI(base_url=daemon.http_url, api_key="none", max_retries=0) as sdk:
        with Client(daemon.target) as client:
            slots = client.model().parallel
        running = [await sdk.chat.completions.create(model=MODEL, messages=HI, stream=True, max_tokens=3000,
                                                     temperature=0, extra_body={"ignore_eos": True})
                   for _ in range(slots)]  # every slot taken: the next one waits
        for stream in running:
            await anext(aiter(stream))
        http = httpx.AsyncClient(timeout=60)
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "stream": True}
        waiting = http.stream("POST", f"{daemon.http_url}/completions", json=body)
        request = waiting.__aenter__()
        with Client(daemon.target) as client:
            task = asyncio.ensure_future(request)
            deadline = time.monotonic() + 10
            while client.model().queued_requests != 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert client.model().queued_requests == 1
            task.cancel()  # the waiting client goes away
            await http.aclose()
            deadline = time.monotonic() + 5
            while client.model().queued_requests and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert client.model().queued_requests == 0 and client.model().active_requests == slots
        for stream in running:
            await stream.close()
    assert _wait_idle(daemon) < 5.0


def test_a_slow_reader_does_not_stall_other_streams(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon("parallel = 2\n")
    slow = socket.create_connection(("127.0.0.1", daemon.http_port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    try:
        with Client(daemon.target) as client:
            deadline = time.monotonic() + 30
            while client.model().active_requests != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            # the slow reader reads nothing: its response backs up; another stream runs beside it
            chunks = list(_sdk(daemon).completions.create(model=MODEL, prompt="Hello", max_tokens=12,
                                                          temperature=0, stream=True))
            assert chunks[-1].choices[0].finish_reason == "length"
            assert sum(1 for c in chunks if c.choices[0].text) >= 10
            assert client.model().active_requests == 1  # the slow one is still there
    finally:
        slow.close()
    assert _wait_idle(daemon, 10) < 10


def _token(home: Path, name: str, scopes: str) -> str:
    token, _ = tokens.create(home / "tokens", name, frozenset(s for s in scopes.split(",") if s))
    return token


def test_tokens_scopes_and_streams_per_token(start_daemon: Callable[..., DaemonProcess],
                                             make_home: Callable[..., Path], tmp_path: Path) -> None:
    home = make_home()
    gen, reader = _token(home, "gen", "generate"), _token(home, "reader", "models:read")
    sock = tmp_path / "http.sock"
    daemon = start_daemon("max_streams_per_token = 1\n", home=home, http_listen=f"127.0.0.1:0,unix:{sock}")
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        _sdk(daemon).models.list()
    assert unauthenticated.value.response.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        _sdk(daemon, "laas_0000_wrong").chat.completions.create(model=MODEL, messages=HI)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        _sdk(daemon, reader).chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert "'generate'" in denied.value.message
    assert [m.id for m in _sdk(daemon, reader).models.list()] == [MODEL]
    with pytest.raises(openai.PermissionDeniedError):
        _sdk(daemon, gen).models.list()
    stream = _long(_sdk(daemon, gen))
    next(stream)
    with pytest.raises(openai.RateLimitError) as limited:
        _sdk(daemon, gen).chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert limited.value.response.headers["retry-after"] == "1" and "max_streams_per_token" in limited.value.message
    stream.close()
    # the unix socket: the same API, the same tokens
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as unix:
        over_unix = unix.get("http://laas/v1/models", headers={"authorization": f"Bearer {reader}"})
    assert over_unix.status_code == 200 and over_unix.json()["data"][0]["id"] == MODEL
    assert sock.stat().st_mode & 0o777 == 0o660
    lines = [json.loads(x) for x in (home / "audit.log").read_text().splitlines()]
    ended = [x for x in lines if x["status"] != "STARTED"]
    assert any(x["method"] == "ChatCompletions" and x["who"] == "?" and x["status"] == "UNAUTHENTICATED"
               for x in ended)
    assert any(x["method"] == "ChatCompletions" and x["who"].endswith("(reader)") and x["status"] ==
               "PERMISSION_DENIED" for x in ended)
    assert any(x["method"] == "ChatCompletions" and x["who"].endswith("(gen)") and x["status"] == "RESOURCE_EXHAUSTED"
               for x in ended)
    assert any(x["method"] == "ListModels" and x["who"].endswith("(reader)") and x["status"] == "OK" for x in ended)


def test_http_listen_empty_serves_no_http(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(http_listen="")
    assert daemon.http_port == 0 and "HTTP API on" not in daemon.log


def test_https_and_mutual_tls_name_the_caller(start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    ca = CertificateAuthority()
    server_cert, server_key = ca.issue("laasd", server=True).write(tmp_path, "server")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem.cert)
    alice_cert, alice_key = ca.issue("alice", server=False).write(tmp_path, "alice")
    daemon = start_daemon(f'tls_cert = "{server_cert}"\ntls_key = "{server_key}"\ntls_client_ca = "{ca_file}"\n',
                          tls=Tls(ca=ca.pem.cert, cert=alice_cert.read_bytes(), key=alice_key.read_bytes()))
    assert "HTTP API on https://" in daemon.log
    url = f"https://127.0.0.1:{daemon.http_port}/v1/models"
    context = ssl.create_default_context(cafile=str(ca_file))
    with pytest.raises(httpx.TransportError):  # no client certificate: no TLS session
        httpx.get(url, verify=context, timeout=10)
    context.load_cert_chain(str(alice_cert), str(alice_key))
    with httpx.Client(verify=context, timeout=30) as https:
        assert https.get(url).json()["data"][0]["id"] == MODEL
        assert "/v1/chat/completions" in https.get(f"https://127.0.0.1:{daemon.http_port}/openapi.json").json()["paths"]
    lines = [json.loads(x) for x in (daemon.home / "audit.log").read_text().splitlines()]
    assert any(x["method"] == "ListModels" and x["who"] == "alice" and x["status"] == "OK" for x in lines)
