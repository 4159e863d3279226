"""Another laasd as a remote Endpoint (remote.py), over our own gRPC API: the shape LAN peers take.

Layer: infrastructure. Constraints, tools (and the history's calls and results) and logprobs travel as
laas.v1 has them; tool-call deltas and logprobs come back as they are. The request is sent LOCAL_ONLY,
so a peer never forwards what it got from a peer (no loops). Any failure of the peer becomes
TargetFailed, and the router fails over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from laas.client.api import AsyncClient
from laas.client.channels import Tls
from laas.core.errors import Cancelled, LaasError, TargetFailed
from laas.core.types import (
    Completion,
    Embedding,
    EmbeddingRequest,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    TextDelta,
    Timings,
    Usage,
)

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "tool_calls": FinishReason.TOOL_CALLS}


class PeerEngine:
    """A laasd on the LAN: chat messages go as Chat (it applies its own template), prompts as Generate."""

    def __init__(self, name: str, target: str, model: str, context_length: int, *, tls: Tls | None = None,
                 token: str | None = None) -> None:
        self._tls, self._token = tls, token  # a peer on the LAN has TLS and tokens (security.py)
        self.name = name
        self.model = model
        self._target = target
        self._client: AsyncClient | None = None  # made on first use: a grpc.aio channel binds to the running loop
        self._context_length = context_length

    @property
    def context_length(self) -> int:
        return self._context_length

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        sampling: dict[str, Any] = {f.name: getattr(request.sampling, f.name)  # the client takes the same names
                                    for f in dataclasses.fields(request.sampling)}
        client = self._connect()
        if request.messages:
            stream = client.chat(request.messages, model=self.model, policy="local_only", tools=request.tools,
                                 tool_choice=request.tool_choice, **sampling)
        else:
            stream = client.generate(request.prompt, model=self.model, policy="local_only", **sampling)
        try:
            async for chunk in stream:
                if chunk.text or chunk.logprobs:
                    yield TextDelta(chunk.text, chunk.logprobs)
                for delta in chunk.tool_calls:
                    yield delta
                if chunk.finish_reason is not None:
                    t = chunk.timings
                    yield Completion(
                        finish_reason=_FINISH.get(chunk.finish_reason, FinishReason.STOP),
                        usage=Usage(chunk.prompt_tokens, chunk.completion_tokens),
                        timings=Timings(prompt_ms=t.get("prompt_ms", 0.0), decode_ms=t.get("decode_ms", 0.0)),
                    )
                    return
        except Cancelled:
            raise
        except LaasError as e:
            raise TargetFailed(f"{self.name}: {e.code.name}: {e}") from e
        except grpc.RpcError as e:  # pragma: no cover - the client maps these already
            raise TargetFailed(f"{self.name}: {e}") from e
        finally:
            await stream.aclose()
        raise TargetFailed(f"{self.name}: the stream ended before a finish reason")

    async def embed(self, model: str, request: EmbeddingRequest) -> EmbeddingResult:
        """The peer's Embed with its model `model`, local-only (a peer never forwards it)."""
        try:
            out = await self._connect().embed(list(request.inputs), model=model, dimensions=request.dimensions,
                                              normalize=request.normalize, truncate=request.truncate,
                                              policy="local_only")
        except Cancelled:
            raise
        except LaasError as e:
            raise TargetFailed(f"{self.name}: {e.code.name}: {e}") from e
        return EmbeddingResult(tuple(Embedding(tuple(v), t, c)
                                     for v, t, c in zip(out.vectors, out.tokens, out.truncated, strict=True)))

    def _connect(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(self._target, tls=self._tls, token=self._token)
        return self._client

    async def check_health(self) -> None:
        if await self._connect().health() != "SERVING":
            raise TargetFailed(f"{self.name} is not serving")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
