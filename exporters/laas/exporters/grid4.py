"""int4 weights that are already on a 4-bit grid (a GGUF Q4_0/Q4_1 source), packed without rounding twice.

Layer: exporters (onnx + numpy). transformers dequantizes a Q4_1 GGUF block of 32 weights to
`m + d * q` (q in 0..15). Re-quantizing those floats with a symmetric or integer-zero-point int4 grid
rounds every weight a second time, which costs a small model as much again as the first quantization.
Instead, when every block of a weight is exactly `m + d * q`, this writes the same q and d into a
`MatMulNBits` (zero point 0) and adds the per-block offsets back with one small MatMul over the block sums
of the input: `X @ W = MatMulNBits(X; q, d) + blocksum(X) @ M`. The int4 result then computes what the
GGUF file holds, with onnxruntime's int4 kernels. Weights that are not on such a grid are left to
onnxruntime's MatMulNBitsQuantizer.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
OFFSET_SUFFIX = "_G4Offset"  # the float MatMuls of block offsets: no quantizer may touch them


def is_offset(node_name: str) -> bool:
    return node_name.endswith(OFFSET_SUFFIX)


def grid_of(weight: npt.NDArray[np.float32], block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(q uint8 [N, K], d [N, K/block], m [N, K/block]) when `weight` [K, N] is exactly m + d*q per block
    along K, else None."""
    k, n = weight.shape
    if k % block:
        return None
    w = weight.T.reshape(n, k // block, block).astype(np.float64)
    low = w.min(axis=2)
    scale = (w.max(axis=2) - low) / 15.0
    safe = np.where(scale > 0, scale, 1.0)
    q = np.rint((w - low[..., None]) / safe[..., None])
    if q.min() < 0 or q.max() > 15:
        return None
    error = np.abs(low[..., None] + scale[..., None] * q - w).max()
    if error > 1e-6 * max(float(np.abs(w).max()), 1e-12):
        return None
    return q.astype(np.uint8).reshape(n, k), scale.astype(np.float32), low.astype(np.float32)


def pack(q: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits' B layout: [N, K/block, block/2] bytes, two weights a byte, the lower index low."""
    n, k = q.shape
    pairs = q.reshape(n, k // block, block // 2, 2)
    packed: np.ndarray = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    return packed


def replace_on_grid(model: onnx.ModelProto, block: int, *, skip: set[str], accuracy_level: int = 4) -> set[str]:
    """Rewrites every MatMul whose constant weight lies on a 4-bit grid; returns the names it rewrote."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    done: set[str] = set()
    blocksums: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or node.name in skip or len(weight.dims) != 2:
            nodes.append(node)
            continue
        grid = grid_of(numpy_helper.to_array(weight), block)
        if grid is None:
            nodes.append(node)
            continue
        q, d, m = grid
        k, n = weight.dims
        base = node.input[1]
        graph.initializer.extend([
            numpy_helper.from_array(pack(q, block), f"{base}_G4"),
            numpy_helper.from_array(d.reshape(-1), f"{base}_G4_scales"),
            numpy_helper.from_array(np.zeros(n * ((k // block + 1) // 2), np.uint8), f"{base}_G4_zero"),
            numpy_helper.from_array(np.ascontiguousarray(m.T), f"{base}_G4_offsets"),
        ])
        x = node.input[0]
        if x not in blocksums:  # q, k and v (gate and up) read one input: sum its blocks once
            blocksums[x] = f"{node.name}_blocksum"
            shape = f"{node.name}_blockshape"
            graph.initializer.append(numpy_helper.from_array(np.array([0, 0, k // block, block], np.int64), shape))
            axes = f"{node.name}_blockaxes"
            graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
            nodes += [
                helper.make_node("Reshape", [x, shape], [f"{node.name}_blocks"], name=f"{node.name}_Blocks"),
                helper.make_node("ReduceSum", [f"{node.name}_blocks", axes], [blocksums[x]], keepdims=0,
                                 name=f"{node.name}_BlockSum"),
            ]
        y = node.output[0]
        nodes += [
            helper.make_node("MatMulNBits", [x, f"{base}_G4", f"{base}_G4_scales", f"{base}_G4_zero"],
                             [f"{y}_grid"], name=f"{node.name}_G4", domain=MS_DOMAIN, K=k, N=n, bits=4,
                             block_size=block, accuracy_level=accuracy_level),
            helper.make_node("MatMul", [blocksums[x], f"{base}_G4_offsets"], [f"{y}_offset"],
                             name=f"{node.name}{OFFSET_SUFFIX}"),
            helper.make_node("Add", [f"{y}_grid", f"{y}_offset"], [y], name=f"{node.name}_G4Add"),
        ]
        done.add(node.name)
    set_nodes(graph, nodes)
    return done


def set_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Makes `nodes` the graph's nodes, and drops the initializers none of them reads any more."""
    used = {i for n in nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
