"""The domain types of laas: requests, chunks of a stream, what a model is.

Layer: core (imports no other slice of laas). Engines, the router, the application layer and every
edge speak these frozen types; protobuf and HTTP JSON exist only at the edges.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ModelFormat(enum.Enum):
    GGUF = "gguf"
    ONNX = "onnx"
    REMOTE = "remote"  # served elsewhere (a cloud endpoint, a LAN peer)


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling and stopping; None means "the engine's default" (llama.cpp's defaults)."""

    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A prompt ready for an engine: chat requests arrive here already rendered by the template."""

    prompt: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # The token ids of `prompt`, when the caller already counted them (admission does).
    prompt_tokens: tuple[int, ...] | None = None
    # Extra stop strings the chat template implies (e.g. "<|im_end|>").
    template_stops: tuple[str, ...] = ()
    # Tokenize with the model's beginning-of-sequence token (False when a chat template wrote it).
    add_special: bool = True
    # The chat messages the prompt was rendered from, for targets that apply their own template.
    messages: tuple[ChatMessage, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens found in the model's cache (a shared prefix): not evaluated again.
    cached_prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Timings:
    queue_ms: float = 0.0
    load_ms: float = 0.0  # loading the model first (it was not loaded when the request got its turn)
    prompt_ms: float = 0.0
    decode_ms: float = 0.0
    time_to_first_token_ms: float = 0.0

    @staticmethod
    def rate(tokens: int, ms: float) -> float:
        return tokens * 1000.0 / ms if ms > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Completion:
    """How a generation ended: the last item of every stream."""

    finish_reason: FinishReason
    usage: Usage
    timings: Timings


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


GenerationChunk = TextDelta | Completion


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What an engine knows of its model, from the file's own metadata."""

    format: ModelFormat
    quantization: str
    context_length: int
    trained_context_length: int
    size_bytes: int
    architecture: str
    chat_template: str | None = None
    # An embedding model's vector size (0: a generative model, which cannot embed), and the smaller sizes it
    # was trained to be cut to (Matryoshka); only those may be asked for as EmbeddingRequest.dimensions.
    embedding_dimensions: int = 0
    matryoshka_dimensions: tuple[int, ...] = ()


# One input of an Embed call: a text, or token ids as the model's tokenizer gives them (special tokens
# included, as Tokenize with add_special returns them).
EmbeddingInput = str | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """Inputs to embed with one model, batched through it in one call."""

    inputs: tuple[EmbeddingInput, ...]
    normalize: bool = True  # unit length (cosine similarity is then a dot product)
    truncate: bool = False  # cut an input longer than the model's window, instead of refusing it
    dimensions: int | None = None  # cut to this size and renormalize (Matryoshka models only); None: all


@dataclass(frozen=True, slots=True)
class Embedding:
    vector: tuple[float, ...]
    tokens: int  # the tokens the model read (after truncation)
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    embeddings: tuple[Embedding, ...]  # in the order of the inputs

    @property
    def tokens(self) -> int:
        return sum(e.tokens for e in self.embeddings)
