"""The bounded server-sent events decoder (router/laas/router/sse.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from laas.router.sse import EventTooLarge, SseDecoder

STREAM = b': ping\r\n\r\ndata: {"a": 1}\r\n\r\nevent: x\nid: 7\ndata: one\ndata:two\n\ndata: [DONE]\r\r'


def test_events_comments_and_line_endings() -> None:
    decoder = SseDecoder()
    assert decoder.feed(STREAM) + decoder.close() == ['{"a": 1}', "one\ntwo", "[DONE]"]


@given(st.lists(st.integers(1, 9), min_size=1))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    decoder, events, i, k = SseDecoder(), [], 0, 0
    while i < len(STREAM):
        step = cuts[k % len(cuts)]
        events += decoder.feed(STREAM[i:i + step])
        i, k = i + step, k + 1
    assert events + decoder.close() == ['{"a": 1}', "one\ntwo", "[DONE]"]


def test_an_unterminated_last_event_is_given_at_the_end() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: tail") == []
    assert decoder.close() == ["tail"]


def test_a_line_without_end_is_refused_at_the_bound() -> None:
    decoder = SseDecoder(max_bytes=1000)
    decoder.feed(b"data: " + b"x" * 900)
    with pytest.raises(EventTooLarge, match="a line of more than 1000 bytes"):
        decoder.feed(b"x" * 200)


def test_an_event_of_many_lines_is_refused_at_the_bound() -> None:
    decoder = SseDecoder(max_bytes=1000)
    with pytest.raises(EventTooLarge, match="an event of more than 1000 bytes"):
        for _ in range(20):
            decoder.feed(b"data: " + b"y" * 99 + b"\n")


def test_comments_do_not_accumulate() -> None:
    decoder = SseDecoder(max_bytes=1000)
    for _ in range(100):
        assert decoder.feed(b": " + b"p" * 500 + b"\n\n") == []
