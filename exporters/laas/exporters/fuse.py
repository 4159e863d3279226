"""Rewrites an optimum decoder export so onnxruntime keeps the KV cache in place: GroupQueryAttention.

Layer: exporters (build time only; onnx + numpy, no torch). optimum's `text-generation-with-past` graph
concatenates the past keys/values with the new ones in every layer and returns the grown cache, so a
decoder loop re-allocates and copies the whole cache on every token. This pass replaces each layer's
attention (rotary embedding, cache concat, GQA head expansion, masked softmax) with one
`com.microsoft.GroupQueryAttention` node that applies the rotary embedding itself and, when the caller
binds `present.*` to the same buffers as `past_key_values.*` (the ONNX engine does, through IO binding),
writes the new position into a cache preallocated at its full length.

The fused graph takes `input_ids`, `seqlens_k` (tokens in the cache minus one, int32[batch]) and
`total_sequence_length` (int32 scalar) instead of `attention_mask` and `position_ids`.

Layers are found by the module paths the exporter writes into node names
(`/model/layers.N/self_attn/{q,k,v,o}_proj/MatMul`), which every Llama-family export has; a graph
without them is refused with :class:`FuseError` rather than served slowly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
_PROJ = re.compile(r"/model/layers\.(\d+)/self_attn/([qkvo])_proj/MatMul$")


class FuseError(ValueError):
    """The graph does not have the decoder layout this pass rewrites."""


def fuse_group_query_attention(model: onnx.ModelProto, *, num_heads: int, kv_num_heads: int, head_dim: int,
                               cos_cache: np.ndarray, sin_cache: np.ndarray) -> onnx.ModelProto:
    """Rewrites `model` in place (and returns it). cos/sin caches: float32 [max_positions, head_dim // 2]."""
    graph = model.graph
    projections: dict[int, dict[str, onnx.NodeProto]] = {}
    for node in graph.node:
        match = _PROJ.search(node.name)
        if match and node.op_type == "MatMul":
            projections.setdefault(int(match.group(1)), {})[match.group(2)] = node
    if not projections:
        raise FuseError("no decoder layers found (expected nodes named /model/layers.N/self_attn/q_proj/MatMul)")
    consumers = _consumers(graph.node)
    output_names = {o.name for o in graph.output}

    graph.initializer.extend([
        numpy_helper.from_array(cos_cache.astype(np.float32), "laas.cos_cache"),
        numpy_helper.from_array(sin_cache.astype(np.float32), "laas.sin_cache"),
    ])
    new_nodes = []
    for layer, proj in sorted(projections.items()):
        if set(proj) != {"q", "k", "v", "o"}:
            raise FuseError(f"layer {layer}: missing projections, found {sorted(proj)}")
        present_key, present_value = f"present.{layer}.key", f"present.{layer}.value"
        if present_key not in output_names or present_value not in output_names:
            raise FuseError(f"layer {layer}: the graph has no {present_key}/{present_value} outputs")
        q, k, v = (_with_bias(proj[p], consumers) for p in "qkv")
        attn_out = f"/model/layers.{layer}/self_attn/GroupQueryAttention_output_0"
        new_nodes.append(helper.make_node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", "seqlens_k",
             "total_sequence_length", "laas.cos_cache", "laas.sin_cache"],
            [attn_out, present_key, present_value],
            name=f"/model/layers.{layer}/self_attn/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(head_dim) ** -0.5,
        ))
        proj["o"].input[0] = attn_out
    # The old producers of present.* are now dead; drop every output name GQA takes over first.
    taken = {n for node in new_nodes for n in node.output}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in taken:
                node.output[i] = f"{name}.unfused"
    graph.node.extend(new_nodes)
    _fold_weight_transposes(graph)
    _replace_inputs(graph, kv_num_heads, head_dim)
    _prune(graph)
    _topological_sort(graph)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def _consumers(nodes: Iterable[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _with_bias(matmul: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> str:
    """The projection's output, after its bias Add when the model has attention biases."""
    users = consumers.get(matmul.output[0], [])
    if len(users) == 1 and users[0].op_type == "Add" and "_proj/Add" in users[0].name:
        return str(users[0].output[0])
    return str(matmul.output[0])


def _fold_weight_transposes(graph: onnx.GraphProto) -> None:
    """Stores transposed weights (a tied lm_head reads the embedding through a Transpose) as initializers,
    so the quantizers see a constant weight and quantize the largest matrix of a small model too."""
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = [int(p) for a in node.attribute if a.name == "perm" for p in a.ints] or None
            array = np.ascontiguousarray(np.transpose(numpy_helper.to_array(inits[node.input[0]]), perm))
            graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            node.output[0] = f"{node.output[0]}.folded"


def _replace_inputs(graph: onnx.GraphProto, kv_num_heads: int, head_dim: int) -> None:
    keep = [i for i in graph.input if i.name not in ("attention_mask", "position_ids")]
    for value in keep:
        if value.name.startswith("past_key_values."):
            dims = value.type.tensor_type.shape.dim
            dims[2].Clear()
            dims[2].dim_param = "max_sequence_length"
    keep += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    del graph.input[:]
    graph.input.extend(keep)
    for value in graph.output:
        if value.name.startswith("present."):
            dims = value.type.tensor_type.shape.dim
            dims[2].Clear()
            dims[2].dim_param = "max_sequence_length"


def _prune(graph: onnx.GraphProto) -> None:
    """Drops nodes, initializers and inputs nothing downstream of the outputs reads."""
    producer = {name: node for node in graph.node for name in node.output}
    needed: set[str] = set()
    live: list[onnx.NodeProto] = []
    seen: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            live.append(node)
            stack.extend(n for n in node.input if n)
    kept = [n for n in graph.node if id(n) in seen]
    del graph.node[:]
    graph.node.extend(kept)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in needed or i.name in ("seqlens_k", "total_sequence_length")]
    del graph.input[:]
    graph.input.extend(inputs)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _topological_sort(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise FuseError("the rewritten graph has a cycle or a dangling input")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    del graph.node[:]
    graph.node.extend(ordered)
