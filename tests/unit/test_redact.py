"""Redaction before the cloud and restoration in the streamed answer (router/laas/router/redact.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from laas.core.types import (
    Completion,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    Timings,
    Usage,
)
from laas.router.latency import CircuitBreaker, RemoteEstimator
from laas.router.policy import TargetKind
from laas.router.redact import Mapping, Redaction, Redactor, Restorer
from laas.router.remote import RemoteTarget
from laas.router.targets import Admitted, RoutedRequest


@pytest.mark.parametrize(("text", "kind"), [
    ("write to jane.doe+news@mail.example.co.uk today", "EMAIL"),
    ("card 4111-1111-1111-1111 expires", "CARD"),
    ("card 5555 5555 5555 4444 1 time", "CARD"),  # a neighbouring number is not part of the card
    ("amex 378282246310005.", "CARD"),
    ("host 192.168.1.20 is down", "IP"),
    ("v6 2001:db8::8a2e:370:7334 and", "IPV6"),
    ("loopback ::1 too", "IPV6"),
    ("call +1 (555) 123-4567 now", "PHONE"),
    ("or 020 7946 0958 at home", "PHONE"),
    ("mobile +33 6 12 34 56 78", "PHONE"),
    # Issue 13 item 14: separators and addresses that passed before
    ("card 4111.1111.1111.1111 ok", "CARD"),
    ("card 4111_1111_1111_1111.", "CARD"),
    ("card 4111/1111/1111/1111", "CARD"),
    ("card 5555  5555  5555  4444 x", "CARD"),
    ("amex 3782.822463.10005 due", "CARD"),
    ("mail jürgen.müller@bücher.de today", "EMAIL"),
    ("用户@例子.广告", "EMAIL"),
    ("用户@例子。广告", "EMAIL"),
    ("punycode jane@xn--mller-kva.de", "EMAIL"),
    ("write to root@localhost now", "EMAIL"),
])
def test_each_kind_is_found(text: str, kind: str) -> None:
    mapping = Mapping()
    out = Redactor().redact(text, mapping)
    assert f"[{kind}_1]" in out and mapping.replaced == 1
    restorer = Restorer(mapping)
    assert restorer.feed(out) + restorer.flush() == text


@pytest.mark.parametrize("text", [
    "version 1.2.3 on 2024-01-15 at 10:30", "order 12345", "card 4111 1111 1111 1112 (bad Luhn)",
    "ratio 3:4:5", "999.1.1.1 is not an address", "no data here", "pi 3.14159265358979 ok",
    "card 4111.1111.1111.1112 (bad Luhn)", "order 2024/01/15", "x = A@B", "npm lodash@4.17.21",
])
def test_ordinary_text_is_left_alone(text: str) -> None:
    mapping = Mapping()
    assert Redactor().redact(text, mapping) == text and mapping.replaced == 0


def test_same_value_same_placeholder_across_texts_and_operator_patterns() -> None:
    mapping = Mapping()
    redactor = Redactor([r"EMP-\d{5}"])
    first = redactor.redact("a@b.io, c@d.io, a@b.io, EMP-12345", mapping)
    second = redactor.redact("again a@b.io", mapping)
    assert first == "[EMAIL_1], [EMAIL_2], [EMAIL_1], [CUSTOM_1]" and second == "again [EMAIL_1]"
    assert mapping.replaced == 5


def test_a_placeholder_split_across_deltas_is_restored_whole() -> None:
    mapping = Mapping()
    Redactor().redact("x@y.com", mapping)
    restorer = Restorer(mapping)
    out = [restorer.feed(d) for d in ["Mail [", "EMA", "IL_", "1", "] ok [", "x] [EMAIL_"]]
    assert out == ["Mail ", "", "", "", "x@y.com ok ", "[x] "]
    assert restorer.flush() == "[EMAIL_"  # never completed: given back as written


def test_an_ipv6_placeholder_split_across_deltas_is_restored() -> None:
    mapping = Mapping()
    assert Redactor().redact("v6 2001:db8::1", mapping) == "v6 [IPV6_1]"
    restorer = Restorer(mapping)
    out = [restorer.feed(d) for d in ["at [IPV", "6", "_1] ok"]]
    assert out == ["at ", "", "2001:db8::1 ok"] and restorer.flush() == ""


values = st.sampled_from(["ann@ex.com", "bob@corp.example", "10.0.0.1", "+49 30 1234 5678", "5555 5555 5555 4444",
                          "2001:db8::8a2e:370:7334", "jürgen@bücher.de", "4111.1111.1111.1111"])
fillers = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="@"), max_size=12)


@given(st.lists(st.tuples(fillers, values), min_size=1, max_size=6), st.lists(st.integers(1, 7), min_size=1))
def test_any_split_of_the_answer_restores_the_values(parts: list[tuple[str, str]], cuts: list[int]) -> None:
    text = "".join(f"{filler}; {value}; " for filler, value in parts)  # values apart from neighbouring digits
    mapping = Mapping()
    redacted = Redactor().redact(text, mapping)
    for _, value in parts:
        assert value not in redacted
    restorer = Restorer(mapping)
    pieces, i, k = [], 0, 0
    while i < len(redacted):  # the cloud's answer, cut into deltas of varying size
        step = cuts[k % len(cuts)]
        pieces.append(restorer.feed(redacted[i:i + step]))
        i, k = i + step, k + 1
    assert "".join(pieces) + restorer.flush() == text


class _Capture:
    """A remote endpoint that records the request it was sent and answers with the first stop string."""

    context_length = 4096

    def __init__(self) -> None:
        self.sent: GenerationRequest | None = None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.sent = request
        yield TextDelta(f"Mail {request.sampling.stop[0]}")
        yield Completion(FinishReason.STOP, Usage(1, 2), Timings())

    async def check_health(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_stop_strings_are_redacted_with_the_prompts_placeholders() -> None:
    engine = _Capture()
    target = RemoteTarget("cloud", TargetKind.CLOUD, engine, RemoteEstimator(), CircuitBreaker(), time.monotonic,
                          redactor=Redactor())
    request = RoutedRequest(SamplingParams(max_tokens=4, stop=("ann@ex.com", "10.0.0.1:", "END")),
                            prompt="Write to ann@ex.com")
    items = [c async for c in target.stream(Admitted(request, 4, 16))]
    assert engine.sent is not None
    assert engine.sent.prompt == "Write to [EMAIL_1]"
    assert engine.sent.sampling.stop == ("[EMAIL_1]", "[IP_1]:", "END")  # the cloud stops where it writes one
    assert "ann@ex.com" not in repr(engine.sent) and "10.0.0.1" not in repr(engine.sent)
    assert items[0] == Redaction(3)
    assert "".join(c.text for c in items if isinstance(c, TextDelta)) == "Mail ann@ex.com"  # restored
