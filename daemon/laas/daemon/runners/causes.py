"""Why a runner died, in one sentence: from its exit status and the last lines it wrote to stderr.

Layer: infrastructure (pure). llama.cpp reports a failed GGML_ASSERT on stderr and then aborts: that
line is the cause. A signal is named, with the fix where one is known (SIGILL: a build for another
CPU, or ggml's AMX kernels).
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

REBUILD = ("rebuild llama-cpp-python for this CPU, without AMX (`bash packaging/setup.sh`, ggml-org/llama.cpp#26954), "
           "see `laasd doctor`")


def death_cause(returncode: int | None, stderr: Sequence[str], native: str) -> str:
    """`native`: the library that ran the model (llama.cpp, onnxruntime)."""
    asserted = [line.strip() for line in stderr if "GGML_ASSERT" in line]
    if asserted:
        line = asserted[-1]
        return f"{native} aborted: {line[line.index('GGML_ASSERT'):][:300]}"
    last = next((line.strip() for line in reversed(stderr) if line.strip()), "")
    detail = f" ({last[:300]})" if last else ""
    if returncode is None:
        return f"the runner closed its channel{detail}"
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"the runner was killed by signal {-returncode}{detail}"
        if sig == signal.SIGILL:
            fix = REBUILD if native == "llama.cpp" else f"this {native} build needs instructions this CPU lacks; " \
                "see `laasd doctor`"
            return f"illegal instruction (SIGILL) in {native}: {fix}"
        if sig == signal.SIGSEGV:
            return f"segmentation fault (SIGSEGV) in {native}{detail}"
        if sig == signal.SIGBUS:
            return f"bus error (SIGBUS) in {native}: a truncated or changing model file?{detail}"
        if sig == signal.SIGABRT:
            return f"{native} aborted (SIGABRT){detail}"
        if sig == signal.SIGKILL:
            return "the runner was killed (SIGKILL: out of memory, or by hand)"
        return f"the runner was killed by {sig.name}{detail}"
    return f"the runner exited with status {returncode}{detail}"
