"""A fault-injecting HTTP proxy on loopback, between laasd and a real OpenAI-compatible server.

Modes: "pass" (forward), "status" (answer 503), "garbage" (an event stream of junk), "cut" (forward
`cut_after` events, then drop the connection mid-stream); `delay_s` adds latency before the answer,
`jitter_s` a uniform +/- spread around it (a network's round trip: bench/routing_mixed.py's WAN cloud);
`suppress_token` (a token id) is added to each request's logit_bias at -100, so that a server without
`ignore_eos` (llama_cpp.server) decodes every token asked for when the request asks for ignore_eos.
Hostile endpoints (issue 13): "ping" (`: ping` comments and never a token), "empty" (events with
empty deltas, never text), "stall" (forward `cut_after` events, then only pings), "trickle" (a token
every `tick_s`, never a finish), "huge" (one `data:` line of `huge_bytes` without a newline), "echo"
(HTTP 401 whose body quotes the request's headers, Authorization included) and "echo_event" (an
error event quoting it). The synthetic streams send a tick every `tick_s`, for at most `max_ticks`.
It counts requests, streams completed, streams the downstream client abandoned and bytes it sent in
the synthetic streams.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.mode = "pass"
        self.delay_s = 0.0
        self.jitter_s = 0.0
        self.suppress_token: int | None = None
        self.cut_after = 3
        self.tick_s = 0.05
        self.max_ticks = 6000
        self.huge_bytes = 512 << 20
        self.sent_bytes = 0
        self.requests = 0
        self.completed = 0
        self.abandoned = 0
        self.bodies: list[bytes] = []
        self.authorization: list[str] = []
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical",
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.port = 0

    def start(self) -> FaultProxy:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)

    def reset(self, mode: str = "pass", delay_s: float = 0.0, cut_after: int = 3) -> None:
        self.mode, self.delay_s, self.cut_after = mode, delay_s, cut_after
        self.requests = self.completed = self.abandoned = self.sent_bytes = 0
        self.bodies.clear()
        self.authorization.clear()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, request: Request) -> Response:
        self.requests += 1
        body = await request.body()
        if self.suppress_token is not None and body:
            asked = json.loads(body)
            if asked.pop("ignore_eos", False):
                asked["logit_bias"] = {**asked.get("logit_bias", {}), str(self.suppress_token): -100}
                body = json.dumps(asked).encode()
        self.bodies.append(body)
        self.authorization.append(request.headers.get("authorization", ""))
        mode, delay = self.mode, self.delay_s
        if self.jitter_s:
            delay = max(random.uniform(delay - self.jitter_s, delay + self.jitter_s), 0.0)
        if delay:
            await asyncio.sleep(delay)
        if mode == "status":
            return Response("upstream exploded", status_code=503)
        if mode == "garbage":
            return StreamingResponse(iter([b"data: {this is not json\n\n"]), media_type="text/event-stream")
        if mode == "echo":
            return JSONResponse({"error": {"message": "invalid request", "request_headers": dict(request.headers)}},
                                status_code=401)
        if mode == "echo_event":
            event = {"error": {"message": f"rejected Authorization: {request.headers.get('authorization')}"}}
            return StreamingResponse(iter([f"data: {json.dumps(event)}\n\n".encode()]),
                                     media_type="text/event-stream")
        if mode in ("ping", "empty", "trickle", "huge"):
            return StreamingResponse(self._synthetic(mode), media_type="text/event-stream")
        client = httpx.AsyncClient(timeout=None)
        upstream = await client.send(client.build_request(
            request.method, f"{self.upstream}/{request.path_params['path'].removeprefix('v1/')}", content=body,
            headers={"content-type": request.headers.get("content-type", "application/json")}), stream=True)
        return StreamingResponse(self._relay(client, upstream, mode), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type"))

    def _tick(self, mode: str) -> bytes:
        if mode == "empty":
            return b'data: {"choices":[{"index":0,"delta":{"content":""},"finish_reason":null}]}\n\n'
        if mode == "trickle":
            return b'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n'
        return b": ping\n\n"

    async def _synthetic(self, mode: str) -> AsyncIterator[bytes]:
        try:
            if mode == "huge":
                yield b"data: "
                block = b"x" * 65536
                while self.sent_bytes < self.huge_bytes:
                    self.sent_bytes += len(block)
                    yield block
                    await asyncio.sleep(0)  # a hung-up client is noticed (uvicorn drops writes to it silently)
                return
            for _ in range(self.max_ticks):
                chunk = self._tick(mode)
                self.sent_bytes += len(chunk)
                yield chunk
                await asyncio.sleep(self.tick_s)
        finally:
            self.abandoned += 1  # it never finishes: the client hung up (or the ticks ran out)

    async def _relay(self, client: httpx.AsyncClient, upstream: httpx.Response, mode: str) -> AsyncIterator[bytes]:
        events = 0
        finished = False
        try:
            async for line in upstream.aiter_lines():
                if line.strip() == "data: [DONE]" and not finished:
                    finished = True  # counted before it is sent: the client may hang up right after it
                    self.completed += 1
                yield (line + "\n").encode()
                if line.startswith("data:"):
                    events += 1
                    if mode == "cut" and events >= self.cut_after:
                        raise ConnectionAbortedError("fault injected: stream cut")
                    if mode == "stall" and events >= self.cut_after:
                        async for chunk in self._synthetic("ping"):  # counts the client hanging up
                            yield chunk
                        return
            if not finished:
                finished = True
                self.completed += 1
        finally:
            if not finished and mode not in ("cut", "stall"):
                self.abandoned += 1
            await upstream.aclose()
            await client.aclose()
