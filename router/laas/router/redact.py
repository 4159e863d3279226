"""Redaction of personal data before a request leaves the device, and its restoration in the answer.

Layer: domain (pure). Before a request goes to a cloud endpoint (and to LAN peers when the operator
asks), `Redactor.redact` replaces e-mail addresses, payment card numbers (Luhn-checked), IPv4 and
IPv6 addresses, phone numbers and the operator's own patterns with placeholders such as
`[EMAIL_1]`. The same value gets the same placeholder everywhere in the request (prompt, every chat
message), so the remote model can refer to it consistently. `Restorer` puts the values back into the
streamed answer; a placeholder may arrive split across deltas (`[EMA`, `IL_1]`), so text that could
still become a placeholder is held back until it cannot.

Why regular expressions and not a library: Microsoft Presidio needs spaCy language models that cannot
be fetched on the devices laas targets (offline, small), and commonregex was last released in 2014.
These patterns are few, anchored and tested (tests/unit/test_redact.py); they favour catching
structured identifiers over names, which no offline pattern finds reliably.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Unicode local parts and domains (IDN, also with ideographic full stops), punycode TLDs, and the one
# single-label host people write addresses for (`root@localhost`); `a@b` alone is code (Python's matmul).
_DOT = "[.\u3002\uff0e\uff61]"
_EMAIL = re.compile(rf"(?<![\w.+%-])[\w.%+-]+@(?:[\w-]+(?:{_DOT}[\w-]+)*{_DOT}(?:[^\W\d_]{{2,}}|xn--[\w-]+)"
                    r"|(?i:localhost))(?![\w-])")
# A card: 13-19 digits, bare or with single spaces/hyphens anywhere, or in groups of 3-6 digits with one
# separator repeated (`.`, `_`, `/`, `-`, 1-3 spaces or a tab): `4111.1111.1111.1111`, `5555  5555  5555  4444`.
# Grouping (and Luhn) keeps decimals such as 3.14159265358979 out.
_CARD = re.compile(r"(?<![\w-])(?<!\d[._/])(?:\d(?:[ -]?\d){12,18}"
                   r"|\d{3,6}(?P<sep>[._/\t-]| {1,3})\d{3,6}(?:(?P=sep)\d{1,6}){1,4})(?![\w-])(?![._/]\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.])")
# A phone number is a whole run of digits: never the middle of a longer one (a card that failed Luhn).
_PHONE = re.compile(r"(?:(?<![\w+])\+\d{1,3}[ .-]?|(?<![\w+])(?<!\d[ .-]))(?:\(\d{1,4}\)[ .-]?)?"
                    r"\d(?:[ .-]?\d){6,13}(?!\w|[ .-]\d)")
# What may be the start of a placeholder: `[`, `[IPV`, `[IPV6_`, `[CARD_1`... (kinds may hold digits: IPV6).
_PLACEHOLDER_PREFIX = re.compile(r"\[(?:[A-Z][A-Z0-9]*)?(?:_\d*)?\]?$")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(value: str) -> bool:
    digits = re.sub(r"\D", "", value)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _card_span(value: str) -> tuple[int, int] | None:
    """The longest run of whole digit groups inside `value` that is a card number (digits around it may be
    a neighbouring number: "card 5555 5555 5555 4444 1 time")."""
    seps = list(re.finditer(r"[ ._/\t-]+", value))
    starts = [0, *(m.end() for m in seps)]
    ends = [*(m.start() for m in seps), len(value)]
    spans = sorted(((a, b) for a in starts for b in ends if b > a), key=lambda ab: ab[0] - ab[1])
    return next(((a, b) for a, b in spans if _is_card(value[a:b])), None)


def _is_ipv6(value: str) -> bool:
    try:
        ipaddress.IPv6Address(value.split("%")[0])
    except ValueError:
        return False
    return True


def _is_phone(value: str) -> bool:
    digits = re.sub(r"\D", "", value)
    return 9 <= len(digits) <= 15 or (value.startswith("+") and 7 <= len(digits) <= 15)


@dataclass(frozen=True, slots=True)
class Redaction:
    """Announces, in a target's stream, how many items were replaced before the request left."""

    count: int


@dataclass
class Mapping:
    """Placeholder <-> value for one request; the same value always gets the same placeholder."""

    by_value: dict[str, str] = field(default_factory=dict)
    by_placeholder: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    replaced: int = 0

    def placeholder(self, kind: str, value: str) -> str:
        self.replaced += 1
        if value not in self.by_value:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            name = f"[{kind}_{self.counts[kind]}]"
            self.by_value[value], self.by_placeholder[name] = name, value
        return self.by_value[value]


class Redactor:
    def __init__(self, patterns: Iterable[str] = ()) -> None:
        rules: list[tuple[str, re.Pattern[str], Callable[[str], bool]]] = [
            ("CUSTOM", re.compile(p), lambda _v: True) for p in patterns]
        rules += [("EMAIL", _EMAIL, lambda _v: True), ("CARD", _CARD, _is_card), ("IPV6", _IPV6, _is_ipv6),
                  ("IP", _IPV4, lambda _v: True), ("PHONE", _PHONE, _is_phone)]
        self._rules = rules

    def redact(self, text: str, mapping: Mapping) -> str:
        for kind, pattern, valid in self._rules:
            def sub(m: re.Match[str], kind: str = kind, valid: Callable[[str], bool] = valid) -> str:
                value = m.group(0)
                if kind == "CARD" and (span := _card_span(value)) is not None:
                    a, b = span
                    return value[:a] + mapping.placeholder(kind, value[a:b]) + value[b:]
                if not value or not valid(value) or value in mapping.by_placeholder:
                    return value
                return mapping.placeholder(kind, value)

            text = pattern.sub(sub, text)
        return text


class Restorer:
    """Puts the values back into streamed text, holding back what may be the start of a placeholder."""

    def __init__(self, mapping: Mapping) -> None:
        self._mapping = mapping
        self._held = ""
        self._pattern = re.compile("|".join(re.escape(p) for p in mapping.by_placeholder)) \
            if mapping.by_placeholder else None

    def _restore(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: self._mapping.by_placeholder[m.group(0)], text)

    def feed(self, delta: str) -> str:
        if self._pattern is None:
            return delta
        text = self._held + delta
        cut = text.rfind("[")
        if cut >= 0 and _PLACEHOLDER_PREFIX.match(text, cut) and not text.endswith("]") and \
                any(p.startswith(text[cut:]) for p in self._mapping.by_placeholder):
            self._held, text = text[cut:], text[:cut]
        else:
            self._held = ""
        return self._restore(text)

    def flush(self) -> str:
        text, self._held = self._held, ""
        return self._restore(text)
