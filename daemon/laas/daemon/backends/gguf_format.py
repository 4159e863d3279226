"""The GGUF format: one .gguf file in the store, served by llama.cpp (backends/gguf.py).

Layer: infrastructure. Describing reads the file's header (gguf_header.py, pure Python: a hostile file
fails here, before llama.cpp parses it) and estimates the resident bytes from it: the weights (the file,
memory-mapped), the KV cache (K and V for every layer and cell, in f16, llama.cpp's default cache type)
and a fixed allowance for compute buffers and logits. llama.cpp itself loads only in ``load``.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import replace
from pathlib import Path

from laas.core.engine import Engine
from laas.core.errors import ModelLoadError
from laas.core.types import ModelFormat, ModelInfo
from laas.daemon.backends.backend import Backend, Described, Shared
from laas.daemon.gguf_header import GgufHeader, read_gguf_header
from laas.daemon.memory import COMPUTE_OVERHEAD
from laas.daemon.settings import ModelConfig
from laas.daemon.store import ModelStore, sha256_of


def gguf_kv_bytes(header: GgufHeader, cells: int) -> int:
    """K and V cache of `cells` cells in f16 (llama.cpp's default cache type)."""
    m, arch = header.metadata, header.architecture

    def number(key: str, default: int = 0) -> int:
        value = m.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer head counts (some architectures): the largest bounds it
            value = max((v for v in value if isinstance(v, int)), default=default)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else default

    layers, embd, heads = number("block_count"), number("embedding_length"), number("attention.head_count", 1)
    kv_heads = number("attention.head_count_kv", heads) or heads
    head_dim = embd // max(heads, 1)
    key_len = number("attention.key_length", head_dim) or head_dim
    value_len = number("attention.value_length", head_dim) or head_dim
    return layers * cells * kv_heads * (key_len + value_len) * 2


def gguf_memory(header: GgufHeader, cells: int) -> int:
    """Resident bytes of a loaded GGUF model whose context holds `cells` KV cells in all."""
    return header.size_bytes + gguf_kv_bytes(header, cells) + COMPUTE_OVERHEAD


def locate(store: ModelStore, config: ModelConfig) -> Path:
    return store.file_for(config.path, field=f"models.{config.name}.path")


def describe(path: Path, config: ModelConfig) -> Described:
    """With a draft model (`speculation_draft`, the real path the registry resolved in the store), its file
    is validated too, and what it takes loaded (its weights, and a KV cache of as many cells) is counted."""
    header = read_gguf_header(path)
    n_ctx = min(config.context_length, header.context_length or config.context_length)
    parallel = config.parallel or 1
    cells = (config.kv_tokens or n_ctx * parallel) if parallel > 1 else n_ctx
    draft = _draft_header(config)
    info = ModelInfo(ModelFormat.GGUF, header.quantization, n_ctx, header.context_length, header.size_bytes,
                     header.architecture, header.chat_template)
    if _embeds(header):  # a sentence encoder: no KV cache to keep, one batch of activations
        embd = header.metadata.get(f"{header.architecture}.embedding_length")
        info = replace(info, chat_template=None, embedding_dimensions=embd if isinstance(embd, int) else 0)
        return Described(info, header.size_bytes + COMPUTE_OVERHEAD, header)
    memory, per_sequence = gguf_memory(header, cells), gguf_kv_bytes(header, n_ctx)
    if draft is not None:
        memory += gguf_memory(draft, cells)
        per_sequence += gguf_kv_bytes(draft, n_ctx)
    return Described(info, memory, header, kv_bytes_per_sequence=per_sequence)


def _draft_header(config: ModelConfig) -> GgufHeader | None:
    """The draft model's header (read as the model's is: a hostile file fails here, not in llama.cpp)."""
    if not config.draft_file:
        return None
    header = read_gguf_header(Path(config.draft_file))
    if _embeds(header):
        raise ModelLoadError(f"speculation_draft {Path(config.draft_file).name} is an embedding model, not "
                             "one that generates")
    return header


def _embeds(header: GgufHeader) -> bool:
    """The file declares a pooling type: an embedding model (served by gguf_embed.py)."""
    return header.pooling is not None


def verify(path: Path, config: ModelConfig) -> None:
    if config.sha256 and sha256_of(path) != config.sha256.lower():
        raise ModelLoadError(f"{path.name} does not match its configured sha256")


async def load(path: Path, described: Described, config: ModelConfig, threads: int, shared: Shared) -> Engine:
    from laas.daemon.backends.gguf import GgufEngine  # deferred: llama.cpp loads only to serve GGUF
    from laas.daemon.backends.step_costs import StepCosts

    header = described.metadata
    if not isinstance(header, GgufHeader):
        raise ModelLoadError(f"{path.name}: no GGUF header was read")
    if _embeds(header):
        from laas.daemon.backends.gguf_embed import GgufEmbeddingEngine

        return await GgufEmbeddingEngine.load(path, header, context_length=config.context_length, threads=threads,
                                                 gate=shared.gate)
    return await GgufEngine.load(path, header, context_length=config.context_length, threads=threads,
                                 parallel=config.parallel or 1, kv_tokens=config.kv_tokens,
                                 flash_attn=config.flash_attn or "auto", speculation=config.speculation or "ngram",
                                 draft_min=config.speculation_draft_min or 0,
                                 draft_path=Path(config.draft_file) if config.draft_file else None,
                                 decode_loop=shared.decode_loop, gate=shared.gate,
                                 step_costs=StepCosts(shared.cache) if shared.cache is not None else None)


def runtime(threads: int) -> str:
    from laas.daemon.backends.llama_lib import build_key, cpu_backend_in_use

    return (f"llama.cpp: llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, build {build_key()}, "
            f"CPU backend {cpu_backend_in_use()}, {threads} threads")


FORMAT = Backend("gguf", locate, describe, load, verify=verify, native_check=True, runtime=runtime)
