"""Checks of a GGUF model's hyperparameters that llama.cpp asserts on (and aborts the process) instead of refusing.

Layer: infrastructure (pure, over the metadata gguf_header.py read). llama.cpp validates most metadata by
throwing, which llama-cpp-python turns into a clean error; the values here it takes on trust and then hits a
GGML_ASSERT (block_count = 0, NaN epsilon at the first decode), divides by (head_count_kv = 0), or loads and
fails every request (context_length = 2^32 - 1). Sources: llama-model.cpp load_hparams, llama-hparams.h,
ggml-cpu ops (rms_norm: eps >= 0), llama-vocab.cpp (add_bos with no BOS token). A key that is absent is left to
llama.cpp, which refuses missing required keys cleanly. Each failure names the key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
MAX_CONTEXT = 1 << 24  # 16 M tokens: the longest trained contexts are ~10 M
MAX_WIDTH = 1 << 20  # embedding, feed-forward, head sizes
MAX_HEADS = 1 << 14
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# Architectures without attention: their head counts may be 0.
ATTENTION_FREE = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "wavtokenizer-dec"})


def hyperparameter_problem(metadata: Mapping[str, Any], n_tokens: int | None) -> str | None:
    """What is wrong with the hyperparameters (naming the key), or None. `n_tokens`: the vocabulary size."""
    arch = str(metadata.get("general.architecture", ""))
    for key, value in metadata.items():  # no model has a NaN or infinite hyperparameter
        floats = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in floats):
            return f"{key} is not a finite number ({value!r})"
    return _Checker(metadata, arch).problem(n_tokens)


class _Checker:
    def __init__(self, metadata: Mapping[str, Any], arch: str) -> None:
        self.md, self.arch = metadata, arch

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def ints(self, name: str) -> list[int] | None:
        """The key's value as integers (a scalar, or a per-layer array); None if absent. Raises on other types."""
        value = self.md.get(self.key(name))
        if value is None:
            return None
        values = value if isinstance(value, list) else [value]
        if not values or any(type(v) is not int for v in values):
            raise _Bad(f"{self.key(name)} must be an integer or an array of integers (got {value!r})")
        return values

    def in_range(self, name: str, low: int, high: int) -> list[int] | None:
        values = self.ints(name)
        if values is not None and not all(low <= v <= high for v in values):
            raise _Bad(f"{self.key(name)} must be in {low}..{high} (got {self.md[self.key(name)]!r})")
        return values

    def number(self, name: str, ok: Callable[[float], bool], rule: str) -> None:
        value = self.md.get(self.key(name))
        if value is None:
            return
        if type(value) not in (int, float) or not ok(float(value)):
            raise _Bad(f"{self.key(name)} must be {rule} (got {value!r})")

    def problem(self, n_tokens: int | None) -> str | None:
        try:
            self.check_shape()
            self.check_experts()
            self.check_floats()
            self.check_tokens(n_tokens)
        except _Bad as e:
            return str(e)
        return None

    def check_shape(self) -> None:
        self.in_range("context_length", 1, MAX_CONTEXT)
        self.in_range("rope.scaling.original_context_length", 0, MAX_CONTEXT)
        layers = self.in_range("block_count", 1, MAX_LAYERS)
        n_layer = layers[0] if layers else MAX_LAYERS
        self.in_range("nextn_predict_layers", 0, n_layer)
        self.in_range("embedding_length", 1, MAX_WIDTH)
        self.in_range("feed_forward_length", 0, MAX_WIDTH)
        for name in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
            self.in_range(name, 0, MAX_WIDTH)
        heads = self.in_range("attention.head_count", 0, MAX_HEADS)
        kv_heads = self.in_range("attention.head_count_kv", 0, MAX_HEADS)
        if heads is not None and max(heads) == 0 and self.arch not in ATTENTION_FREE:
            key = self.key("attention.head_count")
            raise _Bad(f"{key} must be >= 1 (got {self.md[key]!r})")
        for name, values in (("attention.head_count", heads), ("attention.head_count_kv", kv_heads)):
            if layers and values is not None and len(values) > 1 and len(values) != n_layer:
                raise _Bad(f"{self.key(name)} has {len(values)} entries for {n_layer} layers")
        if heads and kv_heads:
            width = max(len(heads), len(kv_heads))
            for h, kv in zip(heads * width if len(heads) == 1 else heads,
                             kv_heads * width if len(kv_heads) == 1 else kv_heads, strict=False):
                # 0 KV heads in a per-layer array is a layer without attention (Jamba writes them so)
                no_kv_allowed = len(kv_heads) > 1
                if h and (h % kv if kv else not no_kv_allowed):
                    raise _Bad(f"{self.key('attention.head_count_kv')} ({kv}) must divide "
                               f"{self.key('attention.head_count')} ({h})")

    def check_experts(self) -> None:
        experts = (self.in_range("expert_count", 0, MAX_EXPERTS) or [0])[0]
        used = max(self.in_range("expert_used_count", 0, MAX_EXPERTS) or [0])
        groups = (self.in_range("expert_group_count", 0, MAX_EXPERTS) or [0])[0]
        group_used = (self.in_range("expert_group_used_count", 0, MAX_EXPERTS) or [0])[0]
        count, used_key = self.key("expert_count"), self.key("expert_used_count")
        if experts == 0 and (used or groups):
            raise _Bad(f"{used_key} and {self.key('expert_group_count')} must be 0 without experts ({count} = 0)")
        if experts and not 0 < used <= experts:
            raise _Bad(f"{used_key} must be in 1..{count} ({experts}) (got {used})")
        if experts and groups >= experts:
            raise _Bad(f"{self.key('expert_group_count')} must be below {count} ({experts}) (got {groups})")
        if groups > 1 and (experts % groups or not 0 < group_used < groups):
            raise _Bad(f"{self.key('expert_group_count')} ({groups}) must divide {count} ({experts}) and "
                       f"{self.key('expert_group_used_count')} must be in 1..{groups - 1} (got {group_used})")

    def check_floats(self) -> None:
        for name in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
            self.number(name, lambda v: 0 < v <= 1, "in (0, 1]")
        self.number("rope.freq_base", lambda v: v > 0, "> 0")
        self.number("rope.scaling.factor", lambda v: v >= 0, ">= 0")
        self.number("rope.scale_linear", lambda v: v >= 0, ">= 0")
        scaling = self.md.get(self.key("rope.scaling.type"))
        if scaling is not None and scaling not in ROPE_SCALING_TYPES:
            raise _Bad(f"{self.key('rope.scaling.type')} must be one of {', '.join(ROPE_SCALING_TYPES)} "
                       f"(got {scaling!r})")

    def check_tokens(self, n_tokens: int | None) -> None:
        """llama.cpp asserts that a vocabulary that adds BOS (EOS) has one; out-of-range ids fall back to defaults
        silently, which for BOS/EOS may be no token at all."""
        for name in ("bos", "eos"):
            key = f"tokenizer.ggml.{name}_token_id"
            value = self.md.get(key)
            if value is not None and n_tokens is not None and (type(value) is not int or not 0 <= value < n_tokens):
                raise _Bad(f"{key} must be a token id below the vocabulary size {n_tokens} (got {value!r})")
            if self.md.get(f"tokenizer.ggml.add_{name}_token") is True and value is None:
                raise _Bad(f"tokenizer.ggml.add_{name}_token is set but {key} is missing")


class _Bad(Exception):
    pass
