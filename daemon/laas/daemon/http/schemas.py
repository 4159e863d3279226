"""The OpenAI-compatible API's request and response bodies, as pydantic models.

Layer: edge (HTTP). The fields OpenAI defines for /v1/chat/completions and /v1/completions, and laas'
own as extra body fields (`top_k`, `min_p`, `repeat_penalty`, `ignore_eos`, `routing_policy`,
`latency_budget_ms`, `keep_alive`: with the openai SDK, `extra_body={...}`). The models only say what
shape a body has; the values are checked by the application layer (validation.py), once for every
edge, and convert.py says which OpenAI features laas does not serve (a clear 400 naming the param,
never silently ignored). An unknown field is refused too (OpenAI: "Unrecognized request argument").

The structured-output and tool fields (response_format, tools, tool_choice) are typed loosely here
(JSON objects): convert.py reads them and names the param at fault when one is not of OpenAI's shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Json = dict[str, Any]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = Field(default=False, description="Send a last chunk with the usage (and no choices).")
    include_obfuscation: bool | None = Field(default=None, description="Accepted; laas sends no obfuscation.")


class LaasExtras(_Body):
    """laas' own sampling and routing fields, beside OpenAI's."""

    top_k: int | None = Field(default=None, description="Sample from the k most likely tokens (0: all).")
    min_p: float | None = Field(default=None, description="Drop tokens below min_p x the top token's probability.")
    repeat_penalty: float | None = Field(default=None, description="llama.cpp's repetition penalty (1: none).")
    ignore_eos: bool = Field(default=False, description="Decode past the end-of-sequence token.")
    routing_policy: Literal["auto", "prefer_local", "local_only", "cloud_only"] = Field(
        default="auto", description="Where the request may run (see the README's Routing section).")
    latency_budget_ms: float | None = Field(default=None, description="The router's deadline for the request.")
    keep_alive: float | None = Field(default=None, description=(
        "Seconds the model stays loaded after this request (< 0: keep it loaded; 0: unload when idle)."))


class _Sampling(LaasExtras):
    """What chat and text completions share."""

    model: str = Field(default="", description="The model; empty: the daemon's default model.")
    stream: bool = Field(default=False, description="Stream server-sent events, ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, description="Tokens to generate at most.")
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = Field(default=None, description="Up to 16 strings that end the answer.")
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int | None = Field(default=None, description="Choices to generate: only 1.")
    logprobs: bool | int | None = Field(default=None, description=(
        "Chat: true for each token's log-probability; completions: the number of alternatives (0..20)."))
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported: 400 unless empty.")
    user: str | None = Field(default=None, description="The end user's id; accepted, not used.")
    service_tier: str | None = Field(default=None, description="Accepted: auto or default.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # image_url, input_audio, file: refused by type in convert.py

    type: str
    text: str | None = None


class EmbeddingsRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]] = Field(description="Texts (or token ids) to embed.")
    model: str = Field(default="", description="An embedding model; empty: the default model.")
    encoding_format: Literal["float", "base64"] = Field(default="float", description=(
        "float: lists of numbers; base64: little-endian float32 bytes, base64-encoded."))
    dimensions: int | None = Field(default=None, description="Cut to this size (Matryoshka models only).")
    user: str | None = Field(default=None, description="The end user's id; accepted, not used.")
    normalize: bool | None = Field(default=None, description="laas: unit length (default true).")
    truncate: bool = Field(default=False, description="laas: cut an input longer than the model's window.")
    routing_policy: Literal["auto", "prefer_local", "local_only", "cloud_only"] = "auto"
    keep_alive: float | None = None


class ChatMessageIn(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, description="The speaker's (or a tool turn's function's) name.")
    tool_calls: list[Json] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(description="The conversation: system/developer, user, assistant turns.")
    max_completion_tokens: int | None = Field(default=None, description="max_tokens' newer name.")
    top_logprobs: int | None = Field(default=None, description="Alternatives per token (0..20), with logprobs.")
    response_format: Json | None = Field(default=None, description=(
        "text, json_object or json_schema ({name, schema, strict}): the output takes that shape "
        "(constrained decoding)."))
    tools: list[Json] | None = Field(default=None, description="Functions the model may call.")
    tool_choice: str | Json | None = Field(default=None, description=(
        "none, auto, required or {type: function, function: {name}}."))
    parallel_tool_calls: bool | None = None
    functions: list[Json] | None = None
    function_call: str | Json | None = None
    modalities: list[str] | None = None
    audio: Json | None = None
    prediction: Json | None = None
    web_search_options: Json | None = None
    reasoning_effort: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="The text to continue.")
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


# -- responses --------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class RouteOut(BaseModel):
    """Where the answer (from this chunk on) comes from, and why: laas' extra field."""

    target: str
    kind: str
    reason: str
    predicted_ms: float
    failover: bool
    local_only: bool
    redacted: int


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "laas"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
