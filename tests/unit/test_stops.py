"""StopMatcher: stop strings found across deltas, partial prefixes held back and released, flush."""

from __future__ import annotations

import random

import pytest

from laas.daemon.stops import StopMatcher


def run(stops: tuple[str, ...], deltas: list[str]) -> tuple[list[str], str, bool]:
    m = StopMatcher(stops)
    outs = [m.feed(d) for d in deltas]
    return outs, m.flush(), m.stopped


def reference(stops: tuple[str, ...], text: str) -> str:
    """What the whole stream should emit: everything before the earliest stop string."""
    hits = [text.find(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else text


def test_no_stops_passes_text_straight_through() -> None:
    m = StopMatcher(())
    assert m.feed("hello ") == "hello "
    assert m.feed("<|im") == "<|im"
    assert m.pending == ""
    assert m.flush() == ""
    assert not m.stopped


def test_empty_stop_strings_are_ignored() -> None:
    m = StopMatcher(("", ""))
    assert m.stops == ()
    assert m.feed("abc") == "abc"
    assert not m.stopped


def test_stop_inside_one_delta_cuts_and_stops() -> None:
    m = StopMatcher(("<|im_end|>",))
    assert m.feed("Hello<|im_end|>ignored") == "Hello"
    assert m.stopped
    assert m.feed("more") == ""
    assert m.flush() == ""


def test_stop_at_start_of_stream_emits_nothing() -> None:
    outs, tail, stopped = run(("STOP",), ["STOP then text"])
    assert outs == [""]
    assert tail == ""
    assert stopped


def test_stop_split_across_deltas() -> None:
    m = StopMatcher(("<|im_end|>",))
    assert m.feed("Hi there<|im") == "Hi there"
    assert m.pending == "<|im"
    assert not m.stopped
    assert m.feed("_end|>tail") == ""
    assert m.stopped
    assert m.flush() == ""


def test_stop_split_into_single_characters() -> None:
    stop = "</s>"
    m = StopMatcher((stop,))
    emitted = m.feed("ok")
    for ch in stop:
        emitted += m.feed(ch)
    assert emitted == "ok"
    assert m.stopped


def test_partial_prefix_released_when_it_does_not_complete() -> None:
    m = StopMatcher(("<|im_end|>",))
    assert m.feed("a <|im") == "a "
    # the held-back "<|im" turns out not to be the stop string
    assert m.feed("age") == "<|image"
    assert m.pending == ""
    assert not m.stopped


def test_partial_prefix_released_partly_when_a_shorter_prefix_remains() -> None:
    m = StopMatcher(("abc",))
    assert m.feed("xab") == "x"
    # "ab" + "a" -> "aba": only the trailing "a" can still start "abc"
    assert m.feed("a") == "ab"
    assert m.pending == "a"
    assert m.feed("bc") == ""
    assert m.stopped


def test_held_back_text_is_released_by_flush() -> None:
    m = StopMatcher(("<|im_end|>",))
    assert m.feed("end of text <|im_") == "end of text "
    assert m.flush() == "<|im_"
    assert m.flush() == ""  # flush empties the buffer
    assert not m.stopped


def test_full_stop_string_is_not_held_as_a_prefix() -> None:
    # a proper prefix only: the whole stop string is a match, never "held back"
    m = StopMatcher(("ab",))
    assert m.feed("xa") == "x"
    assert m.pending == "a"


def test_multiple_stops_each_detected() -> None:
    stops = ("\n\n", "User:", "<|im_end|>")
    for stop in stops:
        outs, tail, stopped = run(stops, ["answer", stop, "rest"])
        assert "".join(outs) + tail == "answer"
        assert stopped


def test_earliest_match_wins_not_first_listed() -> None:
    m = StopMatcher(("LATE", "EARLY"))
    assert m.feed("one EARLY two LATE three") == "one "
    assert m.stopped


def test_earliest_match_wins_when_later_stop_is_also_complete_in_pending() -> None:
    m = StopMatcher(("bcd", "ab"))
    # pending "xa" is held, then "bcd" completes both "ab" (at 1) and "bcd" (at 2)
    assert m.feed("xa") == "x"
    assert m.feed("bcd") == ""
    assert m.stopped


def test_longest_partial_prefix_over_several_stops_is_held() -> None:
    m = StopMatcher(("xyz", "hello world"))
    assert m.feed("say hello wor") == "say "
    assert m.pending == "hello wor"
    assert m.feed("ld!") == ""
    assert m.stopped


def test_after_stop_everything_is_dropped() -> None:
    m = StopMatcher(("#",))
    assert m.feed("a#b") == "a"
    assert m.feed("#") == ""
    assert m.feed("c") == ""
    assert m.flush() == ""


def test_unicode_stop_strings() -> None:
    outs, tail, stopped = run(("。終",), ["日本語", "。", "終わり"])
    assert "".join(outs) + tail == "日本語"
    assert stopped


@pytest.mark.parametrize("seed", range(40))
def test_random_splits_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab<|>"
    stops = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3)))
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
    deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    outs, tail, stopped = run(stops, deltas)
    expected = reference(stops, text)
    assert "".join(outs) + tail == expected
    assert stopped == any(s in text for s in stops)
    # emitted text is never more than the reference at any point (nothing past a stop leaks)
    emitted = ""
    for out in outs:
        emitted += out
        assert expected.startswith(emitted)
