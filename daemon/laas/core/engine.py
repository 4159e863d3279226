"""The Engine interface: one model on this device, whatever its file format.

Layer: core. Local backends (GGUF, ONNX) implement :class:`Engine`; they see only domain types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence

from laas.core.errors import Unsupported
from laas.core.types import (
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    Tool,
)


class Engine(ABC):
    """One model on one target. Implementations run blocking native work off the event loop, and
    stop it within one decode step when the iterator returned by :meth:`generate` is closed."""

    #: Tokens generated over the engine's life; it stops growing when no stream is running.
    decoded_tokens: int = 0

    @property
    @abstractmethod
    def info(self) -> ModelInfo: ...

    @abstractmethod
    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]: ...

    @abstractmethod
    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        """Applies the model's chat template (with the functions the model may call); the result carries
        the stops the template implies."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Streams TextDelta items, then exactly one Completion. A request's sampling.constraint limits
        every token to what it allows (InvalidArgument before anything runs when it cannot compile);
        sampling.logprobs adds each token's log-probability to the deltas."""

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """The inputs' vectors, in one padding-aware batch pass (embedding models; `info.embedding_dimensions`
        says whether this is one). Raises OutOfRange naming `inputs[i]` for an input longer than the window
        unless `request.truncate`; InvalidArgument for an invalid token id."""
        raise Unsupported(f"{self.info.architecture} model cannot embed: it is a generative model; "
                          "use an embedding model (ListModels: embedding_dimensions > 0)", field="model")

    @abstractmethod
    async def check_health(self) -> None:
        """Raises a LaasError when the engine cannot serve."""

    @abstractmethod
    async def aclose(self) -> None: ...
