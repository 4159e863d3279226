"""Sibling projections merged: MatMuls that read one input become one MatMul and a Split.

Layer: exporters (onnx + numpy, build time only). A decoder layer multiplies one normalized input by the
q, k and v weights, and another by the gate and up weights: five small products where two wider ones
compute the same. For a decode step (one row) each product costs mostly its own overhead, so one
onnxruntime node over the weights concatenated along N, split after, is faster; onnxruntime-genai's model
builder writes q/k/v as one node for this reason.

The int4 package applies it before quantizing (quantize.py): int4 blocks run along K, one column at a time,
so the concatenated weight quantizes to exactly the blocks each weight had alone. It is not applied to the
int8 package, whose weights are quantized per tensor: one scale for q, k and v together would round them
differently.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import helper, numpy_helper

from laas.exporters.grid4 import set_nodes


def merge_siblings(model: onnx.ModelProto, *, skip: Collection[str] = ()) -> int:
    """Rewrites `model` in place; returns how many groups it merged. A group is every MatMul (outside
    `skip`) whose first input is the same tensor and whose weight is a constant 2-D initializer."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if (node.op_type == "MatMul" and len(node.input) == 2 and node.name not in skip
                and node.input[1] in inits and len(inits[node.input[1]].dims) == 2):
            groups.setdefault(node.input[0], []).append(node)
    merged = {id(n): members for members in groups.values() if len(members) > 1 for n in members}
    if not merged:
        return 0
    count = 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        members = merged.get(id(node))
        if members is None:
            nodes.append(node)
            continue
        if node is not members[0]:
            continue  # written with the group's first member
        nodes += _merge(graph, members, [numpy_helper.to_array(inits[m.input[1]]) for m in members])
        count += 1
    set_nodes(graph, nodes)
    return count


def _merge(graph: onnx.GraphProto, members: list[onnx.NodeProto], weights: list[np.ndarray]) -> list[onnx.NodeProto]:
    first = members[0]
    name = f"{first.name}/Merged{len(members)}"
    weight = np.ascontiguousarray(np.concatenate(weights, axis=1))
    sizes = np.array([w.shape[1] for w in weights], np.int64)
    graph.initializer.extend([numpy_helper.from_array(weight, f"{name}.weight"),
                              numpy_helper.from_array(sizes, f"{name}.sizes")])
    product = f"{name}_output_0"
    return [
        helper.make_node("MatMul", [first.input[0], f"{name}.weight"], [product], name=name),
        helper.make_node("Split", [product, f"{name}.sizes"], [m.output[0] for m in members], axis=-1,
                         name=f"{name}/Split"),
    ]
