"""Routing policy: pure decisions about where, and whether, a request can run.

Layer: domain (no I/O). For now the device is the only target, so the policy is admission: does the
request fit the model's context window? The latency-aware choice between device, LAN peers and cloud
builds on this (prompt tokens, max_tokens and the context window are its first inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

from laas.daemon.errors import OutOfRange


@dataclass(frozen=True, slots=True)
class Admission:
    """What the device will run: the token budget granted to the request."""

    prompt_tokens: int
    max_tokens: int


def admit(prompt_tokens: int, requested_max_tokens: int | None, context_length: int,
          default_max_tokens: int) -> Admission:
    """Grants a token budget that fits the context window, or raises OutOfRange.

    An explicit max_tokens must fit whole (prompt + max_tokens <= context); an unset one gets the
    default, shortened to the room left, so short replies to long prompts still work.
    """
    room = context_length - prompt_tokens
    if room < 1:
        raise OutOfRange(
            f"prompt is {prompt_tokens} tokens; the model's context window is {context_length} tokens",
            field="prompt",
        )
    if requested_max_tokens is None:
        return Admission(prompt_tokens, min(default_max_tokens, room))
    if requested_max_tokens > room:
        raise OutOfRange(
            f"prompt ({prompt_tokens} tokens) + sampling.max_tokens ({requested_max_tokens}) exceeds the "
            f"model's context window of {context_length} tokens",
            field="sampling.max_tokens",
        )
    return Admission(prompt_tokens, requested_max_tokens)
