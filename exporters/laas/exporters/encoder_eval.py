"""What quantizing a sentence encoder cost: cosine agreement with fp32 on held-out sentences, size, speed.

Layer: exporters (numpy; the daemon's own embedding engine, no torch). The sentences are those of the
held-out text that ships with laas (data/heldout.txt, Apache-2.0), embedded by the engine the daemon
would serve the package with, normalized; agreement is the cosine of each sentence's vector to the fp32
reference's (mean and minimum). Speed is sentences per second over the whole set, after one warm-up pass.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from laas.core.types import EmbeddingRequest
from laas.exporters.errors import QualityGateFailed
from laas.exporters.evaluate import heldout_text

MIN_COSINE = 0.99  # the gate: a quantized encoder whose mean cosine to fp32 is lower is not registered

Vectors = npt.NDArray[np.float32]


def heldout_sentences() -> list[str]:
    text = " ".join(heldout_text().split())
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 1]


@dataclass(frozen=True, slots=True)
class EmbeddingEvaluation:
    sentences: int
    size_bytes: int
    sentences_per_second: float
    mean_cosine: float | None = None  # to the reference's vectors; None for the reference itself
    min_cosine: float | None = None
    reference: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"text": "laas heldout.txt sentences"}


def embed_all(folder: Path, sentences: Sequence[str], threads: int) -> tuple[Vectors, float, int]:
    """(normalized vectors, sentences/s, package bytes) from the daemon's engine on `folder`."""
    from laas.daemon.backends.onnx_embed import OnnxEmbeddingEngine

    engine = OnnxEmbeddingEngine.load_blocking(folder, threads)
    request = EmbeddingRequest(tuple(sentences), normalize=True, truncate=True)
    engine.embed_blocking(request)  # warm-up: first-run allocations
    start = time.perf_counter()
    result = engine.embed_blocking(request)
    elapsed = time.perf_counter() - start
    vectors = np.array([e.vector for e in result.embeddings], dtype=np.float32)
    return vectors, len(sentences) / elapsed if elapsed > 0 else 0.0, engine.info.size_bytes


def cosines(a: Vectors, b: Vectors) -> npt.NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.asarray((a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)))


def evaluate_encoder(folder: Path, *, threads: int, reference: tuple[str, Vectors] | None = None
                     ) -> tuple[EmbeddingEvaluation, Vectors]:
    sentences = heldout_sentences()
    vectors, speed, size = embed_all(folder, sentences, threads)
    if reference is None:
        return EmbeddingEvaluation(len(sentences), size, speed), vectors
    cos = cosines(vectors, reference[1])
    return EmbeddingEvaluation(len(sentences), size, speed, float(cos.mean()), float(cos.min()),
                               reference[0]), vectors


def check_encoder_gate(name: str, evaluation: EmbeddingEvaluation, min_cosine: float = MIN_COSINE,
                       force: bool = False) -> None:
    """Raises QualityGateFailed when the mean cosine to fp32 is below `min_cosine` (unless forced)."""
    if evaluation.mean_cosine is None or evaluation.mean_cosine >= min_cosine or force:
        return
    raise QualityGateFailed(
        f"{name}: mean cosine to the fp32 reference is {evaluation.mean_cosine:.4f} (min "
        f"{evaluation.min_cosine:.4f}) over {evaluation.sentences} sentences, below {min_cosine}; not "
        "registered (--force to register anyway)")


def format_encoder_table(rows: Sequence[tuple[str, str, EmbeddingEvaluation]]) -> str:
    head = f"{'model':34} {'quant':6} {'mean cos':>9} {'min cos':>8} {'size MB':>8} {'sent/s':>8}"
    lines = [head, "-" * len(head)]
    for name, quant, e in rows:
        mean = f"{e.mean_cosine:.5f}" if e.mean_cosine is not None else "-"
        low = f"{e.min_cosine:.4f}" if e.min_cosine is not None else "-"
        lines.append(f"{name:34} {quant:6} {mean:>9} {low:>8} {e.size_bytes / 1e6:8.1f} "
                     f"{e.sentences_per_second:8.1f}")
    return "\n".join(lines)
