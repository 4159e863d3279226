"""Flash attention over F16 K and V, through the installed llama.cpp's own ggml, against float64.

Run as a script (in a process of its own: ggml's CPU threads stay out of the test runner):
  python -m tests.ggml_flash_attn N_KV ROWS [SEED]   (from the repository root)
prints one JSON object: the largest error of ggml_flash_attn_ext (ROWS query rows, 9 heads over 3 KV
heads of 64, the default model's shape, N_KV cells of F16 K and V, no mask, 2 threads) against float64
attention over the same F16 values (Q rounded to F16 as ggml rounds it for the dot), and the largest
output magnitude.
laas' patch (packaging/patches/ggml-cpu-flash-attn-f16-blocks.patch) sums V in F32, not F16.
"""

from __future__ import annotations

import ctypes
import json
import sys

import numpy as np

from tests.ggml_matmul import _InitParams, _libraries

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
HEADS, KV_HEADS, D = 9, 3, 64


def run(n_kv: int, rows: int, seed: int = 0) -> dict[str, object]:
    base, cpu = _libraries()
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    base.ggml_new_tensor_3d.restype, base.ggml_new_tensor_3d.argtypes = vp, [vp, ctypes.c_int, i64, i64, i64]
    base.ggml_flash_attn_ext.restype = vp
    base.ggml_flash_attn_ext.argtypes = [vp, vp, vp, vp, vp, ctypes.c_float, ctypes.c_float, ctypes.c_float]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((HEADS, rows, D)).astype(np.float32)
    k = (rng.standard_normal((KV_HEADS, n_kv, D)) * 2).astype(np.float16)
    v = rng.standard_normal((KV_HEADS, n_kv, D)).astype(np.float16)
    scale = 1 / np.sqrt(D)
    ctx = base.ggml_init(_InitParams(256 << 20, None, False))

    def tensor(kind: int, values: np.ndarray) -> int:
        t: int = base.ggml_new_tensor_3d(ctx, kind, values.shape[2], values.shape[1], values.shape[0])
        ctypes.memmove(base.ggml_get_data(t), np.ascontiguousarray(values).ctypes.data, values.nbytes)
        return t

    def attention(queries: np.ndarray) -> np.ndarray:
        n = queries.shape[1]
        out = base.ggml_flash_attn_ext(ctx, tensor(GGML_TYPE_F32, queries), tensor(GGML_TYPE_F16, k),
                                       tensor(GGML_TYPE_F16, v), None, scale, 0.0, 0.0)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        if cpu.ggml_graph_compute_with_ctx(ctx, graph, 2) != 0:
            raise SystemExit("ggml_graph_compute_with_ctx failed")
        values = (ctypes.c_float * (n * HEADS * D)).from_address(base.ggml_get_data(out))
        return np.ctypeslib.as_array(values).reshape(n, HEADS, D).copy()  # res: [D, heads, rows]

    try:
        got = attention(q)
    finally:
        base.ggml_free(ctx)
    exact = np.empty((rows, HEADS, D))
    q16 = q.astype(np.float16).astype(np.float64)
    for h in range(HEADS):
        kh, vh = k[h // (HEADS // KV_HEADS)].astype(np.float64), v[h // (HEADS // KV_HEADS)].astype(np.float64)
        s = q16[h] @ kh.T * scale
        w = np.exp(s - s.max(axis=1, keepdims=True))
        exact[:, h] = (w / w.sum(axis=1, keepdims=True)) @ vh
    return {"max_error": float(np.max(np.abs(got - exact))), "max_magnitude": float(np.max(np.abs(exact)))}


if __name__ == "__main__":
    n_kv, rows, *rest = (int(a) for a in sys.argv[1:])
    print(json.dumps(run(n_kv, rows, *rest)))
