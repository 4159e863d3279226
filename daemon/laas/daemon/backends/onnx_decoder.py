"""One ONNX decoder session and its KV cache, preallocated once and updated in place.

Layer: infrastructure (onnxruntime + numpy). The graph (see laas.exporters.fuse) runs
GroupQueryAttention in every layer; its `past_key_values.*` inputs and `present.*` outputs are bound,
through one IO binding made at load, to the same onnxruntime buffers of the full context length. Each
step then writes only the new positions into the cache: nothing is re-allocated or copied per token.
Only `input_ids`, the two int32 lengths and the logits change between steps.

Not thread-safe: one generation (or one evaluation) drives a decoder at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from laas.core.errors import ModelLoadError, OutOfRange
from laas.daemon.onnx_package import DecoderShape

PREFILL_CHUNK = 256  # prompt tokens per forward pass: bounds the logits a long prompt allocates


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OnnxDecoder:
    def __init__(self, session: Any, shape: DecoderShape, max_length: int) -> None:
        import onnxruntime as ort

        self.session = session
        self.shape = shape
        self.max_length = max_length
        names = {i.name for i in session.get_inputs()}
        expected = {"input_ids", "seqlens_k", "total_sequence_length", "past_key_values.0.key"}
        if not expected <= names:
            raise ModelLoadError(f"the graph lacks the inputs of laas' decoder layout: {sorted(expected - names)}")
        self._binding = session.io_binding()
        # logits is bound first, so it is output 0 whatever is re-bound to it later.
        self._step_logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, shape.vocab_size), np.float32, "cpu", 0)
        self._binding.bind_ortvalue_output("logits", self._step_logits)
        cache_shape = (1, shape.num_kv_heads, max_length, shape.head_dim)
        self._cache = []  # keeps the buffers alive for the binding
        for layer in range(shape.num_layers):
            for kind in ("key", "value"):
                buffer = ort.OrtValue.ortvalue_from_shape_and_type(cache_shape, np.float32, "cpu", 0)
                self._cache.append(buffer)
                self._binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", buffer)
                self._binding.bind_ortvalue_output(f"present.{layer}.{kind}", buffer)

    @classmethod
    def open(cls, graph: Path, shape: DecoderShape, max_length: int, threads: int) -> OnnxDecoder:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(graph), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own (non-exported) exception types
            raise ModelLoadError(f"onnxruntime cannot load {graph.parent.name}/{graph.name}: {e}") from e
        return cls(session, shape, max_length)

    def forward(self, tokens: Sequence[int], position: int) -> npt.NDArray[np.float32]:
        """Runs `tokens` placed at `position` (the cache holds positions before it); logits [n, vocab]."""
        n = len(tokens)
        if n == 0 or position < 0 or position + n > self.max_length:
            raise OutOfRange(f"positions {position}..{position + n} exceed the context of {self.max_length} tokens")
        b = self._binding
        b.bind_cpu_input("input_ids", np.asarray(tokens, dtype=np.int64).reshape(1, n))
        b.bind_cpu_input("seqlens_k", np.array([position + n - 1], dtype=np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(position + n, dtype=np.int32))
        if n == 1:
            b.bind_ortvalue_output("logits", self._step_logits)
        else:
            b.bind_output("logits", "cpu")
        self.session.run_with_iobinding(b)
        out = self._step_logits if n == 1 else b.get_outputs()[0]
        logits: npt.NDArray[np.float32] = out.numpy().reshape(n, -1)
        return logits

    def prefill(self, tokens: Sequence[int], chunk: int = PREFILL_CHUNK) -> npt.NDArray[np.float32]:
        """Runs a prompt from position 0, in chunks; the logits of its last position."""
        last: npt.NDArray[np.float32] | None = None
        for start in range(0, len(tokens), chunk):
            last = self.forward(tokens[start:start + chunk], start)[-1]
        if last is None:
            raise OutOfRange("the prompt is empty")
        return last

    def all_logits(self, tokens: Sequence[int], chunk: int = PREFILL_CHUNK) -> npt.NDArray[np.float32]:
        """Logits at every position of `tokens` (from position 0): what perplexity needs."""
        parts = [self.forward(tokens[s:s + chunk], s) for s in range(0, len(tokens), chunk)]
        return np.concatenate(parts, axis=0)
