"""A fault-injecting HTTP proxy on loopback, between laasd and a real OpenAI-compatible server.

Modes: "pass" (forward), "status" (answer 503), "garbage" (an event stream of junk), "cut" (forward
`cut_after` events, then drop the connection mid-stream); `delay_s` adds latency before the answer.
It counts requests, streams completed and streams the downstream client abandoned.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.mode = "pass"
        self.delay_s = 0.0
        self.cut_after = 3
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
        self.requests = self.completed = self.abandoned = 0
        self.bodies.clear()
        self.authorization.clear()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, request: Request) -> Response:
        self.requests += 1
        body = await request.body()
        self.bodies.append(body)
        self.authorization.append(request.headers.get("authorization", ""))
        mode, delay = self.mode, self.delay_s
        if delay:
            await asyncio.sleep(delay)
        if mode == "status":
            return Response("upstream exploded", status_code=503)
        if mode == "garbage":
            return StreamingResponse(iter([b"data: {this is not json\n\n"]), media_type="text/event-stream")
        client = httpx.AsyncClient(timeout=None)
        upstream = await client.send(client.build_request(
            request.method, f"{self.upstream}/{request.path_params['path'].removeprefix('v1/')}", content=body,
            headers={"content-type": request.headers.get("content-type", "application/json")}), stream=True)
        return StreamingResponse(self._relay(client, upstream, mode), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type"))

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
            if not finished:
                finished = True
                self.completed += 1
        finally:
            if not finished and mode != "cut":
                self.abandoned += 1
            await upstream.aclose()
            await client.aclose()
