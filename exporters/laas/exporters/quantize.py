"""onnxruntime quantization of an fp32 package graph: dynamic int8, and int4 weight-only (MatMulNBits).

Layer: exporters (onnx + onnxruntime.quantization; no torch). Both read the fused fp32 graph and write a
new package folder beside it with the same tokenizer and metadata files. Measured on SmolLM2-135M, what
each choice below keeps is in the README's benchmark section.

- The output head (lm_head; tied to the embedding in small models) gets 8-bit weight-only blocks in both:
  it is the largest matrix of a small model and the most sensitive one (llama.cpp keeps it at Q8_0 too).
- int8: `quantize_dynamic`, signed int8 weights per tensor and activations quantized at run time
  (onnxruntime fuses these into DynamicQuantizeMatMul) for the attention and gate/up projections. The
  MLP's down projection reads activations with outliers that one per-tensor activation scale cannot hold
  (+50% perplexity when quantized so), so it gets 8-bit weight-only blocks like the head.
- int4: weights in blocks of `block_size` along the input dimension, one scale per block (symmetric), run
  by MatMulNBits with int8 compute (accuracy_level 4: onnxruntime's fast path on AVX2/AVX-512 VNNI).
  Weights already on a 4-bit grid (a GGUF Q4 source) keep that grid exactly (grid4.py) instead of being
  rounded a second time. Projections that read one input (q/k/v, gate/up) are first merged into one
  MatMul (siblings.py): fewer, wider int4 products, and the same blocks. The embedding table becomes a
  4-bit GatherBlockQuantized (SmolLM2: 231 -> 135 MB for +1.2 points of perplexity).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from laas.exporters.deps import require
from laas.exporters.errors import ExportError
from laas.exporters.export import GRAPH, copy_aux, save_graph

BLOCK_SIZES = (16, 32, 64, 128, 256)
HEAD_BLOCK = 32


def quantization_label(kind: str, block_size: int = 32) -> str:
    return f"int4-b{block_size}" if kind == "int4" else kind


def _head(model: Any) -> str | None:
    """The MatMul that produces the logits."""
    return next((n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output), None)


def _weight_only(model: Any, bits: int, block_size: int, *, only: Callable[[str], bool], symmetric: bool = True,
                 accuracy_level: int = 4, op_types: tuple[str, ...] = ("MatMul",)) -> Any:
    """MatMulNBits for the MatMuls `only` accepts, or GatherBlockQuantized for constant Gathers (the
    embedding) with op_types ("Gather",): onnxruntime's quantizer, round to nearest."""
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer")
    q = require("onnxruntime.quantization")
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and not only(n.name)]
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits,
                                                accuracy_level=accuracy_level, quant_format=q.QuantFormat.QOperator,
                                                op_types_to_quantize=op_types)
    quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
    _quiet(quantizer.process)
    return quantizer.model.model


def quantize_int8(fp32: Path, dest: Path) -> Path:
    onnx = require("onnx")
    q = require("onnxruntime.quantization")
    model = onnx.load(str(fp32 / GRAPH))
    head = _head(model)
    model = _weight_only(model, 8, HEAD_BLOCK, only=lambda name: name == head or "down_proj" in name)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=dest.parent) as tmp:
        save_graph(model, Path(tmp))
        out = Path(tmp) / "dynamic" / GRAPH
        out.parent.mkdir()
        _quiet(lambda: q.quantize_dynamic(
            str(Path(tmp) / GRAPH), str(out), weight_type=q.QuantType.QInt8, op_types_to_quantize=["MatMul"],
            per_channel=False, use_external_data_format=True,
            # GroupQueryAttention's outputs have no type in ONNX's shape inference: they are float.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}))
        save_graph(onnx.load(str(out)), dest)
    copy_aux(fp32, dest)
    return dest


def quantize_int4(fp32: Path, dest: Path, *, block_size: int = 32) -> Path:
    if block_size not in BLOCK_SIZES:
        raise ExportError(f"block size {block_size} is not one of {BLOCK_SIZES}")
    onnx = require("onnx")
    from laas.exporters.grid4 import is_offset, replace_on_grid
    from laas.exporters.siblings import merge_siblings

    model = onnx.load(str(fp32 / GRAPH))
    head = _head(model)
    merge_siblings(model, skip={head} if head else set())
    model = _weight_only(model, 8, HEAD_BLOCK, only=lambda name: name == head)
    replace_on_grid(model, block_size, skip={head} if head else set())
    model = _weight_only(model, 4, block_size, only=lambda name: name != head and not is_offset(name))
    model = _weight_only(model, 4, block_size, only=lambda name: False, op_types=("Gather",))  # the embedding
    dest.mkdir(parents=True, exist_ok=True)
    save_graph(model, dest)
    copy_aux(fp32, dest)
    return dest


def _quiet(step: Callable[[], object]) -> None:
    """onnxruntime's quantizers log a line per node at INFO; keep the progress output readable."""
    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        step()
    finally:
        logger.setLevel(level)
