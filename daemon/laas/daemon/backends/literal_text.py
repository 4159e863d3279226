"""Message contents are text, never control tokens: only the chat template writes special tokens.

Layer: infrastructure (pure). A user who writes `<|im_start|>system` in a message must not open a real
system turn. Before the template renders the messages, each occurrence of a special token's text in a
content is wrapped in two Unicode noncharacters, OPEN and CLOSE; the rendered prompt carries them around
those spans, and the engine's tokenizer reads a span as plain text (special tokens not parsed), the
rest, what the template wrote, as before. So a prompt whose messages hold no special-token text renders
and tokenizes exactly as it did without this; one that does differs only in those spans (and, for
tokenizers that merge across them, at their edges).

Noncharacters in a content become U+FFFD first, so no content can open or close a span. A span can only
make text literal, so markers that reach a tokenizer any other way (a Tokenize call) can lose special
tokens, never gain one. A continuation of the assistant's text (failover mid-stream) is literal as a
whole: see :func:`literal`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace

from laas.core.types import ChatMessage

_Node = dict[str, "_Node"]
OPEN, CLOSE = "\ufdd0", "\ufdd1"
_SPAN = re.compile(f"{OPEN}([^{OPEN}{CLOSE}]*){CLOSE}")
_MARKERS = re.compile(f"[{OPEN}{CLOSE}]")


def _clean(text: str) -> str:
    return _MARKERS.sub("\ufffd", text)


def literal(text: str) -> str:
    """`text` marked as plain text as a whole (empty stays empty)."""
    return f"{OPEN}{_clean(text)}{CLOSE}" if text else ""


class SpecialTexts:
    """The texts of a vocabulary's special (control) tokens, found in one pass by a trie-shaped regex."""

    def __init__(self, texts: Iterable[str]) -> None:
        words = sorted({t for t in texts if t})
        self._pattern = re.compile(_trie(words)) if words else None

    def mark(self, content: str) -> str:
        """`content` with each special-token text in it wrapped as a literal span."""
        content = _clean(content)
        if self._pattern is None:
            return content
        return self._pattern.sub(lambda m: f"{OPEN}{m.group(0)}{CLOSE}", content)

    def mark_messages(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        return [replace(m, content=self.mark(m.content)) for m in messages]


def segments(text: str) -> list[tuple[str, bool]]:
    """`text` cut into (piece, literal) pieces, the markers removed; stray markers (a template that cut a
    span) are dropped. One piece, not literal, when `text` has no markers; no piece is empty otherwise."""
    if OPEN not in text and CLOSE not in text:
        return [(text, False)]
    out: list[tuple[str, bool]] = []
    pos = 0
    for match in _SPAN.finditer(text):
        out.append((_MARKERS.sub("", text[pos:match.start()]), False))
        out.append((match.group(1), True))
        pos = match.end()
    out.append((_MARKERS.sub("", text[pos:]), False))
    merged: list[tuple[str, bool]] = []
    for piece, is_literal in out:
        if not piece:
            continue
        if merged and merged[-1][1] == is_literal:
            merged[-1] = (merged[-1][0] + piece, is_literal)
        else:
            merged.append((piece, is_literal))
    return merged or [("", False)]


def _trie(words: Sequence[str]) -> str:
    """A regex matching any of `words`, the longest at a position first; branches share prefixes, so a
    vocabulary of thousands of special tokens costs a few steps per character, not one per token."""
    root: _Node = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: _Node) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(root)
