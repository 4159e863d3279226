"""Incremental detokenization: token ids in, text deltas out, never half a character.

Layer: domain (pure; any tokenizer with `decode(ids, skip_special_tokens=...)`). Decoding one token at
a time breaks characters that span tokens (byte-level BPE) and drops word-leading spaces some decoders
strip at the start of a text, so each step decodes a short window that starts a few tokens back and
emits only what the window added; a window ending in U+FFFD waits for the rest of its character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_CONTEXT = 4  # tokens before the new ones that every window re-decodes


class Decodes(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decodes, context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids = list(context[-_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token: int) -> str:
        """The text `token` completes; "" while a character is still incomplete."""
        self._ids.append(token)
        before = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        after = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        # The next window starts at the tokens just emitted; older ids are no longer needed.
        del self._ids[:self._read]
        self._prefix, self._read = 0, len(self._ids)
        return after[len(before):]
