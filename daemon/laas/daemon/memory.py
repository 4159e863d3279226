"""How much memory a model takes once loaded, how much the daemon may use, and what it uses now.

Layer: infrastructure (pure arithmetic over file metadata, plus /proc and cgroup reads). The
registry asks before each load whether the model fits the budget; the estimate is taken from the
model's own metadata, before any native code runs: the weights (the file, memory-mapped), the KV
cache (K and V for every layer and cell, f16 for llama.cpp, f32 for the ONNX engine), and a fixed
allowance for compute buffers and logits measured on llama.cpp (about 30 MB for a small model).
"""

from __future__ import annotations

import os
from pathlib import Path

from laas.daemon.gguf_header import GgufHeader
from laas.daemon.onnx_package import Manifest

MiB = 1 << 20
COMPUTE_OVERHEAD = 48 * MiB  # llama.cpp's compute buffers, logits, scratch: measured ~30 MB on SmolLM2-135M
AUTO_BUDGET_FRACTION = 0.75  # memory_budget_mb = 0: this share of the machine's (or cgroup's) memory


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


def onnx_memory(manifest: Manifest, context_length: int) -> int:
    """Resident bytes of a loaded ONNX package: its files, and the f32 KV cache preallocated for the context."""
    d = manifest.decoder
    kv = d.num_layers * context_length * d.num_kv_heads * d.head_dim * 2 * 4
    return manifest.size_bytes + kv + COMPUTE_OVERHEAD


def machine_memory() -> int:
    """The memory the daemon can have: physical memory, or its cgroup's limit (systemd MemoryMax=) when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def _cgroup_limit() -> int:
    try:
        own = Path("/proc/self/cgroup").read_text().strip().splitlines()
    except OSError:
        return 0
    for line in own:
        if line.startswith("0::"):  # cgroup v2
            try:
                raw = (Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "memory.max").read_text().strip()
            except OSError:
                return 0
            return int(raw) if raw.isdigit() else 0
    return 0


def budget_bytes(memory_budget_mb: int) -> int:
    """The models' memory budget: the setting, or 0 (auto) for a share of the machine's memory."""
    if memory_budget_mb > 0:
        return memory_budget_mb * MiB
    return int(machine_memory() * AUTO_BUDGET_FRACTION)


def resident_bytes(pid: int | str = "self") -> int:
    """A process's resident set size (VmRSS), 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
