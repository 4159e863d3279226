"""A loaded model's compiled constraints and each constrained sequence's token mask (constraints.py
compiles and checks; this is the engines' side, over the model's own vocabulary, with numpy).

Layer: daemon (infrastructure over llguidance and numpy), used by the engines only.
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
from laas.daemon.constraints import compiled, field_of

CACHE_SIZE = 64  # compiled constraints kept per model


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
            pristine = compiled(tokenizer, constraint, field)
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
