"""The ONNX embedding engine: a laas embedding package (a sentence encoder) served by onnxruntime.

Layer: infrastructure (onnxruntime, tokenizers, numpy). One Embed call's inputs are tokenized (the
special tokens the tokenizer's post-processor adds, as sentence-transformers does), sorted by length and
run in batches of up to BATCH inputs, each padded to its longest input only; pooling reads the attention
mask, so padding changes no vector. The work runs in a worker thread under a NativeClaims claim
(onnxruntime releases the GIL); concurrent calls are bounded by the model's queue (registry.queued), so at
most `parallel` batches run at once. It cannot generate text: Generate and Chat get FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from laas.core.errors import InvalidArgument, ModelLoadError, OutOfRange
from laas.core.types import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResult,
    ModelFormat,
    ModelInfo,
)
from laas.daemon.backends.compute_gate import ComputeGate
from laas.daemon.backends.embedding_engine import EmbeddingEngine
from laas.daemon.backends.onnx_decoder import session_options
from laas.daemon.backends.pooling import check_dimensions, finish, pool
from laas.daemon.backends.worker import NativeClaims
from laas.daemon.onnx_package import EmbeddingSpec, Manifest, read_manifest, verify_files

BATCH = 32  # inputs per forward pass: sorted by length, so each batch pads little


class OnnxEmbeddingEngine(EmbeddingEngine):
    """Serves one embedding package. Construct with :meth:`load`."""

    def __init__(self, folder: Path, manifest: Manifest, spec: EmbeddingSpec, session: Any, tokenizer: Any,
                 gate: Path | None = None) -> None:
        self._folder = folder
        self._gate = ComputeGate.open(gate)  # the daemon's compute lock, held by each forward pass
        self._manifest = manifest
        self._spec = spec
        self._session: Any = session
        self._tokenizer = tokenizer
        self._vocab = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._inputs = {i.name for i in session.get_inputs()}
        self._native = NativeClaims()
        self._info = ModelInfo(
            format=ModelFormat.ONNX, quantization=manifest.quantization, context_length=spec.max_tokens,
            trained_context_length=manifest.context_length, size_bytes=manifest.size_bytes,
            architecture=manifest.architecture, embedding_dimensions=spec.dimensions,
            matryoshka_dimensions=spec.matryoshka_dimensions,
        )

    @classmethod
    async def load(cls, folder: Path, *, threads: int, gate: Path | None = None) -> OnnxEmbeddingEngine:
        return await asyncio.to_thread(cls.load_blocking, folder, threads, gate)

    @classmethod
    def load_blocking(cls, folder: Path, threads: int, gate: Path | None = None) -> OnnxEmbeddingEngine:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = read_manifest(folder)
        spec = manifest.embedding
        if spec is None:
            raise ModelLoadError(f"{folder.name} is not an embedding package (its manifest has no `embedding`)")
        verify_files(folder, manifest)
        try:
            tokenizer = Tokenizer.from_file(str(folder / manifest.tokenizer))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise ModelLoadError(f"{folder.name}/{manifest.tokenizer} cannot be loaded: {e}") from e
        tokenizer.no_padding()  # the engine pads each batch itself, to its longest input
        tokenizer.no_truncation()  # an over-long input is refused, or cut when asked (the engine checks)
        try:
            session = ort.InferenceSession(str(folder / manifest.graph), session_options(threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own (non-exported) exception types
            raise ModelLoadError(f"onnxruntime cannot load {folder.name}/{manifest.graph}: {e}") from e
        names = {i.name for i in session.get_inputs()}
        if not {"input_ids", "attention_mask"} <= names:
            raise ModelLoadError(f"{folder.name}/{manifest.graph} lacks input_ids/attention_mask inputs")
        return cls(folder, manifest, spec, session, tokenizer, gate)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def spec(self) -> EmbeddingSpec:
        return self._spec

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        return await self._native.run(lambda: self._encode(text, add_special))

    def _encode(self, text: str, add_special: bool = True) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special).ids
        return ids

    @property
    def _model_name(self) -> str:
        return self._manifest.name

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await self._native.run(lambda: self.embed_blocking(request))

    def embed_blocking(self, request: EmbeddingRequest) -> EmbeddingResult:
        """The vectors of `request`'s inputs, computed here (a worker thread, or a test's server)."""
        session = self._session
        if session is None:
            raise ModelLoadError("engine is closed")
        check_dimensions(self._info, request.dimensions, self._manifest.name)
        window = self._spec.max_tokens
        encoded: list[list[int]] = []
        cut: list[bool] = []
        for i, item in enumerate(request.inputs):
            ids = self._encode(item) if isinstance(item, str) else self._checked_ids(item, i)
            over = len(ids) > window
            if over and not request.truncate:
                raise OutOfRange(f"inputs[{i}] is {len(ids)} tokens, over the model's window of {window} "
                                 "tokens (set truncate to cut it)", field=f"inputs[{i}]")
            if over:
                ids = ids[:window - 1] + ids[-1:] if isinstance(item, str) else ids[:window]  # keep [SEP]
            encoded.append(ids)
            cut.append(over)
        out = np.zeros((len(encoded), self._spec.dimensions), dtype=np.float32)
        order = sorted(range(len(encoded)), key=lambda k: len(encoded[k]))
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            out[rows] = self._forward([encoded[k] for k in rows])
        vectors = finish(out, normalize=request.normalize, dimensions=request.dimensions)
        return EmbeddingResult(tuple(Embedding(tuple(v.tolist()), len(ids), c)
                                     for v, ids, c in zip(vectors, encoded, cut, strict=True)))

    def _checked_ids(self, ids: tuple[int, ...], index: int) -> list[int]:
        if not ids:
            raise InvalidArgument(f"inputs[{index}].tokens is empty", field=f"inputs[{index}].tokens")
        bad = next((t for t in ids if not 0 <= t < self._vocab), None)
        if bad is not None:
            raise InvalidArgument(f"inputs[{index}].tokens holds {bad}, not a token id of this model "
                                  f"(0..{self._vocab - 1})", field=f"inputs[{index}].tokens")
        return list(ids)

    def _forward(self, batch: list[list[int]]) -> npt.NDArray[np.float32]:
        """Pooled (not yet normalized) vectors of one batch, padded to its longest input."""
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), self._spec.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = ids
            mask[row, :len(ids)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        with self._gate:
            hidden = self._session.run(["last_hidden_state"], feeds)[0]
        return pool(np.asarray(hidden, dtype=np.float32), mask, self._spec.pooling)

    async def check_health(self) -> None:
        if self._session is None:
            raise ModelLoadError("engine is closed")

    async def aclose(self) -> None:
        await asyncio.to_thread(self._native.close)
        self._session = None
        self._gate.close()
