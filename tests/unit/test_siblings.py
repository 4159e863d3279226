"""The sibling-projection merge (exporters/siblings.py): the same products from fewer nodes, and int4
blocks that quantize to exactly what each weight had alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from laas.exporters.grid4 import replace_on_grid
from laas.exporters.siblings import merge_siblings

K, BLOCK = 64, 32


def _grid_weight(rng: np.random.Generator, n: int) -> np.ndarray:
    """A [K, n] weight on a Q4_1 grid: m + d*q in every block of 32 along K."""
    q = rng.integers(0, 16, (n, K // BLOCK, BLOCK))
    q[..., 0], q[..., 1] = 0, 15  # as in llama.cpp's Q4_1: a block's least and greatest weights set m and d
    d = rng.uniform(0.01, 0.05, (n, K // BLOCK, 1))
    m = rng.uniform(-0.4, -0.1, (n, K // BLOCK, 1))
    return (m + d * q).reshape(n, K).T.astype(np.float32)


def _graph(widths: dict[str, int], rng: np.random.Generator) -> onnx.ModelProto:
    """x -> q, k, v (one input) and x2 -> o: three siblings and a lone MatMul."""
    nodes, inits, outputs = [], [], []
    for name, n in widths.items():
        x = "x2" if name == "o" else "x"
        inits.append(numpy_helper.from_array(_grid_weight(rng, n), f"{name}.weight"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [name], name=f"/{name}_proj/MatMul"))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, None, n]))
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, None, K]) for x in ("x", "x2")]
    graph = helper.make_graph(nodes, "siblings", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, feed))


def _feed(rng: np.random.Generator, rows: int = 3) -> dict[str, np.ndarray]:
    return {x: rng.standard_normal((1, rows, K)).astype(np.float32) for x in ("x", "x2")}


def test_siblings_become_one_matmul_and_a_split_with_the_same_products() -> None:
    rng = np.random.default_rng(1)
    model = _graph({"q": 48, "k": 16, "v": 16, "o": 32}, rng)
    feed = _feed(rng)
    before = _run(model, feed)
    assert merge_siblings(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Split") == 1  # q/k/v merged, o left alone
    assert {t.name for t in model.graph.initializer} == {"o.weight", "/q_proj/MatMul/Merged3.weight",
                                                         "/q_proj/MatMul/Merged3.sizes"}
    for a, b in zip(before, _run(model, feed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_skipped_nodes_and_lone_matmuls_are_left_as_they_were() -> None:
    rng = np.random.default_rng(2)
    model = _graph({"q": 16, "k": 16, "o": 16}, rng)
    assert merge_siblings(model, skip={"/k_proj/MatMul"}) == 0
    assert [n.op_type for n in model.graph.node] == ["MatMul"] * 3


def test_a_merged_int4_weight_keeps_every_block_of_the_grid() -> None:
    """Blocks run along K, so each column's q, d and m are the ones it had alone: the merged MatMulNBits
    computes what the three separate ones did."""
    rng = np.random.default_rng(3)
    separate = _graph({"q": 48, "k": 16, "v": 16, "o": 32}, rng)
    merged = onnx.ModelProto()
    merged.CopyFrom(separate)
    merge_siblings(merged)
    feed = _feed(rng, rows=1)
    reference = _run(separate, feed)
    for model, count in ((separate, 4), (merged, 2)):
        assert len(replace_on_grid(model, BLOCK, skip=set())) == count  # every weight is on the grid
    ops = [n.op_type for n in merged.graph.node]
    assert ops.count("MatMulNBits") == 2  # q/k/v as one, o
    alone, together = _run(separate, feed), _run(merged, feed)
    for a, b, ref in zip(alone, together, reference, strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - ref).max() < 0.05 * np.abs(ref).max()  # int8 compute of the activations
