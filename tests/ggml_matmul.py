"""A Q4_1 matrix times a batch, through the installed llama.cpp's own ggml, against one column at a time.

Run as a script (in a process of its own: ggml's CPU threads stay out of the test runner):
  python tests/ggml_matmul.py K ROWS COLS [SEED]
prints one JSON object: whether the batched product is bit for bit the one-column products (on x86 with
AVX2, ggml takes two rows by two columns at a time, a chunk's odd last column alone: laas' patch,
packaging/patches/ggml-cpu-q4_1-dot-2x2-x86.patch; a one-column product always takes one by one), and
the largest error of the batched product against float64 over the dequantized weights.
"""

from __future__ import annotations

import ctypes
import json
import sys

import numpy as np

from laas.daemon.backends import llama_lib

GGML_TYPE_F32, GGML_TYPE_Q4_1 = 0, 3
Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])  # 32 weights: d * q + m, q in 0..15


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """ggml's base and CPU libraries, the very copies llama.cpp loaded (a wheel holds copies, not links)."""
    llama_lib.init_backends()
    base_path, cpu_path = llama_lib._loaded("libggml-base.so"), llama_lib._loaded("libggml-cpu")
    if base_path is None or cpu_path is None:
        raise SystemExit(f"llama.cpp's ggml libraries are not loaded (base {base_path}, cpu {cpu_path})")
    base, cpu = ctypes.CDLL(str(base_path)), ctypes.CDLL(str(cpu_path))
    vp = ctypes.c_void_p
    for name, res, args in (("ggml_init", vp, [_InitParams]), ("ggml_free", None, [vp]),
                            ("ggml_new_tensor_2d", vp, [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
                            ("ggml_get_data", vp, [vp]), ("ggml_nbytes", ctypes.c_size_t, [vp]),
                            ("ggml_mul_mat", vp, [vp, vp, vp]), ("ggml_new_graph", vp, [vp]),
                            ("ggml_build_forward_expand", None, [vp, vp])):
        getattr(base, name).restype, getattr(base, name).argtypes = res, args
    cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
    cpu.ggml_cpu_init()
    return base, cpu


def dequantize(blocks: np.ndarray) -> np.ndarray:
    """(rows, K/32) Q4_1 blocks -> (rows, K) float64 weights."""
    low, high = blocks["qs"] & 0x0F, blocks["qs"] >> 4  # a block's weights 0..15 in the low nibbles, 16..31 high
    q = np.concatenate([low, high], axis=-1).astype(np.float64)
    w = blocks["d"].astype(np.float64)[..., None] * q + blocks["m"].astype(np.float64)[..., None]
    return w.reshape(blocks.shape[0], -1)


def run(k: int, rows: int, cols: int, seed: int = 0) -> dict[str, object]:
    base, cpu = _libraries()
    rng = np.random.default_rng(seed)
    blocks = np.zeros((rows, k // 32), dtype=Q4_1_BLOCK)
    blocks["d"] = rng.uniform(1e-3, 2e-2, blocks.shape)
    blocks["m"] = rng.uniform(-0.15, 0.0, blocks.shape)
    blocks["qs"] = rng.integers(0, 256, blocks["qs"].shape)
    x = rng.standard_normal((cols, k)).astype(np.float32)
    ctx = base.ggml_init(_InitParams(64 << 20, None, False))
    try:
        w = base.ggml_new_tensor_2d(ctx, GGML_TYPE_Q4_1, k, rows)
        assert base.ggml_nbytes(w) == blocks.nbytes
        ctypes.memmove(base.ggml_get_data(w), blocks.ctypes.data, blocks.nbytes)

        def product(columns: np.ndarray) -> np.ndarray:
            a = base.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, columns.shape[0])
            ctypes.memmove(base.ggml_get_data(a), np.ascontiguousarray(columns).ctypes.data, columns.nbytes)
            y = base.ggml_mul_mat(ctx, w, a)
            graph = base.ggml_new_graph(ctx)
            base.ggml_build_forward_expand(graph, y)
            if cpu.ggml_graph_compute_with_ctx(ctx, graph, 2) != 0:
                raise SystemExit("ggml_graph_compute_with_ctx failed")
            out = (ctypes.c_float * (rows * columns.shape[0])).from_address(base.ggml_get_data(y))
            return np.ctypeslib.as_array(out).reshape(columns.shape[0], rows).copy()

        batched = product(x)
        single = np.concatenate([product(x[c:c + 1]) for c in range(cols)])
    finally:
        base.ggml_free(ctx)
    exact = x.astype(np.float64) @ dequantize(blocks).T
    return {"identical": bool(np.array_equal(batched.view(np.uint32), single.view(np.uint32))),
            "max_error": float(np.max(np.abs(batched - exact))), "max_magnitude": float(np.max(np.abs(exact))),
            "cpu_backend": llama_lib.cpu_backend_in_use()}


if __name__ == "__main__":
    k, rows, cols, *rest = (int(a) for a in sys.argv[1:])
    print(json.dumps(run(k, rows, cols, *rest)))
