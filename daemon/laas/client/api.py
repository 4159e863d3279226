"""Client and AsyncClient: the same calls, blocking and asyncio. Sampling keywords are SamplingParams'."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from laas.client import discovery
from laas.client.channels import Tls, open_aio_channel, open_channel
from laas.client.types import (
    Chunk,
    Embeddings,
    Explanation,
    ModelDescription,
    Result,
    chunk_from_pb,
    constraint_pb,
    embed_request_pb,
    embeddings_from_pb,
    error_from_rpc,
    explanation_from_pb,
    message_pb,
    model_from_pb,
    routing_pb,
    sampling_pb,
    tools_pb,
)
from laas.core.addresses import DEFAULT_LISTEN
from laas.core.types import ChatMessage
from laas.v1 import runtime_pb2 as pb
from laas.v1 import runtime_pb2_grpc as pb_grpc

Message = Mapping[str, str] | tuple[str, str] | ChatMessage


def _chat_request(messages: Sequence[Message], model: str, sampling: Mapping[str, Any]) -> pb.ChatRequest:
    """`sampling` holds SamplingParams' keywords, the routing ones, keep_alive_s, and constraint (a
    core Constraint), tools (core Tools) and tool_choice (a core ToolChoice)."""
    options = dict(sampling)
    tools, choice = tools_pb(options.pop("tools", ()), options.pop("tool_choice", None))
    constraint = constraint_pb(options.pop("constraint", None))
    routing, keep_alive, options = _split_options(options)
    return pb.ChatRequest(model=model, messages=[message_pb(m) for m in messages], sampling=sampling_pb(**options),
                          routing=routing, keep_alive_s=keep_alive, constraint=constraint, tools=tools,
                          tool_choice=choice)


def _generate_request(prompt: str, model: str, sampling: Mapping[str, Any]) -> pb.GenerateRequest:
    options = dict(sampling)
    constraint = constraint_pb(options.pop("constraint", None))
    routing, keep_alive, options = _split_options(options)
    return pb.GenerateRequest(model=model, prompt=prompt, sampling=sampling_pb(**options), routing=routing,
                              keep_alive_s=keep_alive, constraint=constraint)


def _explain_request(prompt: str | None, messages: Sequence[Message], model: str,
                     sampling: Mapping[str, Any]) -> pb.ExplainRouteRequest:
    if messages:
        return pb.ExplainRouteRequest(chat=_chat_request(messages, model, sampling))
    return pb.ExplainRouteRequest(generate=_generate_request(prompt or "", model, sampling))


def _split_options(kwargs: Mapping[str, Any]) -> tuple[pb.Routing, float | None, dict[str, Any]]:
    """Separates the routing keywords (policy, latency_budget_ms) and keep_alive_s (seconds the model stays
    loaded after the request) from the sampling ones."""
    rest = dict(kwargs)
    routing = routing_pb(rest.pop("policy", None), rest.pop("latency_budget_ms", None))
    return routing, rest.pop("keep_alive_s", None), rest


def _health_name(status: int) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


class Client:
    """Blocking client. `target` is host:port or unix:/path (default: the local daemon); `tls` for a
    daemon with TLS (Tls(ca=..., cert=..., key=...) for mutual TLS), `token` when it requires tokens."""

    def __init__(self, target: str = DEFAULT_LISTEN, *, channel: grpc.Channel | None = None,
                 tls: Tls | None = None, token: str | None = None) -> None:
        self._channel = channel or open_channel(target, tls, token)
        self._stub = pb_grpc.RuntimeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @classmethod
    def discovered(cls, name: str | None = None, *, model: str = "", wait_s: float = 3.0,
                   interfaces: Sequence[str] = (), match: str = "*") -> Client:
        """Connects to the daemon advertised on the LAN (mDNS) as `name`, else to the least-loaded one
        that serves `model` (among names matching the glob `match`); NotFound when none answers in `wait_s`."""
        record = (discovery.find(name, wait_s, interfaces) if name
                  else discovery.least_loaded(model, wait_s, interfaces, match))
        return cls(record.target)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str, *, model: str = "", timeout: float | None = None,
                 **sampling: Any) -> Generator[Chunk, None, None]:
        """Streams chunks as the daemon decodes them. Breaking out of the loop cancels the request."""
        return self._stream(self._stub.Generate(_generate_request(prompt, model, sampling), timeout=timeout))

    def chat(self, messages: Sequence[Message], *, model: str = "", timeout: float | None = None,
             **sampling: Any) -> Generator[Chunk, None, None]:
        """Streams the assistant's reply to `messages` ({"role", "content"} mappings or (role, content))."""
        return self._stream(self._stub.Chat(_chat_request(messages, model, sampling), timeout=timeout))

    def complete(self, prompt: str, **kwargs: Any) -> Result:
        """generate(), joined."""
        return Result.join(self.generate(prompt, **kwargs))

    def explain(self, prompt: str | None = None, *, messages: Sequence[Message] = (), model: str = "",
                timeout: float | None = None, **sampling: Any) -> Explanation:
        """Where a Generate (prompt) or Chat (messages) request would go, and why; nothing is generated."""
        request = _explain_request(prompt, messages, model, sampling)
        return explanation_from_pb(self._call(self._stub.ExplainRoute, request, timeout))

    def embed(self, inputs: str | Sequence[str | Sequence[int]], *, model: str = "", dimensions: int | None = None,
              normalize: bool | None = None, truncate: bool = False, policy: str | None = None,
              keep_alive_s: float | None = None, timeout: float | None = None) -> Embeddings:
        """Vectors of texts (or token id lists) from an embedding model; a single text is one input."""
        request = embed_request_pb([inputs] if isinstance(inputs, str) else inputs, model, dimensions, normalize,
                                   truncate, policy, keep_alive_s)
        return embeddings_from_pb(self._call(self._stub.Embed, request, timeout))

    def explain_embed(self, inputs: str | Sequence[str | Sequence[int]], *, model: str = "",
                      policy: str | None = None, timeout: float | None = None) -> Explanation:
        """Where an Embed call would run, and why the other targets are not eligible (nothing is embedded)."""
        request = embed_request_pb([inputs] if isinstance(inputs, str) else inputs, model, policy=policy)
        return explanation_from_pb(self._call(self._stub.ExplainRoute, pb.ExplainRouteRequest(embed=request), timeout))

    def tokenize(self, text: str, *, model: str = "", add_special: bool = False,
                 timeout: float | None = None) -> list[int]:
        request = pb.TokenizeRequest(model=model, text=text, add_special=add_special)
        return list(self._call(self._stub.Tokenize, request, timeout).tokens)

    def models(self, *, timeout: float | None = None) -> list[ModelDescription]:
        return [model_from_pb(m) for m in self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout).models]

    def model(self, name: str = "", *, timeout: float | None = None) -> ModelDescription:
        return model_from_pb(self._call(self._stub.GetModel, pb.GetModelRequest(name=name), timeout))

    def load_model(self, name: str = "", *, keep_alive_s: float | None = None,
                   timeout: float | None = None) -> ModelDescription:
        """Loads a model now and keeps it loaded keep_alive_s idle seconds (needs the models:admin scope)."""
        request = pb.LoadModelRequest(name=name, keep_alive_s=keep_alive_s)
        return model_from_pb(self._call(self._stub.LoadModel, request, timeout))

    def unload_model(self, name: str = "", *, timeout: float | None = None) -> ModelDescription:
        """Unloads a model, at once when idle, else when its streams end (needs the models:admin scope)."""
        return model_from_pb(self._call(self._stub.UnloadModel, pb.UnloadModelRequest(name=name), timeout))

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING, ... for the daemon ("") or one service."""
        request = health_pb2.HealthCheckRequest(service=service)
        return _health_name(self._call(self._health.Check, request, timeout).status)

    @staticmethod
    def _call(method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    @staticmethod
    def _stream(call: Any) -> Generator[Chunk, None, None]:
        try:
            for msg in call:
                yield chunk_from_pb(msg)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()  # no-op when the stream ended; cancels the daemon's work when the caller stopped


class AsyncClient:
    """asyncio client; the same calls as Client, awaited, and streams as async iterators."""

    def __init__(self, target: str = DEFAULT_LISTEN, *, channel: grpc.aio.Channel | None = None,
                 tls: Tls | None = None, token: str | None = None) -> None:
        self._channel = channel or open_aio_channel(target, tls, token)
        self._stub = pb_grpc.RuntimeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @classmethod
    async def discovered(cls, name: str | None = None, *, model: str = "", wait_s: float = 3.0,
                         interfaces: Sequence[str] = (), match: str = "*") -> AsyncClient:
        """Client.discovered, awaited."""
        record = (await discovery.find_async(name, wait_s, interfaces) if name
                  else await discovery.least_loaded_async(model, wait_s, interfaces, match))
        return cls(record.target)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def generate(self, prompt: str, *, model: str = "", timeout: float | None = None,
                 **sampling: Any) -> AsyncGenerator[Chunk, None]:
        return self._stream(self._stub.Generate(_generate_request(prompt, model, sampling), timeout=timeout))

    def chat(self, messages: Sequence[Message], *, model: str = "", timeout: float | None = None,
             **sampling: Any) -> AsyncGenerator[Chunk, None]:
        return self._stream(self._stub.Chat(_chat_request(messages, model, sampling), timeout=timeout))

    async def complete(self, prompt: str, **kwargs: Any) -> Result:
        return Result.join([c async for c in self.generate(prompt, **kwargs)])

    async def explain(self, prompt: str | None = None, *, messages: Sequence[Message] = (), model: str = "",
                      timeout: float | None = None, **sampling: Any) -> Explanation:
        request = _explain_request(prompt, messages, model, sampling)
        return explanation_from_pb(await self._call(self._stub.ExplainRoute, request, timeout))

    async def embed(self, inputs: str | Sequence[str | Sequence[int]], *, model: str = "",
                    dimensions: int | None = None, normalize: bool | None = None, truncate: bool = False,
                    policy: str | None = None, keep_alive_s: float | None = None,
                    timeout: float | None = None) -> Embeddings:
        request = embed_request_pb([inputs] if isinstance(inputs, str) else inputs, model, dimensions, normalize,
                                   truncate, policy, keep_alive_s)
        return embeddings_from_pb(await self._call(self._stub.Embed, request, timeout))

    async def explain_embed(self, inputs: str | Sequence[str | Sequence[int]], *, model: str = "",
                            policy: str | None = None, timeout: float | None = None) -> Explanation:
        request = embed_request_pb([inputs] if isinstance(inputs, str) else inputs, model, policy=policy)
        return explanation_from_pb(await self._call(self._stub.ExplainRoute, pb.ExplainRouteRequest(embed=request),
                                                    timeout))

    async def tokenize(self, text: str, *, model: str = "", add_special: bool = False,
                       timeout: float | None = None) -> list[int]:
        request = pb.TokenizeRequest(model=model, text=text, add_special=add_special)
        return list((await self._call(self._stub.Tokenize, request, timeout)).tokens)

    async def models(self, *, timeout: float | None = None) -> list[ModelDescription]:
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [model_from_pb(m) for m in response.models]

    async def model(self, name: str = "", *, timeout: float | None = None) -> ModelDescription:
        return model_from_pb(await self._call(self._stub.GetModel, pb.GetModelRequest(name=name), timeout))

    async def load_model(self, name: str = "", *, keep_alive_s: float | None = None,
                         timeout: float | None = None) -> ModelDescription:
        request = pb.LoadModelRequest(name=name, keep_alive_s=keep_alive_s)
        return model_from_pb(await self._call(self._stub.LoadModel, request, timeout))

    async def unload_model(self, name: str = "", *, timeout: float | None = None) -> ModelDescription:
        request = pb.UnloadModelRequest(name=name)
        return model_from_pb(await self._call(self._stub.UnloadModel, request, timeout))

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        return _health_name((await self._call(self._health.Check, request, timeout)).status)

    @staticmethod
    async def _call(method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    @staticmethod
    async def _stream(call: Any) -> AsyncGenerator[Chunk, None]:
        try:
            async for msg in call:
                yield chunk_from_pb(msg)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()
