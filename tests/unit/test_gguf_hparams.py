"""Hyperparameters llama.cpp asserts on (and aborts the daemon) are refused by the header reader, naming the
key; long string arrays are stepped over without being decoded (issue 13, items 3 and 17)."""

from __future__ import annotations

import math
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from laas.daemon.gguf_header import ArrayLength, read_gguf_header
from tests.gguf_edit import edit_gguf
from tests.unit.test_gguf_header import T_ARRAY, T_F32, T_STRING, T_U32, array, craft, kv, load_error, write

LLAMA = [kv("general.architecture", T_STRING, "llama"), kv("llama.context_length", T_U32, 2048),
         kv("llama.block_count", T_U32, 30), kv("llama.embedding_length", T_U32, 576),
         kv("llama.attention.head_count", T_U32, 9), kv("llama.attention.head_count_kv", T_U32, 3),
         kv("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-5), kv("llama.rope.freq_base", T_F32, 1e5)]


def test_sane_hyperparameters_pass(tmp_path: Path) -> None:
    h = read_gguf_header(write(tmp_path, craft(kvs=LLAMA)))
    assert h.metadata["llama.block_count"] == 30


BAD: list[tuple[str, int, Any, str]] = [
    ("llama.block_count", T_U32, 0, "must be in 1..512"),  # GGML_ASSERT(n_layer > 0) in LoadModel
    ("llama.block_count", T_U32, 513, "must be in 1..512"),  # LLAMA_MAX_LAYERS
    ("llama.context_length", T_U32, 0xFFFFFFFF, "must be in 1.."),  # loaded, then every request INTERNAL
    ("llama.context_length", T_U32, 0, "must be in 1.."),
    ("llama.embedding_length", T_U32, 0, "must be in 1.."),
    ("llama.attention.head_count", T_U32, 0, "must be >= 1"),
    ("llama.attention.head_count_kv", T_U32, 0, "must divide"),  # n_gqa divides by it
    ("llama.attention.head_count_kv", T_U32, 4, "must divide"),
    ("llama.attention.layer_norm_rms_epsilon", T_F32, math.nan, "not a finite number"),  # GGML_ASSERT at decode
    ("llama.attention.layer_norm_rms_epsilon", T_F32, -1e-5, "in (0, 1]"),
    ("llama.attention.layer_norm_rms_epsilon", T_F32, 0.0, "in (0, 1]"),
    ("llama.rope.freq_base", T_F32, math.inf, "not a finite number"),
    ("llama.rope.freq_base", T_F32, 0.0, "> 0"),
    ("llama.rope.scaling.factor", T_F32, -2.0, ">= 0"),
    ("llama.rope.scaling.type", T_STRING, "bogus", "must be one of"),  # GGML_ASSERT(!= UNSPECIFIED)
    ("llama.expert_count", T_U32, 2000, "must be in 0..1024"),
    ("llama.expert_used_count", T_U32, 2, "must be 0 without experts"),
    ("llama.block_count", T_STRING, "30", "must be an integer"),
]


@pytest.mark.parametrize(("key", "vtype", "value", "why"), BAD, ids=[f"{k}={v!r}" for k, _, v, _ in BAD])
def test_hyperparameters_llama_cpp_asserts_on_are_refused(tmp_path: Path, key: str, vtype: int, value: Any,
                                                          why: str) -> None:
    kvs = [k for k in LLAMA if gstr_key(k) != key] + [kv(key, vtype, value)]
    msg = load_error(write(tmp_path, craft(kvs=kvs)))
    assert key in msg and why in msg and "llama.cpp cannot run" in msg


def gstr_key(pair: bytes) -> str:
    n = struct.unpack_from("<Q", pair)[0]
    return pair[8 : 8 + n].decode()


def test_experts_must_be_consistent(tmp_path: Path) -> None:
    moe = [kv("llama.expert_count", T_U32, 8), kv("llama.expert_used_count", T_U32, 2)]
    assert read_gguf_header(write(tmp_path, craft(kvs=LLAMA + moe))).metadata["llama.expert_count"] == 8
    bad = [kv("llama.expert_count", T_U32, 8), kv("llama.expert_used_count", T_U32, 9)]
    assert "llama.expert_used_count must be in 1..llama.expert_count" in load_error(write(tmp_path,
                                                                                          craft(kvs=LLAMA + bad)))


def test_per_layer_head_counts(tmp_path: Path) -> None:
    kvs = [k for k in LLAMA if not gstr_key(k).startswith("llama.attention.head_count")]
    ok = [*kvs, kv("llama.attention.head_count", T_ARRAY, array(T_U32, [9, 0] * 15)),  # 0: a layer without
          kv("llama.attention.head_count_kv", T_ARRAY, array(T_U32, [3, 0] * 15))]  # attention (hybrids)
    heads = read_gguf_header(write(tmp_path, craft(kvs=ok), "ok.gguf")).metadata["llama.attention.head_count"]
    assert heads[:2] == [9, 0]
    jamba = [*kvs, kv("llama.attention.head_count", T_U32, 9),  # Jamba: 0 KV heads on its Mamba layers
             kv("llama.attention.head_count_kv", T_ARRAY, array(T_U32, [0, 0, 0, 3] * 7 + [0, 0]))]
    assert read_gguf_header(write(tmp_path, craft(kvs=jamba), "j.gguf")).metadata["llama.block_count"] == 30
    short = [*kvs, kv("llama.attention.head_count", T_ARRAY, array(T_U32, [9] * 29))]
    assert "has 29 entries for 30 layers" in load_error(write(tmp_path, craft(kvs=short), "short.gguf"))
    odd = [*kvs, kv("llama.attention.head_count_kv", T_ARRAY, array(T_U32, [3] * 29 + [2])),
           kv("llama.attention.head_count", T_U32, 9)]
    msg = load_error(write(tmp_path, craft(kvs=odd), "o.gguf"))
    assert "(2) must divide llama.attention.head_count (9)" in msg


def test_add_bos_needs_a_bos_token_in_the_vocabulary(tmp_path: Path) -> None:
    vocab = kv("tokenizer.ggml.tokens", T_ARRAY, array(T_STRING, [f"t{i}" for i in range(100)]))
    bos = [vocab, kv("tokenizer.ggml.add_bos_token", 7, True)]
    assert "bos_token_id is missing" in load_error(write(tmp_path, craft(kvs=LLAMA + bos), "a.gguf"))
    far = [*bos, kv("tokenizer.ggml.bos_token_id", T_U32, 100)]
    assert "below the vocabulary size 100" in load_error(write(tmp_path, craft(kvs=LLAMA + far), "b.gguf"))
    ok = [*bos, kv("tokenizer.ggml.bos_token_id", T_U32, 99)]
    assert read_gguf_header(write(tmp_path, craft(kvs=LLAMA + ok), "c.gguf")).metadata["tokenizer.ggml.tokens"] == 100


@pytest.mark.parametrize(("key", "value"), [("llama.block_count", 0),
                                            ("llama.attention.layer_norm_rms_epsilon", math.nan),
                                            ("llama.context_length", 0xFFFFFFFF)])
def test_the_real_model_with_one_bad_value_is_refused(model_file: Path, tmp_path: Path, key: str,
                                                      value: float) -> None:
    assert read_gguf_header(edit_gguf(model_file, tmp_path / "same.gguf", {})).tensor_count == 272
    msg = load_error(edit_gguf(model_file, tmp_path / "bad.gguf", {key: value}))
    assert key in msg


def test_long_string_arrays_are_stepped_over_not_decoded(tmp_path: Path) -> None:
    """Item 17: a 300 000-entry vocabulary was decoded string by string (12.7 s and 521 MB for a 221 MB file)."""
    n = 300_000
    vocab = array(T_STRING, [f"token-{i:09d}" for i in range(n)])  # ~6 MB of strings
    path = write(tmp_path, craft(kvs=[*LLAMA, kv("tokenizer.ggml.tokens", T_ARRAY, vocab),
                                      kv("after", T_U32, 7)]))
    tracemalloc.start()
    try:
        header = read_gguf_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, ArrayLength) and tokens == n and header.metadata["after"] == 7
    assert peak < 1 << 20, f"{peak} bytes traced while reading: the strings were decoded"  # decoded: ~25 MB


def test_a_bad_length_inside_a_skipped_string_array_is_still_refused(tmp_path: Path) -> None:
    strings = [struct.pack("<Q", 1) + b"a"] * 100 + [struct.pack("<Q", 1 << 40)]
    body = struct.pack("<IQ", T_STRING, 101) + b"".join(strings)
    assert "string of 1099511627776 bytes" in load_error(write(tmp_path, craft(kvs=[*LLAMA, kv("v", T_ARRAY, body)])))
    cut = struct.pack("<IQ", T_STRING, 1000) + b"".join(strings[:100])
    assert "truncated" in load_error(write(tmp_path, craft(kvs=[*LLAMA, kv("v", T_ARRAY, cut)], tensors=[])))
