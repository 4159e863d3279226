"""The GGUF embedding engine: a sentence encoder in a .gguf file (e.g. BERT from llama.cpp's converter),
served by llama.cpp in embedding mode with the pooling type the file declares (`<arch>.pooling_type`).

Layer: infrastructure (llama-cpp-python). Inputs are tokenized by the file's own vocabulary (with its
[CLS]/[SEP]), checked against the window (the file's context length), packed into one llama.cpp batch of
up to BATCH sequences or n_batch tokens, decoded, and read back pooled per sequence
(llama_get_embeddings_seq); normalization and Matryoshka cuts are the shared pooling.finish. A file
that declares no pooling (a generative model) never gets here: gguf_format serves it with GgufEngine,
whose embed is the Engine's FAILED_PRECONDITION. Calls run in a worker thread under a NativeClaims claim,
one at a time (a lock: a llama.cpp context is not thread-safe); this engine does not share the GGUF
decode thread, but each decode holds the daemon's compute lock (compute_gate.py), so it takes turns with
the steps of the models beside it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
from laas.daemon.backends.llama_lib import init_backends
from laas.daemon.backends.pooling import check_dimensions, finish
from laas.daemon.backends.worker import NativeClaims
from laas.daemon.gguf_header import GgufHeader

BATCH = 32  # sequences per llama.cpp batch


class GgufEmbeddingEngine(EmbeddingEngine):
    def __init__(self, path: Path, llm: Any, info: ModelInfo, window: int, gate: Path | None = None) -> None:
        self._path = path
        self._gate = ComputeGate.open(gate)  # the daemon's compute lock, held by each decode
        self._llm: Any = llm
        self._info = info
        self._window = window
        self._vocab = int(llm.n_vocab())
        self._lock = threading.Lock()
        self._native = NativeClaims()

    @classmethod
    async def load(cls, path: Path, header: GgufHeader, *, context_length: int, threads: int,
                   gate: Path | None = None) -> GgufEmbeddingEngine:
        pooling = header.pooling
        if pooling not in ("mean", "cls", "last"):
            raise ModelLoadError(f"{path.name}: pooling {pooling!r} does not give one vector per input")
        window = min(context_length, header.context_length or context_length)
        tokens = max(window, header.context_length or window)  # per batch; every sequence fits one whole

        def _load() -> Any:
            import llama_cpp
            from llama_cpp._logger import set_verbose

            set_verbose(False)
            init_backends()
            try:
                return llama_cpp.Llama(model_path=str(path), embedding=True, n_ctx=tokens, n_batch=tokens,
                                       n_ubatch=tokens, n_seq_max=BATCH, n_threads=threads,
                                       n_threads_batch=threads, verbose=False,
                                       pooling_type=llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)  # the file's own
            except (ValueError, RuntimeError) as e:
                raise ModelLoadError(f"llama.cpp cannot load {path.name} for embeddings: {e}") from e

        llm = await asyncio.to_thread(_load)
        embd = int(header.metadata.get(f"{header.architecture}.embedding_length", 0) or llm.n_embd())
        info = ModelInfo(ModelFormat.GGUF, header.quantization, window, header.context_length, header.size_bytes,
                         header.architecture, embedding_dimensions=embd)
        return cls(path, llm, info, window, gate)

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        return await self._native.run(lambda: self._tokenize(text, add_special))

    def _tokenize(self, text: str, add_special: bool = True) -> list[int]:
        llm = self._llm
        if llm is None:
            raise ModelLoadError("engine is closed")
        ids: list[int] = llm.tokenize(text.encode(), add_bos=add_special, special=False)
        return ids

    @property
    def _model_name(self) -> str:
        return self._path.name

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return await self._native.run(lambda: self.embed_blocking(request))

    def embed_blocking(self, request: EmbeddingRequest) -> EmbeddingResult:
        check_dimensions(self._info, request.dimensions, self._path.name)
        encoded: list[list[int]] = []
        cut: list[bool] = []
        for i, item in enumerate(request.inputs):
            if isinstance(item, str):
                ids = self._tokenize(item)
            else:
                ids = list(item)
                bad = next((t for t in ids if not 0 <= t < self._vocab), None)
                if not ids or bad is not None:
                    raise InvalidArgument(f"inputs[{i}].tokens: {bad} is not a token id of this model "
                                          f"(0..{self._vocab - 1})" if ids else f"inputs[{i}].tokens is empty",
                                          field=f"inputs[{i}].tokens")
            over = len(ids) > self._window
            if over and not request.truncate:
                raise OutOfRange(f"inputs[{i}] is {len(ids)} tokens, over the model's window of {self._window} "
                                 "tokens (set truncate to cut it)", field=f"inputs[{i}]")
            if over:
                ids = ids[:self._window - 1] + ids[-1:] if isinstance(item, str) else ids[:self._window]
            encoded.append(ids)
            cut.append(over)
        with self._lock:
            vectors = self._run(encoded)
        done = finish(vectors, normalize=request.normalize, dimensions=request.dimensions)
        return EmbeddingResult(tuple(Embedding(tuple(v.tolist()), len(ids), c)
                                     for v, ids, c in zip(done, encoded, cut, strict=True)))

    def _run(self, encoded: list[list[int]]) -> Any:
        import llama_cpp

        llm = self._llm
        if llm is None:
            raise ModelLoadError("engine is closed")
        n_embd, n_batch = int(llm.n_embd()), int(llm.n_batch)
        out = np.zeros((len(encoded), n_embd), dtype=np.float32)
        pending: list[int] = []
        tokens = 0

        def decode() -> None:
            llm._ctx.kv_cache_clear()
            with self._gate:
                llm._ctx.decode(llm._batch)
            for seq, row in enumerate(pending):
                out[row] = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, seq),
                                                 shape=(n_embd,))
            llm._batch.reset()

        llm._batch.reset()
        for row, ids in enumerate(encoded):
            if pending and (tokens + len(ids) > n_batch or len(pending) >= BATCH):
                decode()
                pending, tokens = [], 0
            llm._batch.add_sequence(ids, len(pending), True)
            pending.append(row)
            tokens += len(ids)
        if pending:
            decode()
        llm._ctx.kv_cache_clear()
        return out

    async def check_health(self) -> None:
        if self._llm is None:
            raise ModelLoadError("engine is closed")

    async def aclose(self) -> None:
        await asyncio.to_thread(self._native.close)
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.close)
        self._gate.close()
