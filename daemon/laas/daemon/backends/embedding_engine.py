"""What every embedding engine (GGUF, ONNX) answers to Generate and Chat: a refusal naming the model.

Layer: infrastructure (engines). The engines subclass :class:`EmbeddingEngine` and say which name the
refusal gives (``_model_name``); they implement embedding, tokenizing and the rest of the Engine.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncGenerator, Sequence

from laas.core.engine import Engine
from laas.core.errors import Unsupported
from laas.core.types import ChatMessage, GenerationChunk, GenerationRequest, Tool


class EmbeddingEngine(Engine):
    @property
    @abstractmethod
    def _model_name(self) -> str:
        """The model's name in the refusal (its file or package name)."""

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        raise self._cannot_generate()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        raise self._cannot_generate()
        yield  # pragma: no cover - makes this an async generator

    def _cannot_generate(self) -> Unsupported:
        return Unsupported(f"model {self._model_name!r} is an embedding model: it serves Embed, "
                           "not Generate or Chat", field="model")
