"""read_gguf_header: the real default model, hand-crafted small files, and corrupted copies.

Every defect must surface as ModelLoadError with a message saying what is wrong, never another exception.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from laas.core.errors import ModelLoadError
from laas.daemon.gguf_header import ArrayLength, GgufHeader, read_gguf_header

# ---------------------------------------------------------------------------------------------------
# Crafting GGUF files by hand
# ---------------------------------------------------------------------------------------------------

T_U8, T_U32, T_I32, T_F32, T_BOOL, T_STRING, T_ARRAY, T_U64 = 0, 4, 5, 6, 7, 8, 9, 10


def gstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, value: Any) -> bytes:
    """One metadata pair; `value` is already-encoded bytes for arrays, else a Python value."""
    if vtype == T_STRING:
        body = gstr(value)
    elif vtype == T_ARRAY:
        body = value
    else:
        fmt = {T_U8: "<B", T_U32: "<I", T_I32: "<i", T_F32: "<f", T_BOOL: "<?", T_U64: "<Q"}[vtype]
        body = struct.pack(fmt, value)
    return gstr(key) + struct.pack("<I", vtype) + body


def array(item_type: int, items: list[Any]) -> bytes:
    if item_type == T_STRING:
        body = b"".join(gstr(i) for i in items)
    else:
        fmt = {T_U8: "<B", T_U32: "<I", T_I32: "<i", T_F32: "<f"}[item_type]
        body = b"".join(struct.pack(fmt, i) for i in items)
    return struct.pack("<IQ", item_type, len(items)) + body


def tensor(name: str, dims: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    return (gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", ggml_type, offset))


def craft(
    *,
    version: int = 3,
    kvs: list[bytes] | None = None,
    tensors: list[bytes] | None = None,
    data: bytes | None = None,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
    magic: bytes = b"GGUF",
) -> bytes:
    """A GGUF v3 file: header, metadata, tensor infos, padding to `alignment`, tensor data.

    By default: architecture 'llama', context length 2048, file type Q4_1 (3), one 8x4 F32 tensor.
    """
    if kvs is None:
        kvs = [
            kv("general.architecture", T_STRING, "llama"),
            kv("llama.context_length", T_U32, 2048),
            kv("general.file_type", T_U32, 3),
            kv("tokenizer.chat_template", T_STRING, "{{ messages }}"),
        ]
    if tensors is None:
        tensors = [tensor("w", (8, 4), 0, 0)]
        data = bytes(8 * 4 * 4) if data is None else data
    head = (magic + struct.pack("<I", version)
            + struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                          len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(tensors))
    pad = -len(head) % alignment
    return head + bytes(pad) + (data or b"")


def write(tmp_path: Path, content: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        read_gguf_header(path)
    err = info.value
    assert type(err) is ModelLoadError
    return str(err)


# ---------------------------------------------------------------------------------------------------
# An independent reader of the tensor table, to check the real file's layout
# ---------------------------------------------------------------------------------------------------

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
# (elements per block, bytes per block) for the ggml types a Q4_1 model uses
_TYPE_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34), 14: (256, 210)}


def layout(blob: bytes) -> tuple[int, int, list[tuple[str, int, int]]]:
    """(alignment, data_start, [(name, offset, nbytes)]) parsed from the start of a GGUF file."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        out = blob[pos : pos + n]
        assert len(out) == n, "header extends past the bytes read"
        pos += n
        return out

    def u32() -> int:
        return int(struct.unpack("<I", take(4))[0])

    def u64() -> int:
        return int(struct.unpack("<Q", take(8))[0])

    def string() -> str:
        return take(u64()).decode()

    def skip(vtype: int) -> Any:
        if vtype == 8:
            return string()
        if vtype == 9:
            item, count = u32(), u64()
            for _ in range(count):
                skip(item)
            return None
        raw = take(_SCALAR_SIZES[vtype])
        return int.from_bytes(raw, "little") if vtype in (4, 10) else None

    assert take(4) == b"GGUF"
    u32()
    n_tensors, n_kv = u64(), u64()
    alignment = 32
    for _ in range(n_kv):
        key = string()
        value = skip(u32())
        if key == "general.alignment":
            alignment = value
    tensors = []
    for _ in range(n_tensors):
        name = string()
        n_dims = u32()
        elements = 1
        for _ in range(n_dims):
            elements *= u64()
        ggml_type, offset = u32(), u64()
        block, size = _TYPE_SIZES[ggml_type]
        tensors.append((name, offset, elements // block * size))
    data_start = -(-pos // alignment) * alignment
    return alignment, data_start, tensors


HEAD_BYTES = 4 << 20  # the real model's header and tensor table fit well inside this


@pytest.fixture(scope="module")
def real_head(model_file: Path) -> bytes:
    with model_file.open("rb") as f:
        return f.read(HEAD_BYTES)


def sparse_copy(tmp_path: Path, head: bytes, size: int, name: str = "copy.gguf") -> Path:
    """The header bytes followed by zeros up to `size` bytes (a sparse file, not a 98 MB copy)."""
    path = tmp_path / name
    with path.open("wb") as f:
        f.write(head[:size])
        f.truncate(size)
    return path


# ---------------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------------


def test_real_model_metadata(model_file: Path) -> None:
    h = read_gguf_header(model_file)
    assert isinstance(h, GgufHeader)
    assert h.version == 3
    assert h.architecture == "llama"
    assert h.context_length == 8192
    assert h.quantization == "Q4_1"
    assert h.tensor_count == 272
    assert h.size_bytes == model_file.stat().st_size
    assert h.chat_template is not None
    assert "<|im_start|>" in h.chat_template
    # the vocabulary is skipped, only its length kept
    tokens = h.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, ArrayLength)
    assert tokens == h.metadata["llama.vocab_size"] == 49152


def test_real_model_last_tensor_ends_inside_the_file(model_file: Path, real_head: bytes) -> None:
    alignment, data_start, tensors = layout(real_head)
    assert len(tensors) == 272
    size = model_file.stat().st_size
    end = max(data_start + offset + nbytes for _, offset, nbytes in tensors)
    assert end <= size
    assert size - end < alignment  # the file holds nothing much past the last tensor
    assert all(offset % alignment == 0 for _, offset, _ in tensors)


def test_real_model_truncated_by_one_byte_past_last_tensor_is_refused(
        model_file: Path, real_head: bytes, tmp_path: Path) -> None:
    _, data_start, tensors = layout(real_head)
    end = max(data_start + offset + nbytes for _, offset, nbytes in tensors)
    # exactly long enough: accepted, and the same metadata as the real file
    ok = read_gguf_header(sparse_copy(tmp_path, real_head, end, "exact.gguf"))
    assert ok.tensor_count == 272
    assert ok.context_length == 8192
    # one byte short of the last tensor's data: refused
    msg = load_error(sparse_copy(tmp_path, real_head, end - 1, "short.gguf"))
    assert "lies outside the file" in msg
    assert "short.gguf" in msg


def test_real_model_truncated_inside_header(real_head: bytes, tmp_path: Path) -> None:
    msg = load_error(sparse_copy(tmp_path, real_head, 100_000))  # inside the vocabulary
    assert "truncated" in msg


def test_real_model_with_corrupted_magic(real_head: bytes, tmp_path: Path, model_file: Path) -> None:
    path = sparse_copy(tmp_path, b"GGUX" + real_head[4:], model_file.stat().st_size)
    assert "bad magic" in load_error(path)


# ---------------------------------------------------------------------------------------------------
# Hand-crafted files
# ---------------------------------------------------------------------------------------------------


def test_crafted_valid_file(tmp_path: Path) -> None:
    h = read_gguf_header(write(tmp_path, craft()))
    assert h.version == 3
    assert h.architecture == "llama"
    assert h.context_length == 2048
    assert h.quantization == "Q4_1"
    assert h.chat_template == "{{ messages }}"
    assert h.tensor_count == 1


def test_crafted_version_2_is_supported(tmp_path: Path) -> None:
    assert read_gguf_header(write(tmp_path, craft(version=2))).version == 2


def test_minimal_metadata_defaults(tmp_path: Path) -> None:
    h = read_gguf_header(write(tmp_path, craft(kvs=[kv("general.architecture", T_STRING, "phi3")], tensors=[])))
    assert h.architecture == "phi3"
    assert h.context_length == 0
    assert h.quantization == "unknown"
    assert h.chat_template is None
    assert h.tensor_count == 0


def test_unknown_file_type_named_by_number(tmp_path: Path) -> None:
    kvs = [kv("general.architecture", T_STRING, "llama"), kv("general.file_type", T_U32, 999)]
    assert read_gguf_header(write(tmp_path, craft(kvs=kvs))).quantization == "type999"


def test_short_arrays_kept_long_arrays_reduced_to_length(tmp_path: Path) -> None:
    kvs = [
        kv("general.architecture", T_STRING, "llama"),
        kv("short.ints", T_ARRAY, array(T_I32, [1, -2, 3])),
        kv("short.strs", T_ARRAY, array(T_STRING, ["a", "bc"])),
        kv("layer.ints", T_ARRAY, array(T_U32, list(range(512)))),  # one per layer: kept
        kv("long.ints", T_ARRAY, array(T_U8, [i % 256 for i in range(2000)])),
        kv("long.strs", T_ARRAY, array(T_STRING, [str(i) for i in range(100)])),
        kv("after", T_U32, 7),  # parsing continues correctly after the skipped arrays
    ]
    md = read_gguf_header(write(tmp_path, craft(kvs=kvs))).metadata
    assert md["short.ints"] == [1, -2, 3]
    assert md["short.strs"] == ["a", "bc"]
    assert md["layer.ints"] == list(range(512))
    assert isinstance(md["long.ints"], ArrayLength) and md["long.ints"] == 2000
    assert isinstance(md["long.strs"], ArrayLength) and md["long.strs"] == 100
    assert md["after"] == 7


def test_custom_alignment_is_honoured(tmp_path: Path) -> None:
    kvs = [kv("general.architecture", T_STRING, "llama"), kv("general.alignment", T_U32, 4096)]
    blob = craft(kvs=kvs, alignment=4096)
    assert len(blob) == 4096 + 128
    assert read_gguf_header(write(tmp_path, blob)).metadata["general.alignment"] == 4096
    # the same tensor padded only to 32 bytes: with alignment 4096 its data would start past the end
    assert "outside the file" in load_error(write(tmp_path, craft(kvs=kvs, alignment=32), "a32.gguf"))


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment(tmp_path: Path, alignment: int) -> None:
    kvs = [kv("general.architecture", T_STRING, "llama"), kv("general.alignment", T_U32, alignment)]
    assert "bad alignment" in load_error(write(tmp_path, craft(kvs=kvs)))


def test_alignment_of_wrong_type(tmp_path: Path) -> None:
    kvs = [kv("general.architecture", T_STRING, "llama"), kv("general.alignment", T_STRING, "32")]
    assert "bad alignment" in load_error(write(tmp_path, craft(kvs=kvs)))


def test_tensor_of_quantized_type(tmp_path: Path) -> None:
    # Q4_1: 32 elements per 20-byte block; 64x2 = 4 blocks = 80 bytes
    blob = craft(tensors=[tensor("q", (64, 2), 3, 0)], data=bytes(80))
    assert read_gguf_header(write(tmp_path, blob)).tensor_count == 1
    assert "outside the file" in load_error(write(tmp_path, blob[:-1], "short.gguf"))


def test_second_tensor_at_aligned_offset(tmp_path: Path) -> None:
    tensors = [tensor("a", (8,), 0, 0), tensor("b", (8,), 0, 32)]
    blob = craft(tensors=tensors, data=bytes(64))
    assert read_gguf_header(write(tmp_path, blob)).tensor_count == 2
    assert "'b' lies outside" in load_error(write(tmp_path, blob[:-1], "short.gguf"))


# ---------------------------------------------------------------------------------------------------
# Defects: each a ModelLoadError with a clear message
# ---------------------------------------------------------------------------------------------------


def test_bad_magic(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, craft(magic=b"GGML"), "bad.gguf"))
    assert "bad.gguf is not a valid GGUF file" in msg
    assert "bad magic" in msg


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    assert f"unsupported version {version}" in load_error(write(tmp_path, craft(version=version)))


def test_zero_sized_file(tmp_path: Path) -> None:
    assert "only 0 bytes" in load_error(write(tmp_path, b""))


@pytest.mark.parametrize("size", [1, 4, 23])
def test_tiny_files(tmp_path: Path, size: int) -> None:
    assert f"only {size} bytes" in load_error(write(tmp_path, craft()[:size]))


def test_every_truncation_of_the_header_is_refused(tmp_path: Path) -> None:
    blob = craft()
    header_end = len(craft(alignment=1)) - 8 * 4 * 4  # where the tensor table ends, before padding
    assert header_end < len(blob) - 8 * 4 * 4
    for n in range(24, len(blob)):
        msg = load_error(write(tmp_path, blob[:n], f"t{n}.gguf"))
        expected = "truncated" if n < header_end else "outside the file"
        assert expected in msg, (n, msg)


def test_kv_count_beyond_the_pairs_present_is_truncated(tmp_path: Path) -> None:
    # no tensors, no padding: the file ends right after the four pairs it has
    assert "truncated" in load_error(write(tmp_path, craft(n_kv=5, tensors=[], alignment=1)))


@pytest.mark.parametrize(("n_tensors", "n_kv"), [(1 << 17, 4), (1, 1 << 17), (2**64 - 1, 2**64 - 1)])
def test_absurd_counts(tmp_path: Path, n_tensors: int, n_kv: int) -> None:
    assert "implausible counts" in load_error(write(tmp_path, craft(n_tensors=n_tensors, n_kv=n_kv)))


def test_string_length_beyond_the_file(tmp_path: Path) -> None:
    bad = struct.pack("<Q", 1000) + b"general.architecture"
    blob = craft(kvs=[bad + struct.pack("<I", T_STRING) + gstr("llama")])
    assert "truncated" in load_error(write(tmp_path, blob))


def test_string_length_absurd(tmp_path: Path) -> None:
    bad_value = struct.pack("<Q", 2**63) + b"llama"
    blob = craft(kvs=[gstr("general.architecture") + struct.pack("<I", T_STRING) + bad_value])
    assert "string of 9223372036854775808 bytes" in load_error(write(tmp_path, blob))


def test_string_not_utf8(tmp_path: Path) -> None:
    blob = craft(kvs=[kv("general.architecture", T_STRING, b"\xff\xfe")])
    assert "not UTF-8" in load_error(write(tmp_path, blob))


def test_array_length_absurd(tmp_path: Path) -> None:
    bad = struct.pack("<IQ", T_U8, 1 << 40)
    blob = craft(kvs=[kv("general.architecture", T_STRING, "llama"), kv("v", T_ARRAY, bad)])
    assert "array of" in load_error(write(tmp_path, blob))


def test_array_length_beyond_the_file(tmp_path: Path) -> None:
    bad = struct.pack("<IQ", T_U32, 1 << 20)  # 4 MiB of u32 items in a tiny file
    blob = craft(kvs=[kv("general.architecture", T_STRING, "llama"), kv("v", T_ARRAY, bad)])
    assert "truncated" in load_error(write(tmp_path, blob))


def test_nested_array_refused(tmp_path: Path) -> None:
    inner = array(T_U8, [1])
    blob = craft(kvs=[kv("general.architecture", T_STRING, "llama"),
                      kv("v", T_ARRAY, struct.pack("<IQ", T_ARRAY, 1) + inner)])
    assert "array of unknown type 9" in load_error(write(tmp_path, blob))


def test_unknown_metadata_type(tmp_path: Path) -> None:
    blob = craft(kvs=[kv("general.architecture", T_STRING, "llama"),
                      gstr("x") + struct.pack("<I", 13) + b"\0" * 8])
    assert "unknown metadata type 13" in load_error(write(tmp_path, blob))


def test_architecture_missing(tmp_path: Path) -> None:
    blob = craft(kvs=[kv("llama.context_length", T_U32, 2048)])
    assert "general.architecture is missing" in load_error(write(tmp_path, blob))


def test_architecture_not_a_string(tmp_path: Path) -> None:
    blob = craft(kvs=[kv("general.architecture", T_U32, 1)])
    assert "general.architecture is missing" in load_error(write(tmp_path, blob))


def test_tensor_offset_outside_the_file(tmp_path: Path) -> None:
    blob = craft(tensors=[tensor("w", (8, 4), 0, 1 << 20)], data=bytes(128))
    assert "tensor 'w' lies outside the file" in load_error(write(tmp_path, blob))


def test_tensor_offset_huge(tmp_path: Path) -> None:
    blob = craft(tensors=[tensor("w", (8,), 0, 2**64 - 32)], data=bytes(32))
    assert "lies outside the file" in load_error(write(tmp_path, blob))


def test_tensor_offset_misaligned(tmp_path: Path) -> None:
    blob = craft(tensors=[tensor("w", (4,), 0, 4)], data=bytes(64))
    assert "lies outside the file" in load_error(write(tmp_path, blob))


def test_tensor_data_larger_than_the_file(tmp_path: Path) -> None:
    blob = craft(tensors=[tensor("w", (1 << 40, 1 << 40), 0, 0)], data=bytes(32))
    assert "lies outside the file" in load_error(write(tmp_path, blob))


def test_unknown_ggml_type(tmp_path: Path) -> None:
    blob = craft(tensors=[tensor("w", (32,), 4, 0)], data=bytes(128))  # 4 and 5 were removed from ggml
    assert "tensor 'w' has unknown type 4" in load_error(write(tmp_path, blob))


def test_ggml_type_huge(tmp_path: Path) -> None:
    blob = craft(tensors=[tensor("w", (32,), 0xFFFFFFFF, 0)], data=bytes(128))
    assert "unknown type 4294967295" in load_error(write(tmp_path, blob))


@pytest.mark.parametrize("dims", [(), (1, 1, 1, 1, 1)])
def test_bad_dimension_count(tmp_path: Path, dims: tuple[int, ...]) -> None:
    blob = craft(tensors=[tensor("w", dims, 0, 0)], data=bytes(32))
    assert f"has {len(dims)} dimensions" in load_error(write(tmp_path, blob))


def test_dimension_count_absurd(tmp_path: Path) -> None:
    raw = gstr("w") + struct.pack("<I", 0xFFFFFFFF)
    blob = craft(tensors=[raw], data=bytes(32))
    assert "4294967295 dimensions" in load_error(write(tmp_path, blob))


@pytest.mark.parametrize("dim", [0, (1 << 40) + 1])
def test_bad_dimension(tmp_path: Path, dim: int) -> None:
    blob = craft(tensors=[tensor("w", (4, dim), 0, 0)], data=bytes(64))
    assert f"has dimensions [4, {dim}]" in load_error(write(tmp_path, blob))


def test_tensor_not_whole_blocks(tmp_path: Path) -> None:
    blob = craft(tensors=[tensor("w", (33,), 3, 0)], data=bytes(64))  # Q4_1 blocks hold 32
    assert "not a whole number of blocks" in load_error(write(tmp_path, blob))


def test_rows_must_hold_whole_blocks(tmp_path: Path) -> None:
    # 16x2 Q4_1 holds 32 elements (one block in total), but a row of 16 is half a block.
    blob = craft(tensors=[tensor("w", (16, 2), 3, 0)], data=bytes(64))
    assert "rows are not a whole number of blocks" in load_error(write(tmp_path, blob))


def test_duplicate_metadata_key(tmp_path: Path) -> None:
    kvs = [kv("general.architecture", T_STRING, "llama"), kv("general.architecture", T_STRING, "gemma")]
    assert "duplicate metadata key 'general.architecture'" in load_error(write(tmp_path, craft(kvs=kvs)))


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    blob = craft(tensors=[tensor("w", (8,), 0, 0), tensor("w", (8,), 0, 32)], data=bytes(64))
    assert "duplicate tensor names" in load_error(write(tmp_path, blob))


def test_overlapping_tensors(tmp_path: Path) -> None:
    blob = craft(tensors=[tensor("a", (16,), 0, 0), tensor("b", (8,), 0, 32)], data=bytes(96))
    assert "'b' overlaps another tensor" in load_error(write(tmp_path, blob))


def test_empty_array_of_unknown_type(tmp_path: Path) -> None:
    kvs = [kv("general.architecture", T_STRING, "llama"),
           gstr("x") + struct.pack("<I", T_ARRAY) + struct.pack("<IQ", 77, 0)]
    assert "array of unknown type 77" in load_error(write(tmp_path, craft(kvs=kvs)))


@pytest.mark.parametrize("value", [True, list(range(128))])
def test_alignment_must_be_a_plain_integer(tmp_path: Path, value: object) -> None:
    raw = kv("general.alignment", T_BOOL, value) if value is True else \
        gstr("general.alignment") + struct.pack("<I", T_ARRAY) + array(T_U32, list(range(128)))
    kvs = [kv("general.architecture", T_STRING, "llama"), raw]
    assert "bad alignment" in load_error(write(tmp_path, craft(kvs=kvs)))


def test_tensor_count_beyond_tensors_present(tmp_path: Path) -> None:
    blob = craft(n_tensors=3, tensors=[tensor("w", (8,), 0, 0)], data=b"", alignment=1)
    assert "truncated" in load_error(write(tmp_path, blob))


def test_nonexistent_path(tmp_path: Path) -> None:
    msg = load_error(tmp_path / "missing.gguf")
    assert "cannot read model file missing.gguf" in msg
    assert "No such file" in msg


def test_directory_path(tmp_path: Path) -> None:
    d = tmp_path / "dir.gguf"
    d.mkdir()
    msg = load_error(d)
    assert "cannot read model file dir.gguf" in msg


def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, craft())
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads anything: then it must still parse
            assert read_gguf_header(path).architecture == "llama"
        else:
            assert "cannot read model file" in load_error(path)
    finally:
        path.chmod(0o644)


# ---------------------------------------------------------------------------------------------------
# Random mutations: only ModelLoadError or a header ever comes out
# ---------------------------------------------------------------------------------------------------


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(b)) if b else 0
        if op == 0 and b:  # flip a byte
            b[i] = rng.randrange(256)
        elif op == 1 and b:  # flip one bit
            b[i] ^= 1 << rng.randrange(8)
        elif op == 2:  # truncate
            del b[rng.randrange(len(b) + 1):]
        elif op == 3:  # insert random bytes
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and len(b) >= i + 8:  # overwrite a u64 with an interesting value
            b[i : i + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**32, 2**63, 2**64 - 1, 1 << 24]))
        elif op == 5 and len(b) >= i + 4:  # overwrite a u32 (types, dims, versions)
            b[i : i + 4] = struct.pack("<I", rng.choice([0, 2, 3, 8, 9, 12, 13, 0xFFFFFFFF]))
    return bytes(b)


def test_random_mutations_raise_only_model_load_error(tmp_path: Path) -> None:
    kvs = [
        kv("general.architecture", T_STRING, "llama"),
        kv("llama.context_length", T_U32, 2048),
        kv("general.file_type", T_U32, 3),
        kv("general.alignment", T_U32, 32),
        kv("tokenizer.ggml.scores", T_ARRAY, array(T_F32, [0.5] * 70)),
        kv("tokenizer.ggml.tokens", T_ARRAY, array(T_STRING, ["<s>", "a", "b"])),
        kv("flag", T_BOOL, True),
    ]
    tensors = [tensor("a", (32, 2), 3, 0), tensor("b", (8,), 0, 64)]
    base = craft(kvs=kvs, tensors=tensors, data=bytes(96))
    assert read_gguf_header(write(tmp_path, base)).tensor_count == 2

    rng = random.Random(20240607)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        path.write_bytes(_mutate(rng, base))
        try:
            h = read_gguf_header(path)
        except ModelLoadError as e:
            assert str(e), "empty error message"
            outcomes["error"] += 1
        else:
            assert isinstance(h, GgufHeader)
            assert isinstance(h.architecture, str)
            outcomes["ok"] += 1
    assert outcomes["error"] > 100  # the mutations do break things
