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
    TOOL_CALLS = "tool_calls"  # the answer is one or more tool calls (ToolCallDelta items)


class ConstraintKind(enum.Enum):
    """What a constraint's `text` holds (OpenAI's JSON: response_format json_schema / json_object;
    regex and grammars are the extensions llama.cpp's server and vLLM offer)."""

    JSON_SCHEMA = "json_schema"  # a JSON schema (the text of a JSON object): the output validates against it
    JSON_OBJECT = "json_object"  # any JSON object; `text` is empty
    REGEX = "regex"  # the whole output matches the regular expression
    LARK = "lark"  # a Lark grammar (llguidance's dialect: `%json {...}` embeds a schema)
    GBNF = "gbnf"  # a llama.cpp GBNF grammar


@dataclass(frozen=True, slots=True)
class Constraint:
    """The shape the output must take: every token is chosen among those the constraint allows.

    `prefix` is output already produced under it (a failover's continuation): the continuation starts
    where that text left the constraint, so the whole answer still validates."""

    kind: ConstraintKind
    text: str = ""
    prefix: str = ""


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
    # Constrained decoding (OpenAI: response_format); None: free text.
    constraint: Constraint | None = None
    # Log-probabilities of each generated token (OpenAI: logprobs, top_logprobs): TextDelta.logprobs.
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token, 0..20 (logprobs must be set)


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call (OpenAI: tools[].function)."""

    name: str
    description: str = ""
    parameters: str = "{}"  # its arguments' JSON schema, as JSON text


class ToolChoiceMode(enum.Enum):
    AUTO = "auto"  # the model decides: a call found in its output is returned as a call
    NONE = "none"  # never a call: text only
    REQUIRED = "required"  # at least one call (enforced by a constraint)
    FUNCTION = "function"  # a call of the function ToolChoice.name (enforced by a constraint)


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    name: str = ""  # the function, when mode is FUNCTION


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the assistant made (in history: OpenAI's assistant message tool_calls[])."""

    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn. role is system, user, assistant or tool; an assistant turn may carry tool_calls, a tool
    turn answers the call `tool_call_id` (the function's `name`) with `content`."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""


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
    # The functions the model may call and how (chat only); the prompt already describes them.
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)


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
class TokenLogprob:
    """One generated token's log-probability after the request's sampling transforms (temperature,
    top_k, top_p, min_p, the constraint's mask; greedy decoding reports the model's own distribution)
    and, in `top`, the most likely alternatives at that step (OpenAI: logprobs.content[])."""

    token_id: int
    text: str  # the token's text (its bytes decoded, a partial character as U+FFFD)
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    # With SamplingParams.logprobs: the tokens this text came from (a token whose text is held back,
    # e.g. a possible stop string's start, travels with the next delta).
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call: the first delta of call `index` has its id and name, the following ones
    fragments of its JSON arguments (concatenated, they are the arguments' text)."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


GenerationChunk = TextDelta | ToolCallDelta | Completion


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
