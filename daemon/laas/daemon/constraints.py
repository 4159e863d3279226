"""Constrained decoding with llguidance: a request's constraint (JSON schema, any JSON object, regex, Lark
or GBNF grammar) becomes, at every decode step, the set of tokens that keep the output inside it.

Layer: daemon (infrastructure over llguidance). Two steps, each with its own error handling; the second
lives with the engines (constraint_masks.py), so the daemon's front end never imports numpy:

- :func:`check` compiles a constraint against a byte-level vocabulary, so a constraint that does not
  compile (bad JSON, an unknown schema keyword, a grammar's syntax error) or whose language is empty
  (an impossible regex, an unsatisfiable schema) gets INVALID_ARGUMENT naming the field, before the
  request is routed or queued, whatever model it is for.
- constraint_masks.ConstraintCompiler (one per loaded model) compiles it against the model's own vocabulary
  (llguidance's tokenizer, built once from what llama.cpp loaded or from tokenizer.json) and caches the
  compiled matcher by constraint: each sequence gets a copy (deep_copy is cheap), so a second request
  with the same schema pays nothing for compilation. A Matcher masks one sequence's logits
  and follows the tokens it accepts; other sequences in the same batch are untouched.
"""

from __future__ import annotations

import threading
from typing import Any

from laas.core.errors import InvalidArgument
from laas.core.types import Constraint, ConstraintKind

MAX_CONSTRAINT_BYTES = 256 << 10

# JSON without free whitespace: what a model writes between tokens is then content, never an endless run of
# newlines (a schema may say otherwise in its own "x-guidance").
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_FORMAT = {ConstraintKind.JSON_SCHEMA: "json_schema", ConstraintKind.JSON_OBJECT: "json_schema",
           ConstraintKind.REGEX: "regex", ConstraintKind.LARK: "lark", ConstraintKind.GBNF: "gbnf"}


def field_of(constraint: Constraint, prefix: str = "constraint.") -> str:
    """The API field a constraint came from (constraint.json_schema, constraint.regex...)."""
    return prefix + constraint.kind.value


def grammar_of(constraint: Constraint, field: str) -> str:
    """The llguidance grammar of a constraint (not yet checked against a vocabulary)."""
    import llguidance

    text = '{"type": "object"}' if constraint.kind is ConstraintKind.JSON_OBJECT else constraint.text
    if len(text.encode()) > MAX_CONSTRAINT_BYTES:
        raise InvalidArgument(f"{field} must be at most {MAX_CONSTRAINT_BYTES} bytes", field=field)
    if not text.strip():
        raise InvalidArgument(f"{field} is empty", field=field)
    try:
        if constraint.kind in (ConstraintKind.JSON_SCHEMA, ConstraintKind.JSON_OBJECT):
            return str(llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS))  # type: ignore[arg-type]
        return str(llguidance.grammar_from(_FORMAT[constraint.kind], text))  # type: ignore[arg-type]
    except ValueError as e:
        raise InvalidArgument(f"{field} does not compile: {e}", field=field) from e


class _ByteVocabulary:
    """A vocabulary of the 256 bytes and an end token: enough to check a constraint without a model."""

    def __init__(self) -> None:
        self.eos_token_id = 256
        self.bos_token_id = None
        self.tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]
        self.special_token_ids = [256]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


_byte_tokenizer: Any = None
_byte_lock = threading.Lock()


def _bytes_tokenizer() -> Any:
    global _byte_tokenizer
    with _byte_lock:
        if _byte_tokenizer is None:
            import llguidance

            _byte_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()))
        return _byte_tokenizer


def compiled(tokenizer: Any, constraint: Constraint, field: str) -> Any:
    """A fresh matcher at the constraint's start; InvalidArgument if it fails or accepts nothing."""
    import llguidance

    matcher = llguidance.LLMatcher(tokenizer, grammar_of(constraint, field), log_level=0)
    if not matcher.is_error():
        matcher.compute_bitmask()  # the first step finds an empty language (no token, no end allowed)
    if matcher.is_error():
        raise InvalidArgument(f"{field} cannot be satisfied or does not compile: "
                              f"{matcher.get_error().splitlines()[0]}", field=field)
    return matcher


def check(constraint: Constraint, field: str | None = None) -> None:
    """Raises InvalidArgument (naming `field`, by default the constraint's own: constraint.json_schema...)
    unless the constraint compiles and admits some output. Blocking: milliseconds for usual schemas."""
    field = field or field_of(constraint)
    matcher = compiled(_bytes_tokenizer(), constraint, field)
    if constraint.prefix and not matcher.consume_tokens(list(constraint.prefix.encode())):
        raise InvalidArgument(f"{field}: the text already produced does not fit it", field=field)
