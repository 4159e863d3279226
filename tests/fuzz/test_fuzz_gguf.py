"""Fuzzing the GGUF header reader: any bytes, and mutations of a valid header, give a GgufHeader or a
ModelLoadError, never another exception, a hang or a crash. LAAS_FUZZ_EXAMPLES scales it too."""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laas.core.errors import ModelLoadError
from laas.daemon.gguf_header import read_gguf_header

EXAMPLES = int(os.environ.get("LAAS_FUZZ_EXAMPLES", "300")) * 2
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _read(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.gguf"
        path.write_bytes(data)
        with contextlib.suppress(ModelLoadError):
            read_gguf_header(path)


def _kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + payload


HEADER = (b"GGUF" + struct.pack("<IQQ", 3, 1, 2)
        + _kv(b"general.architecture", 8, struct.pack("<Q", 5) + b"llama")
        + _kv(b"llama.context_length", 4, struct.pack("<I", 2048))
        + struct.pack("<Q", 6) + b"weight" + struct.pack("<I", 2) + struct.pack("<QQ", 32, 32)
        + struct.pack("<IQ", 0, 0))
SEED = HEADER + b"\x00" * (32 + 32 * 32 * 4)  # a valid file: one 32x32 F32 tensor after the aligned header


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes(data: bytes) -> None:
    _read(b"GGUF" + data if data[:1] == b"\x00" else data)


def test_the_seed_is_valid() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.gguf").write_bytes(SEED)
        assert read_gguf_header(Path(tmp) / "m.gguf").architecture == "llama"


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(HEADER) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(SEED)))
def test_mutated_valid_header(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEED)
    for at, value in flips:
        data[at] = value
    _read(bytes(data[:cut] if cut > 8 else data))
