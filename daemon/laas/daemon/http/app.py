"""The OpenAI-compatible HTTP API: its routes, over the application layer every edge calls.

Layer: edge (HTTP). Each route opens the call (auth.py: request id, token, scope, stream slot), converts
the OpenAI body to domain values (convert.py), calls the use case (app/runtime.py, as the gRPC servicer
does) and converts the result back (replies.py): JSON, or server-sent events (sse.py). A LaasError becomes
its status from the one error table (errors.py); a body over MAX_BODY_BYTES is refused (413) before it
is read whole. The route taken is on the first chunk (`laas.route`) and in the `x-laas-route` header.

    POST /v1/chat/completions, POST /v1/completions   (scope generate)
    POST /v1/embeddings                                (scope generate, as gRPC's Embed)
    GET  /v1/models, GET /v1/models/{id}               (scope models:read)
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at run time, and the
# dependencies in them (opening(...)) are local to create_app.

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from laas.core.errors import InvalidArgument, LaasError, NotFound, RequestTooLarge
from laas.daemon.app.runtime import Runtime
from laas.daemon.app.values import StreamChunk, TextRequest
from laas.daemon.http import convert, replies
from laas.daemon.http.auth import REQUEST_ID_HEADER, Gate, HttpCall
from laas.daemon.http.errors import error_response, validation_error
from laas.daemon.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    ErrorResponse,
    ModelList,
    ModelOut,
)
from laas.daemon.http.sse import events, unless_disconnected

MAX_BODY_BYTES = 4 << 20  # as a gRPC message (server.MAX_MESSAGE_BYTES)
_ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse}}


class BodyLimit:
    """Refuses a request body over `limit` bytes (413) before the app reads it whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        too_large = RequestTooLarge(f"the request body must be at most {self.limit} bytes")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            await error_response(too_large)(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            body += message.get("body", b"")
            if len(body) > self.limit:
                await error_response(too_large)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


T = TypeVar("T")


def _converted(http_call: HttpCall, model: str, convert_body: Callable[[], T]) -> T:
    """The body in domain terms; a refusal ends the call (begun for `model`, so the audit names it)."""
    try:
        return convert_body()
    except LaasError as e:
        http_call.call.begin(model)
        http_call.end(e)
        raise


def create_app(runtime: Runtime, gate: Gate) -> ASGIApp:
    app = FastAPI(title="laas", summary="laasd's OpenAI-compatible API", version="1", docs_url=None, redoc_url=None)
    started = int(time.time())

    @app.exception_handler(LaasError)
    async def _laas_error(request: Request, error: LaasError) -> Response:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 404:
            return error_response(NotFound(f"no such endpoint: {request.method} {request.url.path}"))
        if error.status_code == 405:
            return error_response(InvalidArgument(f"{request.method} is not allowed on {request.url.path}"))
        return error_response(InvalidArgument(str(error.detail)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> Response:
        return error_response(error)  # logged there: 500, no internals

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> Response:
        refusal = validation_error(error.errors())
        http_call: HttpCall | None = getattr(request.state, "http_call", None)
        if http_call is not None:  # opened (the caller may call) before the body was read
            http_call.call.begin()
            http_call.end(refusal)
        return error_response(refusal)

    def opening(method: str, scope: str, generation: bool = False) -> Any:
        """A dependency that opens the call: FastAPI runs it before it checks the body, so who calls is
        known (and refused: 401, 403) before what the body says."""

        async def open_call(request: Request) -> HttpCall:  # async: in the request task, for its contextvars
            http_call = gate.open(request, method, scope, generation)
            request.state.http_call = http_call
            return http_call

        return Depends(open_call)

    async def generate(request: Request, http_call: HttpCall, text: TextRequest, chat: bool, stream: bool,
                       include_usage: bool) -> Response:
        reply = replies.Reply(chat, http_call.rid)
        headers = {REQUEST_ID_HEADER: http_call.rid}
        try:
            chunks = runtime.generate(text, http_call.call)
            if not stream:
                async def collect() -> None:
                    async with aclosing(chunks) as items:
                        async for item in items:
                            reply.add(item)

                await unless_disconnected(request, collect())
                if reply.route is not None:
                    headers["x-laas-route"] = replies.route_header(reply.route)
                http_call.end(None)
                return JSONResponse(reply.whole(), headers=headers)
            first: StreamChunk = await unless_disconnected(request, _first(chunks))
        except BaseException as e:
            http_call.end(e)
            raise
        if first.route is not None:
            headers["x-laas-route"] = replies.route_header(first.route)
        return StreamingResponse(events(first, chunks, reply, http_call, include_usage), headers=headers,
                                 media_type="text/event-stream")

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(request: Request, body: ChatCompletionRequest,
                               http_call: Annotated[HttpCall, opening("ChatCompletions", "generate", True)]
                               ) -> Response:
        """Chat: the model's template over `messages`, then completion (streamed with `stream`)."""
        text = _converted(http_call, body.model, lambda: convert.chat_request(body))
        usage = body.stream_options is not None and body.stream_options.include_usage
        return await generate(request, http_call, text, True, body.stream, usage)

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(request: Request, body: CompletionRequest,
                          http_call: Annotated[HttpCall, opening("Completions", "generate", True)]) -> Response:
        """Text completion of `prompt` (streamed with `stream`)."""
        text = _converted(http_call, body.model, lambda: convert.completion_request(body))
        usage = body.stream_options is not None and body.stream_options.include_usage
        return await generate(request, http_call, text, False, body.stream, usage)

    @app.post("/v1/embeddings", responses=_ERRORS)
    async def embeddings(request: Request, body: EmbeddingsRequest,
                         http_call: Annotated[HttpCall, opening("Embeddings", "generate", True)]) -> Response:
        """The vectors of `input` (float lists, or base64 of little-endian float32 with encoding_format)."""
        embed = _converted(http_call, body.model, lambda: convert.embed_request(body))
        try:
            reply = await unless_disconnected(request, runtime.embed(embed, http_call.call))
        except BaseException as e:
            http_call.end(e)
            raise
        http_call.end(None)
        headers = {REQUEST_ID_HEADER: http_call.rid, "x-laas-route": replies.route_header(reply.route)}
        return JSONResponse(replies.embeddings_json(reply, body.encoding_format), headers=headers)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models(request: Request,
                          http_call: Annotated[HttpCall, opening("ListModels", "models:read")]) -> Response:
        """The models served here."""
        try:
            models = await runtime.list_models(http_call.call)
        except BaseException as e:
            http_call.end(e)
            raise
        http_call.end(None)
        return JSONResponse({"object": "list", "data": [replies.model_json(m, started) for m in models]},
                            headers={REQUEST_ID_HEADER: http_call.rid})

    @app.get("/v1/models/{model:path}", response_model=ModelOut, responses=_ERRORS)
    async def get_model(request: Request, model: str,
                        http_call: Annotated[HttpCall, opening("GetModel", "models:read")]) -> Response:
        """One model."""
        try:
            status = await runtime.get_model(model, http_call.call)
        except BaseException as e:
            http_call.end(e)
            raise
        http_call.end(None)
        return JSONResponse(replies.model_json(status, started), headers={REQUEST_ID_HEADER: http_call.rid})

    return BodyLimit(app, MAX_BODY_BYTES)


async def _first(chunks: AsyncGenerator[StreamChunk, None]) -> StreamChunk:
    return await anext(chunks)
