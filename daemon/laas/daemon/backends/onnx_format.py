"""The ONNX format: a laas ONNX package (a folder: manifest.json, the graph, the tokenizer), served by
onnxruntime (backends/onnx.py).

Layer: infrastructure. Describing reads the manifest and checks that every file it lists is there with
its size (a truncated package fails now; the digests are checked at load); the resident bytes are the
package's files and the f32 KV cache the engine preallocates: a context for each of `parallel` sequences.
onnxruntime, tokenizers and numpy load only in ``load``.
"""

from __future__ import annotations

from pathlib import Path

from laas.core.engine import Engine
from laas.core.errors import NotFound
from laas.core.types import ModelFormat, ModelInfo
from laas.daemon.backends.backend import Backend, Described, Shared
from laas.daemon.memory import COMPUTE_OVERHEAD
from laas.daemon.onnx_package import Manifest, read_manifest, verify_files
from laas.daemon.settings import ModelConfig
from laas.daemon.store import ModelStore


def onnx_kv_bytes(manifest: Manifest, context_length: int) -> int:
    """The f32 KV cache of one sequence of `context_length` tokens (0 for an embedding package)."""
    d = manifest.decoder
    return d.num_layers * context_length * d.num_kv_heads * d.head_dim * 2 * 4 if d is not None else 0


def onnx_memory(manifest: Manifest, context_length: int, parallel: int = 1) -> int:
    """Resident bytes of a loaded ONNX package: its files, and the KV cache preallocated for `parallel`
    sequences of the context (an embedding package: its files and the activations of one batch, within the
    compute overhead)."""
    return manifest.size_bytes + onnx_kv_bytes(manifest, context_length) * parallel + COMPUTE_OVERHEAD


def locate(store: ModelStore, config: ModelConfig) -> Path:
    folder = store.resolve(config.path, field=f"models.{config.name}.path")
    if not folder.is_dir():
        raise NotFound(f"ONNX package {config.path!r} is not in the model store {store.root}",
                       field=f"models.{config.name}.path")
    return folder


def describe(path: Path, config: ModelConfig) -> Described:
    manifest = read_manifest(path)
    verify_files(path, manifest, digests=False)
    n_ctx = min(config.context_length, manifest.context_length)
    e = manifest.embedding
    info = ModelInfo(ModelFormat.ONNX, manifest.quantization, n_ctx, manifest.context_length, manifest.size_bytes,
                     manifest.architecture, embedding_dimensions=e.dimensions if e else 0,
                     matryoshka_dimensions=e.matryoshka_dimensions if e else ())
    if manifest.decoder is None:
        return Described(info, onnx_memory(manifest, n_ctx), manifest)
    return Described(info, onnx_memory(manifest, n_ctx, config.parallel or 1), manifest,
                     kv_bytes_per_sequence=onnx_kv_bytes(manifest, n_ctx))


async def load(path: Path, described: Described, config: ModelConfig, threads: int, shared: Shared) -> Engine:
    # deferred: onnxruntime loads only to serve ONNX
    if isinstance(described.metadata, Manifest) and described.metadata.embedding is not None:
        from laas.daemon.backends.onnx_embed import OnnxEmbeddingEngine

        return await OnnxEmbeddingEngine.load(path, threads=threads, gate=shared.gate)
    from laas.daemon.backends.onnx import OnnxEngine

    return await OnnxEngine.load(path, context_length=config.context_length, threads=threads,
                                 parallel=config.parallel or 1, gate=shared.gate)


FORMAT = Backend("onnx", locate, describe, load)
