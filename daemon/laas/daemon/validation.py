"""Checks of request values, each failure an InvalidArgument that names the field.

Layer: domain (pure). The servicer hands over plain Python values (only the fields the client set);
this module decides what is acceptable and builds the domain objects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from laas.core.errors import InvalidArgument, RequestTooLarge
from laas.core.types import ChatMessage, SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_PROMPT_BYTES = 1 << 20
MAX_MESSAGES = 1024
MAX_MODEL_NAME = 256
CHAT_ROLES = ("system", "user", "assistant")


def _check(ok: bool, field: str, rule: str, value: Any, error: type[InvalidArgument] = InvalidArgument) -> None:
    if not ok:
        raise error(f"{field} {rule}; got {value!r}", field=field)


def _finite(field: str, value: float) -> None:
    _check(math.isfinite(value), field, "must be a finite number", value)


def sampling_from(fields: Mapping[str, Any], stop: Sequence[str], ignore_eos: bool) -> SamplingParams:
    """Builds SamplingParams from the fields a client set (names as in the API's SamplingParams)."""
    p = "sampling."
    values: dict[str, Any] = {}
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
    _check(size <= MAX_PROMPT_BYTES, field, f"must be at most {MAX_PROMPT_BYTES} bytes", f"{size} bytes",
           RequestTooLarge)
    return text


def model_name(name: str, field: str = "model") -> str:
    _check(len(name) <= MAX_MODEL_NAME, field, f"must be at most {MAX_MODEL_NAME} characters", name[:40])
    return name


def chat_messages(messages: Sequence[tuple[str, str]]) -> tuple[ChatMessage, ...]:
    _check(0 < len(messages) <= MAX_MESSAGES, "messages", f"must hold 1..{MAX_MESSAGES} messages", len(messages))
    total = 0
    out = []
    for i, (role, content) in enumerate(messages):
        _check(role in CHAT_ROLES, f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}", role)
        total += len(content.encode())
        out.append(ChatMessage(role=role, content=content))
    _check(total <= MAX_PROMPT_BYTES, "messages", f"must total at most {MAX_PROMPT_BYTES} bytes", total,
           RequestTooLarge)
    return tuple(out)


def keep_alive(value: float | None, field: str = "keep_alive_s") -> float | None:
    """A keep-alive in seconds: any finite number (< 0: keep loaded; 0: unload when idle); None: unset."""
    if value is not None:
        _finite(field, value)
    return value
