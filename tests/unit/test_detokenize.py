"""Incremental detokenization never emits half a character nor drops a space."""

from __future__ import annotations

from collections.abc import Sequence

from laas.daemon.backends.detokenize import IncrementalDetokenizer


class ByteTokenizer:
    """Token i is byte i; 256 is a special token; a decoder that drops a leading space, as SentencePiece's do."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if i < 256)
        text = data.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


def _stream(text: str, context: Sequence[int] = (), special_at: int = -1) -> list[str]:
    detok = IncrementalDetokenizer(ByteTokenizer(), context)
    ids = list(text.encode())
    if special_at >= 0:
        ids.insert(special_at, 256)
    return [detok.add(i) for i in ids]


def test_multibyte_characters_wait_for_their_last_byte() -> None:
    deltas = _stream("né 東京 🚀")
    assert "".join(deltas) == "né 東京 🚀"
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") == len("né 東京 🚀".encode()) - len("né 東京 🚀")


def test_word_leading_spaces_survive_a_decoder_that_strips_them() -> None:
    assert "".join(_stream(" world", context=list(b"Hello"))) == " world"
    assert "".join(_stream("a b  c", context=list(b"x"))) == "a b  c"


def test_special_tokens_produce_no_text() -> None:
    assert "".join(_stream("ab", special_at=1)) == "ab"


def test_a_character_cut_off_at_the_end_is_never_emitted() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    out = [detok.add(b) for b in "ok 🚀".encode()[:-1]]
    assert "".join(out) == "ok "
