"""Checks of request values, each failure an InvalidArgument that names the field.

Layer: domain (pure). The servicer hands over plain Python values (only the fields the client set);
this module decides what is acceptable and builds the domain objects.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from laas.core.errors import InvalidArgument
from laas.core.types import (
    ChatMessage,
    EmbeddingInput,
    EmbeddingRequest,
    SamplingParams,
    Tool,
    ToolChoice,
    ToolChoiceMode,
)

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_PROMPT_BYTES = 1 << 20
MAX_MESSAGES = 1024
MAX_MODEL_NAME = 256
MAX_EMBED_INPUTS = 2048  # per Embed call (OpenAI's /v1/embeddings limit too)
MAX_EMBED_TOKEN_IDS = 1 << 16  # per input given as token ids
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        raise InvalidArgument(f"{field} {rule}; got {value!r}", field=field)


def _finite(field: str, value: float) -> None:
    _check(math.isfinite(value), field, "must be a finite number", value)


def sampling_from(fields: Mapping[str, Any], stop: Sequence[str], ignore_eos: bool,
                  logprobs: bool = False) -> SamplingParams:
    """Builds SamplingParams from the fields a client set (names as in the API's SamplingParams)."""
    p = "sampling."
    values: dict[str, Any] = {"logprobs": logprobs}
    if "top_logprobs" in fields:
        top = fields["top_logprobs"]
        _check(0 <= top <= MAX_TOP_LOGPROBS, p + "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]", top)
        _check(logprobs or top == 0, p + "top_logprobs", "needs sampling.logprobs", top)
        values["top_logprobs"] = int(top)
    if "max_tokens" in fields:
        _check(fields["max_tokens"] >= 1, p + "max_tokens", "must be >= 1", fields["max_tokens"])
        values["max_tokens"] = int(fields["max_tokens"])
    for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
        if name in fields:
            _finite(p + name, fields[name])
            values[name] = float(fields[name])
    if "temperature" in values:
        _check(values["temperature"] >= 0, p + "temperature", "must be >= 0", values["temperature"])
    if "top_p" in values:
        _check(0 < values["top_p"] <= 1, p + "top_p", "must be in (0, 1]", values["top_p"])
    if "min_p" in values:
        _check(0 <= values["min_p"] <= 1, p + "min_p", "must be in [0, 1]", values["min_p"])
    if "repeat_penalty" in values:
        _check(values["repeat_penalty"] > 0, p + "repeat_penalty", "must be > 0", values["repeat_penalty"])
    for name in ("presence_penalty", "frequency_penalty"):
        if name in values:
            _check(-2 <= values[name] <= 2, p + name, "must be in [-2, 2]", values[name])
    if "top_k" in fields:
        _check(fields["top_k"] >= 0, p + "top_k", "must be >= 0", fields["top_k"])
        values["top_k"] = int(fields["top_k"])
    if "seed" in fields:
        values["seed"] = int(fields["seed"])
    _check(len(stop) <= MAX_STOP_STRINGS, p + "stop", f"may hold at most {MAX_STOP_STRINGS} strings", len(stop))
    for i, s in enumerate(stop):
        _check(0 < len(s.encode()) <= MAX_STOP_BYTES, f"{p}stop[{i}]", f"must be 1..{MAX_STOP_BYTES} bytes", s)
    return SamplingParams(stop=tuple(stop), ignore_eos=ignore_eos, **values)


def prompt(text: str, field: str = "prompt") -> str:
    size = len(text.encode())
    _check(size <= MAX_PROMPT_BYTES, field, f"must be at most {MAX_PROMPT_BYTES} bytes", f"{size} bytes")
    return text


def model_name(name: str, field: str = "model") -> str:
    _check(len(name) <= MAX_MODEL_NAME, field, f"must be at most {MAX_MODEL_NAME} characters", name[:40])
    return name


def chat_messages(messages: Sequence[tuple[str, str] | ChatMessage]) -> tuple[ChatMessage, ...]:
    _check(0 < len(messages) <= MAX_MESSAGES, "messages", f"must hold 1..{MAX_MESSAGES} messages", len(messages))
    total = 0
    out = []
    for i, given in enumerate(messages):
        m = given if isinstance(given, ChatMessage) else ChatMessage(role=given[0], content=given[1])
        _check(m.role in CHAT_ROLES, f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}", m.role)
        _check(not m.tool_calls or m.role == "assistant", f"messages[{i}].tool_calls", "are an assistant's",
               m.role)
        for j, call in enumerate(m.tool_calls):
            _json_object(f"messages[{i}].tool_calls[{j}].arguments", call.arguments)
            _check(bool(TOOL_NAME.fullmatch(call.name)), f"messages[{i}].tool_calls[{j}].name",
                   "must be 1..64 characters of A-Z a-z 0-9 _ -", call.name)
            total += len(call.arguments.encode())
        total += len(m.content.encode())
        out.append(m)
    _check(total <= MAX_PROMPT_BYTES, "messages", f"must total at most {MAX_PROMPT_BYTES} bytes", total)
    return tuple(out)


def keep_alive(value: float | None, field: str = "keep_alive_s") -> float | None:
    """A keep-alive in seconds: any finite number (< 0: keep loaded; 0: unload when idle); None: unset."""
    if value is not None:
        _finite(field, value)
    return value


def embedding_request(inputs: Sequence[EmbeddingInput], dimensions: int | None, normalize: bool | None,
                      truncate: bool) -> EmbeddingRequest:
    """An Embed call's inputs and options; the window and token ids are the model's to check (engine)."""
    _check(0 < len(inputs) <= MAX_EMBED_INPUTS, "inputs", f"must hold 1..{MAX_EMBED_INPUTS} inputs", len(inputs))
    out: list[EmbeddingInput] = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            size = len(item.encode())
            _check(0 < size <= MAX_PROMPT_BYTES, f"inputs[{i}].text", f"must be 1..{MAX_PROMPT_BYTES} bytes",
                   f"{size} bytes")
            out.append(item)
        else:
            _check(0 < len(item) <= MAX_EMBED_TOKEN_IDS, f"inputs[{i}].tokens",
                   f"must hold 1..{MAX_EMBED_TOKEN_IDS} token ids", f"{len(item)} ids")
            out.append(tuple(int(t) for t in item))
    if dimensions is not None:
        _check(dimensions >= 1, "dimensions", "must be >= 1", dimensions)
    return EmbeddingRequest(tuple(out), normalize=True if normalize is None else normalize, truncate=truncate,
                            dimensions=dimensions)


def _json_object(field: str, text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"{field} must be the text of a JSON object: {e}", field=field) from None
    _check(isinstance(value, dict), field, "must be a JSON object", text[:40])
    return value


def tools(given: Sequence[Tool], choice: ToolChoice, chat: bool) -> tuple[Tool, ...]:
    """The tools (names unique, parameters a JSON object; empty means none) and a choice that fits them."""
    _check(chat or not given, "tools", "are for Chat only", len(given))
    _check(len(given) <= MAX_TOOLS, "tools", f"may hold at most {MAX_TOOLS} tools", len(given))
    out, names = [], set()
    for i, tool in enumerate(given):
        _check(bool(TOOL_NAME.fullmatch(tool.name)), f"tools[{i}].name",
               "must be 1..64 characters of A-Z a-z 0-9 _ -", tool.name)
        _check(tool.name not in names, f"tools[{i}].name", "is given twice", tool.name)
        names.add(tool.name)
        parameters = tool.parameters.strip() or '{"type": "object", "properties": {}}'
        _json_object(f"tools[{i}].parameters", parameters)
        out.append(Tool(tool.name, tool.description, parameters))
    if choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION):
        _check(bool(given), "tool_choice", "needs tools", choice.mode.value)
    if choice.mode is ToolChoiceMode.FUNCTION:
        _check(choice.name in names, "tool_choice.function", "must name one of the tools", choice.name)
    return tuple(out)
