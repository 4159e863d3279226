"""laas' patch to llama.cpp's flash-attention kernel (packaging/patches/ggml-cpu-flash-attn-f16-blocks.patch):
over F16 K and V, a query row's attention comes out within float32's reach of float64 attention, on the
one-row path (a one-token step under 512 cells), the split-KV path (one token, 512 cells or more) and a
batch of rows. Upstream summed V in an F16 accumulator: 4.6e-3 off on the first case, 3000x this bound.

Through the installed llama.cpp's own ggml (tests/ggml_flash_attn.py, in a process of its own).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("n_kv", "rows", "seed"), [
    (300, 1, 0),  # a one-token step, one chunk a row
    (2000, 1, 1),  # a one-token step over a long context: the cells split between the threads
    (300, 4, 2),  # four streams' tokens in one step
    (77, 3, 3),  # cells not a multiple of the 64-cell blocks
])
def test_flash_attention_over_f16_is_float32_accurate(n_kv: int, rows: int, seed: int) -> None:
    done = subprocess.run([sys.executable, "-m", "tests.ggml_flash_attn", str(n_kv), str(rows), str(seed)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["max_error"] <= 1e-5 * result["max_magnitude"], result
