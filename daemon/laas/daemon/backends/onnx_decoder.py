"""One ONNX decoder session and its KV cache: `rows` sequences of the full context, preallocated once and
updated in place.

Layer: infrastructure (onnxruntime + numpy). The graph (see laas.exporters.fuse) runs
GroupQueryAttention in every layer; its `past_key_values.*` inputs and `present.*` outputs are bound to
the same buffers, so each step writes only the new positions into the cache: nothing is re-allocated or
copied per token. Only `input_ids`, the int32 lengths and the logits change between steps.

The cache of each layer is one numpy array [rows, kv_heads, context, head_dim], and the IO bindings see
parts of it without a copy: one binding per row runs a single sequence (a prompt chunk, or a lone
sequence's next token), and one per count n runs the next token of the sequences in rows 0..n-1 at once
(GroupQueryAttention takes each row's own length). The scheduler (onnx_batching.py) keeps the decoding
sequences in the first rows (`swap`).

Not thread-safe: one thread (the scheduler's, or one evaluation) drives a decoder at a time.
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
    def __init__(self, session: Any, shape: DecoderShape, max_length: int, rows: int = 1) -> None:
        self.session = session
        self.shape = shape
        self.max_length = max_length
        self.rows = rows
        names = {i.name for i in session.get_inputs()}
        expected = {"input_ids", "seqlens_k", "total_sequence_length", "past_key_values.0.key"}
        if not expected <= names:
            raise ModelLoadError(f"the graph lacks the inputs of laas' decoder layout: {sorted(expected - names)}")
        # calloc'd: a row's pages are committed as its sequences reach them
        cache_shape = (rows, shape.num_kv_heads, max_length, shape.head_dim)
        self._cache = [np.zeros(cache_shape, np.float32) for _ in range(2 * shape.num_layers)]
        self._row_bindings: dict[int, tuple[Any, Any]] = {}  # row -> (binding, its one-token logits)
        self._batch_bindings: dict[int, tuple[Any, Any]] = {}  # n -> (binding of rows 0..n-1, their logits)

    def _bind(self, rows: slice, logits: Any) -> Any:
        import onnxruntime as ort

        binding = self.session.io_binding()
        # logits is bound first, so it is output 0 whatever is re-bound to it later.
        binding.bind_ortvalue_output("logits", logits)
        for index, buffer in enumerate(self._cache):
            name = f"{index // 2}.{'key' if index % 2 == 0 else 'value'}"
            view = ort.OrtValue.ortvalue_from_numpy(buffer[rows])  # the array's memory, not a copy
            binding.bind_ortvalue_input(f"past_key_values.{name}", view)
            binding.bind_ortvalue_output(f"present.{name}", view)
        return binding

    def _logits(self, n: int) -> Any:
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type((n, 1, self.shape.vocab_size), np.float32, "cpu", 0)

    def _row(self, row: int) -> tuple[Any, Any]:
        bound = self._row_bindings.get(row)
        if bound is None:
            if not 0 <= row < self.rows:
                raise OutOfRange(f"row {row}: the cache has {self.rows}")
            logits = self._logits(1)
            bound = self._row_bindings[row] = (self._bind(slice(row, row + 1), logits), logits)
        return bound

    @classmethod
    def open(cls, graph: Path, shape: DecoderShape, max_length: int, threads: int, rows: int = 1) -> OnnxDecoder:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(graph), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own (non-exported) exception types
            raise ModelLoadError(f"onnxruntime cannot load {graph.parent.name}/{graph.name}: {e}") from e
        return cls(session, shape, max_length, rows)

    def forward(self, tokens: Sequence[int], position: int, row: int = 0) -> npt.NDArray[np.float32]:
        """Runs `tokens` placed at `position` of `row` (the row holds the positions before it); logits
        [n, vocab]."""
        n = len(tokens)
        if n == 0 or position < 0 or position + n > self.max_length:
            raise OutOfRange(f"positions {position}..{position + n} exceed the context of {self.max_length} tokens")
        b, step_logits = self._row(row)
        b.bind_cpu_input("input_ids", np.asarray(tokens, dtype=np.int64).reshape(1, n))
        b.bind_cpu_input("seqlens_k", np.array([position + n - 1], dtype=np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(position + n, dtype=np.int32))
        if n == 1:
            b.bind_ortvalue_output("logits", step_logits)
        else:
            b.bind_output("logits", "cpu")
        self.session.run_with_iobinding(b)
        out = step_logits if n == 1 else b.get_outputs()[0]
        logits: npt.NDArray[np.float32] = out.numpy().reshape(n, -1)
        return logits

    def decode(self, tokens: Sequence[int], positions: Sequence[int]) -> npt.NDArray[np.float32]:
        """The next token of the sequences in rows 0..n-1, row i's at `positions[i]`; logits [n, vocab]."""
        n = len(tokens)
        if n == 1:
            return self.forward(tokens, positions[0])
        if not 0 < n <= self.rows or len(positions) != n:
            raise OutOfRange(f"{n} tokens for {len(positions)} positions in a cache of {self.rows} rows")
        if min(positions) < 0 or max(positions) >= self.max_length:
            raise OutOfRange(f"positions {min(positions)}..{max(positions)} exceed the context of "
                             f"{self.max_length} tokens")
        bound = self._batch_bindings.get(n)
        if bound is None:
            buffer = self._logits(n)
            bound = self._batch_bindings[n] = (self._bind(slice(0, n), buffer), buffer)
        b, out = bound
        b.bind_cpu_input("input_ids", np.asarray(tokens, dtype=np.int64).reshape(n, 1))
        b.bind_cpu_input("seqlens_k", np.asarray(positions, dtype=np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(max(positions) + 1, dtype=np.int32))
        self.session.run_with_iobinding(b)
        logits: npt.NDArray[np.float32] = out.numpy().reshape(n, -1)
        return logits

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchanges the first `length` positions of rows `a` and `b` in every layer's cache."""
        if a == b or length <= 0:
            return
        for buffer in self._cache:
            held = buffer[a, :, :length].copy()
            buffer[a, :, :length] = buffer[b, :, :length]
            buffer[b, :, :length] = held

    def all_logits(self, tokens: Sequence[int], chunk: int = PREFILL_CHUNK) -> npt.NDArray[np.float32]:
        """Logits at every position of `tokens` (from position 0 of row 0): what perplexity needs."""
        parts = [self.forward(tokens[s:s + chunk], s) for s in range(0, len(tokens), chunk)]
        return np.concatenate(parts, axis=0)
