"""Copies a real GGUF file with some metadata values replaced: hostile models that keep real weights.

The tensor table and data are copied unchanged (tensor offsets are relative to the aligned data start,
which is recomputed for the new metadata). Values: str, bool, int (u32, or u64 when large) or float (f32).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _encode(key: str, value: str | bool | int | float) -> bytes:
    def gstr(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<Q", len(raw)) + raw

    if isinstance(value, str):
        body = struct.pack("<I", 8) + gstr(value)
    elif isinstance(value, bool):
        body = struct.pack("<I?", 7, value)
    elif isinstance(value, int):
        body = struct.pack("<II", 4, value) if 0 <= value < 1 << 32 else struct.pack("<IQ", 10, value)
    else:
        body = struct.pack("<If", 6, value)
    return gstr(key) + body


def edit_gguf(source: Path, target: Path, changes: dict[str, str | bool | int | float]) -> Path:
    """Writes `target`: `source` with the metadata keys in `changes` replaced (or added)."""
    with source.open("rb") as f:
        head = f.read(64 << 20)  # the header of the default model is ~2 MiB
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return head[pos - n : pos]

    def u32() -> int:
        return int(struct.unpack("<I", take(4))[0])

    def u64() -> int:
        return int(struct.unpack("<Q", take(8))[0])

    def skip(vtype: int) -> None:
        if vtype == 8:
            take(u64())
        elif vtype == 9:
            item, count = u32(), u64()
            if item in _SIZES:
                take(_SIZES[item] * count)
            else:
                for _ in range(count):
                    skip(item)
        else:
            take(_SIZES[vtype])

    magic, version = take(4), u32()
    n_tensors, n_kv = u64(), u64()
    kept: list[bytes] = []
    alignment = 32
    for _ in range(n_kv):
        start = pos
        key = take(u64()).decode()
        vtype = u32()
        if key == "general.alignment":
            alignment = int(struct.unpack("<I", head[pos : pos + 4])[0])
        skip(vtype)
        if key not in changes:
            kept.append(head[start:pos])
    tensors_start = pos
    for _ in range(n_tensors):
        take(u64())
        take(8 * u32())
        take(12)
    tensor_table = head[tensors_start:pos]
    data_start = -(-pos // alignment) * alignment
    kvs = kept + [_encode(k, v) for k, v in changes.items()]
    new_head = magic + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(kvs) + tensor_table
    new_head += bytes(-len(new_head) % alignment)
    with source.open("rb") as src, target.open("wb") as dst:
        dst.write(new_head)
        src.seek(data_start)
        shutil.copyfileobj(src, dst, 1 << 22)
    return target
