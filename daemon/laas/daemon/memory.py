"""How much memory the daemon may give its models, and what a process uses now.

Layer: infrastructure (/proc and cgroup reads). The registry asks before each load whether the model
fits the budget; each format estimates its own model's bytes from the file's metadata, before any
native code runs (backends/*_format.py: the weights, the KV cache, and COMPUTE_OVERHEAD, a fixed
allowance for compute buffers and logits measured on llama.cpp: about 30 MB for a small model).
"""

from __future__ import annotations

import os
from pathlib import Path

MiB = 1 << 20
COMPUTE_OVERHEAD = 48 * MiB  # llama.cpp's compute buffers, logits, scratch: measured ~30 MB on SmolLM2-135M
AUTO_BUDGET_FRACTION = 0.75  # memory_budget_mb = 0: this share of the machine's (or cgroup's) memory


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
