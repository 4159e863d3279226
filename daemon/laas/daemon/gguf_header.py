"""A bounded reader of GGUF headers: metadata and tensor table, checked before native code sees the file.

Layer: infrastructure (pure file parsing, no llama.cpp). llama.cpp's own parser has had overflows on
crafted files, so a model file is read here first: magic, version, counts, string and array lengths,
tensor shapes, and every tensor's data range must lie inside the file; then the hyperparameters llama.cpp
would assert on (gguf_hparams.py). Long arrays (the tokenizer's vocabulary, scores and merges) are skipped
without decoding, keeping only their length; numeric arrays up to one entry per layer are kept. A file that
fails any check raises ModelLoadError.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laas.core.errors import ModelLoadError
from laas.daemon.gguf_hparams import MAX_LAYERS, hyperparameter_problem

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_STRING = 1 << 24  # 16 MiB: chat templates are a few KiB, vocab entries a few bytes
MAX_ARRAY = 1 << 24
MAX_DIMS = 4
KEPT_ARRAY = 64  # string arrays longer than this are skipped; only their length is kept
KEPT_NUMBERS = 2 * MAX_LAYERS  # the same for numeric arrays (per-layer hyperparameters are kept)

# GGUF metadata value types: id -> struct format (None: variable length).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types: id -> (elements per block, bytes per block).
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}

# general.file_type -> the quantization name people use (llama.cpp's LLAMA_FTYPE_MOSTLY_*).
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}
POOLINGS = {1: "mean", 2: "cls", 3: "last", 4: "rank"}  # llama.cpp's enum llama_pooling_type


@dataclass(frozen=True, slots=True)
class GgufHeader:
    version: int
    metadata: dict[str, Any]
    tensor_count: int
    size_bytes: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def context_length(self) -> int:
        value = self.metadata.get(f"{self.architecture}.context_length", 0)
        return int(value) if isinstance(value, int) else 0

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        return FILE_TYPES.get(file_type, f"type{file_type}") if isinstance(file_type, int) else "unknown"

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def pooling(self) -> str | None:
        """The pooling the file declares for its embeddings; None: none (a generative model)."""
        value = self.metadata.get(f"{self.architecture}.pooling_type")
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return POOLINGS.get(value)


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, why: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path.name} is not a valid GGUF file: {why} (at byte {self.pos})")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail("truncated")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > MAX_STRING:
            raise self.fail(f"string of {n} bytes")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail("string is not UTF-8") from e

    def skip_strings(self, count: int) -> None:
        """Steps over `count` strings, checking each length but copying and decoding none."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        for _ in range(count):
            if pos + 8 > end:
                break
            (n,) = struct.unpack_from("<Q", buf, pos)
            if n > MAX_STRING:
                self.pos = pos
                raise self.fail(f"string of {n} bytes")
            pos += 8 + n
        else:
            if pos <= end:
                self.pos = pos
                return
        self.pos = min(pos, end)
        raise self.fail("truncated")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth == 0:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type not in _SCALARS and item_type != _STRING:
                raise self.fail(f"array of unknown type {item_type}")
            if count > MAX_ARRAY:
                raise self.fail(f"array of {count} items")
            if item_type in _SCALARS and count > KEPT_NUMBERS:  # skip without decoding
                self.take(struct.calcsize(_SCALARS[item_type]) * count)
                return ArrayLength(count)
            if item_type == _STRING and count > KEPT_ARRAY:
                self.skip_strings(count)
                return ArrayLength(count)
            return [self.value(item_type, depth + 1) for _ in range(count)]
        raise self.fail(f"unknown metadata type {vtype}")


class ArrayLength(int):
    """Stands in for a metadata array too long to keep (e.g. the vocabulary): its length."""


def read_gguf_header(path: Path) -> GgufHeader:
    """Parses and checks `path`'s header and tensor table; raises ModelLoadError on any defect."""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise ModelLoadError(f"{path.name} is not a valid GGUF file: only {size} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path), size)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path.name}: {e.strerror}") from e


def _parse(cur: _Cursor, size: int) -> GgufHeader:
    if cur.take(4) != GGUF_MAGIC:
        raise cur.fail("bad magic (expected 'GGUF')")
    version = cur.unpack("<I")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"unsupported version {version}")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise cur.fail(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        metadata[key] = cur.value(cur.unpack("<I"))
    if not isinstance(metadata.get("general.architecture"), str):
        raise cur.fail("general.architecture is missing")
    alignment = metadata.get("general.alignment", 32)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"bad alignment {alignment!r}")
    tensors = [_tensor_info(cur) for _ in range(n_tensors)]
    if len({name for name, _, _ in tensors}) != len(tensors):
        raise cur.fail("duplicate tensor names")
    data_start = -(-cur.pos // alignment) * alignment
    end = 0
    for name, offset, nbytes in sorted(tensors, key=lambda t: t[1]):
        if offset % alignment or data_start + offset + nbytes > size:
            raise cur.fail(f"tensor {name!r} lies outside the file")
        if offset < end:
            raise cur.fail(f"tensor {name!r} overlaps another tensor")
        end = offset + nbytes
    tokens = metadata.get("tokenizer.ggml.tokens")
    n_tokens = int(tokens) if isinstance(tokens, ArrayLength) else len(tokens) if isinstance(tokens, list) else None
    problem = hyperparameter_problem(metadata, n_tokens)
    if problem is not None:
        raise ModelLoadError(f"{cur.path.name} has hyperparameters llama.cpp cannot run: {problem}")
    return GgufHeader(version=version, metadata=metadata, tensor_count=n_tensors, size_bytes=size)


def _tensor_info(cur: _Cursor) -> tuple[str, int, int]:
    name = cur.string()
    n_dims = cur.unpack("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
    dims = [cur.unpack("<Q") for _ in range(n_dims)]
    if any(dim == 0 or dim > 1 << 40 for dim in dims):
        raise cur.fail(f"tensor {name!r} has dimensions {dims}")
    elements = math.prod(dims)
    ggml_type, offset = cur.unpack("<I"), cur.unpack("<Q")
    if ggml_type not in GGML_TYPES:
        raise cur.fail(f"tensor {name!r} has unknown type {ggml_type}")
    block, block_bytes = GGML_TYPES[ggml_type]
    if dims[0] % block:  # llama.cpp quantizes rows: the first dimension holds whole blocks
        raise cur.fail(f"tensor {name!r} rows are not a whole number of blocks")
    return name, offset, elements // block * block_bytes
