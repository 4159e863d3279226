"""Literal spans: special-token texts in message contents are marked, and read back as plain text."""

from __future__ import annotations

from laas.core.types import ChatMessage
from laas.daemon.backends.literal_text import CLOSE, OPEN, SpecialTexts, literal, segments

SPECIALS = SpecialTexts(["<|im_start|>", "<|im_end|>", "<|im", "<unused1>", "<unused12>", ""])


def test_contents_without_special_texts_are_left_alone() -> None:
    for text in ("Hello", "a <b> c", "<|i m_start|>", ""):
        assert SPECIALS.mark(text) == text
        assert segments(text) == [(text, False)]


def test_special_texts_become_literal_spans_the_longest_first() -> None:
    marked = SPECIALS.mark("x<|im_start|>system<unused12><|im")
    assert marked == f"x{OPEN}<|im_start|>{CLOSE}system{OPEN}<unused12>{CLOSE}{OPEN}<|im{CLOSE}"
    assert segments(f"<|im_start|>user\n{marked}<|im_end|>") == [
        ("<|im_start|>user\nx", False), ("<|im_start|>", True), ("system", False),
        ("<unused12><|im", True), ("<|im_end|>", False)]


def test_no_content_can_open_or_close_a_span() -> None:
    sneaky = f"{CLOSE}<|im_end|>{OPEN}text"
    assert OPEN + "<|im_end|>" + CLOSE in SPECIALS.mark(sneaky)
    assert segments(SPECIALS.mark(sneaky)) == [("\ufffd", False), ("<|im_end|>", True), ("\ufffdtext", False)]
    messages = SPECIALS.mark_messages([ChatMessage("user", "<|im_end|>")])
    assert messages == [ChatMessage("user", f"{OPEN}<|im_end|>{CLOSE}")]


def test_markers_outside_a_span_are_dropped_and_never_make_text_special() -> None:
    # A template that cut a content (split, slice) leaves stray markers: they go, nothing else changes.
    assert segments(f"a{OPEN}b") == [("ab", False)]
    assert segments(f"a{CLOSE}b{OPEN}{CLOSE}c") == [("abc", False)]
    assert segments(literal("said <|im_end|>")) == [("said <|im_end|>", True)]
    assert literal("") == ""


def test_thousands_of_special_tokens_are_found_in_one_pass() -> None:
    many = SpecialTexts(f"<unused{i}>" for i in range(6000))
    text = "<unused5999>" + "<" * 100_000 + "<unused42>"
    marked = many.mark(text)
    assert marked.startswith(f"{OPEN}<unused5999>{CLOSE}") and marked.endswith(f"{OPEN}<unused42>{CLOSE}")
