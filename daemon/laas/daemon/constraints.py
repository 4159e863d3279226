"""Constrained decoding with llguidance: a request's constraint (JSON schema, any JSON object, regex, Lark
or GBNF grammar) becomes, at every decode step, the set of tokens that keep the output inside it.

Layer: daemon (infrastructure over llguidance). Two steps, each with its own error handling:

- :func:`check` compiles a constraint against a byte-level vocabulary, so a constraint that does not
  compile (bad JSON, an unknown schema keyword, a grammar's syntax error) or whose language is empty
  (an impossible regex, an unsatisfiable schema) gets INVALID_ARGUMENT naming the field, before the
  request is routed or queued, whatever model it is for.
- :class:`ConstraintCompiler` (one per loaded model) compiles it against the model's own vocabulary
  (llguidance's tokenizer, built once from what llama.cpp loaded or from tokenizer.json) and caches the
  compiled matcher by constraint: each sequence gets a copy (deep_copy is cheap), so a second request
  with the same schema pays nothing for compilation. A :class:`Matcher` masks one sequence's logits
  and follows the tokens it accepts; other sequences in the same batch are untouched.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from laas.core.errors import InvalidArgument
from laas.core.types import Constraint, ConstraintKind

CACHE_SIZE = 64  # compiled constraints kept per model
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


def _compiled(tokenizer: Any, constraint: Constraint, field: str) -> Any:
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
    matcher = _compiled(_bytes_tokenizer(), constraint, field)
    if constraint.prefix and not matcher.consume_tokens(list(constraint.prefix.encode())):
        raise InvalidArgument(f"{field}: the text already produced does not fit it", field=field)


class Matcher:
    """One sequence's constraint: masks its logits at each step and follows the tokens it takes."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab
        self._words = (n_vocab + 31) // 32

    def allowed(self) -> npt.NDArray[np.bool_]:
        """The tokens allowed next (the end-of-sequence token when the output may end here)."""
        mask = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(mask, bitorder="little")[: self._n_vocab]
        allowed: npt.NDArray[np.bool_] = bits.astype(np.bool_)
        return allowed

    def mask(self, logits: npt.NDArray[np.float32]) -> None:
        """Sets the logits of the tokens not allowed to -inf, in place (the first n_vocab entries)."""
        allowed = self.allowed()
        n = min(len(allowed), logits.shape[0])
        logits[:n][~allowed[:n]] = -np.inf
        if logits.shape[0] > n:
            logits[n:] = -np.inf

    def accept(self, token: int) -> bool:
        """Follows a sampled token; False when the constraint does not take it (then nothing more is)."""
        return bool(self._matcher.consume_token(token))

    @property
    def done(self) -> bool:
        """The output is complete: nothing may follow but the end of the sequence."""
        return bool(self._matcher.is_stopped())


class ConstraintCompiler:
    """Compiles constraints for one model's vocabulary; compiled ones are cached by constraint."""

    def __init__(self, make_tokenizer: Callable[[], Any], n_vocab: int,
                 tokenize: Callable[[str], Sequence[int]] | None = None) -> None:
        self._make_tokenizer = make_tokenizer
        self._tokenizer: Any = None
        self._n_vocab = n_vocab
        self._tokenize = tokenize
        self._cache: OrderedDict[tuple[ConstraintKind, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _vocabulary(self) -> Any:
        if self._tokenizer is None:  # about a second for a 50k vocabulary: once, at the first constraint
            self._tokenizer = self._make_tokenizer()
        return self._tokenizer

    def matcher(self, constraint: Constraint, prefix: str = "constraint.") -> Matcher:
        """A matcher at the constraint's start (past `constraint.prefix`). Blocking (compiles on a miss):
        call it off the event loop."""
        field = field_of(constraint, prefix)
        key = (constraint.kind, constraint.text)
        with self._lock:
            tokenizer = self._vocabulary()
            pristine = self._cache.get(key)
            if pristine is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        if pristine is None:
            pristine = _compiled(tokenizer, constraint, field)
            with self._lock:
                self._cache[key] = pristine
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        matcher = pristine.deep_copy()
        if constraint.prefix:
            tokens = list(self._tokenize(constraint.prefix) if self._tokenize else
                          tokenizer.tokenize_str(constraint.prefix))
            if matcher.try_consume_tokens(tokens) != len(tokens):
                raise InvalidArgument(f"{field}: the text already produced does not fit it", field=field)
        return Matcher(matcher, self._n_vocab)


def llama_tokenizer(vocab: Any, n_vocab: int) -> Any:
    """llguidance's tokenizer over the vocabulary llama.cpp loaded from the GGUF file (as llguidance's own
    llamacpp helper builds it, with llama.cpp's current names); every end-of-generation token ends it."""
    import ctypes

    import llama_cpp
    import llguidance

    buffer = ctypes.create_string_buffer(16 * 1024 + 1)
    tokens: list[bytes] = []
    eog: list[int] = []
    control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    for token in range(int(llama_cpp.llama_vocab_n_tokens(vocab))):
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, 16 * 1024, 0, True)
        if n < 0:
            raise ValueError(f"token {token} does not fit a 16 KiB buffer")
        piece = buffer.raw[:n]
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        # Control tokens (and user-defined ones that look like them) are special: 0xff marks them.
        if attr & control or (attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and piece.startswith(b"<")
                              and piece.endswith(b">")):
            piece = b"\xff" + piece
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            eog.append(token)
        tokens.append(piece)
    tokens += [b""] * (n_vocab - len(tokens))
    tokenize = ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return llguidance.LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize,
        eos_token=eog or int(llama_cpp.llama_vocab_eos(vocab)), slices=None)


def json_tokenizer(tokenizer_json: str, n_vocab: int, eos: Sequence[int]) -> Any:
    """llguidance's tokenizer over a Hugging Face tokenizer.json (the ONNX engine's).

    llguidance reads a byte-level BPE's token bytes only from a plain ByteLevel decoder; tokenizers converted
    from GGUF by transformers carry a Sequence of decoders around it (ByteFallback, Fuse, Replace,
    ByteLevel), which it would read as text ("Ġ" instead of a space). A byte-level pre-tokenizer says what
    the vocabulary is: the decoder is made plain ByteLevel for llguidance (the engine's own is untouched)."""
    import json

    import llguidance

    spec = json.loads(tokenizer_json)
    pre = spec.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" or any(
        p.get("type") == "ByteLevel" for p in pre.get("pretokenizers") or ())
    if byte_level and (spec.get("decoder") or {}).get("type") != "ByteLevel":
        spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
        tokenizer_json = json.dumps(spec)
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=list(eos) or None)
