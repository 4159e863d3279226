"""The Engine interface: one model on this device, whatever its file format.

Layer: core. Local backends (GGUF, ONNX) implement :class:`Engine`; they see only domain types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Sequence

from laas.core.types import ChatMessage, GenerationChunk, GenerationRequest, ModelInfo


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
    async def render_chat(self, messages: Sequence[ChatMessage]) -> GenerationRequest:
        """Applies the model's chat template; the result carries the stops the template implies."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Streams TextDelta items, then exactly one Completion."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raises a LaasError when the engine cannot serve."""

    @abstractmethod
    async def aclose(self) -> None: ...

    # Supervision: an engine that runs its model in a process of its own (a runner) says when that process
    # dies and how much memory it holds. An engine inside the daemon fails only by raising, and its memory
    # is the daemon's: these defaults say so.

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Has `callback(cause)` called, on the event loop, once the engine can no longer serve (its process
        died); in-process engines never call it."""
        return None

    def resident_bytes(self) -> int | None:
        """The memory the engine's own process holds now (its RSS); None when it runs inside the daemon."""
        return None
