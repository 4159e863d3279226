"""laas' patch to llama.cpp's CPU kernels (packaging/patches/ggml-cpu-q4_1-dot-2x2-x86.patch): the installed
build carries it, and a Q4_1 matrix times a batch comes out bit for bit as one column at a time, which is what
keeps batched decoding's answers those of upstream's kernel.

Through the installed llama.cpp's own ggml (tests/ggml_matmul.py, in a process of its own), with shapes
that take the two-by-two path (even rows and columns: a batch of 2, 4 or 6 sequences), odd batches (3
sequences, a prompt of 33 tokens: two by two but for the last column of a chunk), and rows that are not a
multiple of ggml's 16-row blocks.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from laas.daemon.backends.llama_lib import BUILD_STAMP
from laas.daemon.native_build import native_build, patches_in, this_machine

ROOT = Path(__file__).resolve().parents[2]
PATCHES = ROOT / "packaging" / "patches"


def _matmul(k: int, rows: int, cols: int, seed: int) -> dict[str, object]:
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "ggml_matmul.py"), str(k), str(rows), str(cols),
                           str(seed)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_installed_llama_cpp_is_built_with_laas_patches() -> None:
    # setup.sh stamps the venv with the key of the build it installed; the key covers the patches' digests.
    version = importlib.metadata.version("llama-cpp-python")
    machine, flags, _ = this_machine()
    patches = patches_in(PATCHES)
    assert [p.name for p in patches] == ["ggml-cpu-flash-attn-f16-blocks.patch", "ggml-cpu-q4_1-dot-2x2-x86.patch"]
    patched = replace(native_build(machine, flags), patches=patches)
    installed = (Path(sys.prefix) / BUILD_STAMP).read_text().split()[0]
    assert installed == patched.key(version)
    assert installed != native_build(machine, flags).key(version)


@pytest.mark.parametrize(("k", "rows", "cols", "seed"), [
    (576, 1536, 4, 0),  # the default model's MLP up-projection, four sequences
    (1536, 576, 2, 1),  # its down-projection, two
    (576, 50, 6, 2),  # rows not a multiple of 16, six
    (576, 64, 3, 3),  # an odd batch: two by two, the last column alone
    (576, 1536, 33, 4),  # a prompt: chunks of 16 columns, the last of one
])
def test_a_q4_1_batch_is_bit_for_bit_one_column_at_a_time(k: int, rows: int, cols: int, seed: int) -> None:
    result = _matmul(k, rows, cols, seed)
    assert result["identical"] is True, result
    # And right, not merely consistent: within the activations' 8-bit quantization of the float64 product.
    assert isinstance(result["max_error"], float) and isinstance(result["max_magnitude"], float)
    assert result["max_error"] <= 0.02 * result["max_magnitude"], result
    if platform.machine() == "x86_64":
        assert result["cpu_backend"] == "built in"  # the venv's native build, not a portable variant
