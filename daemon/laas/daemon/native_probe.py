"""The native check: llama.cpp decodes one token in a child process, so a crash is a sentence, not an exit.

Layer: infrastructure. `laasd doctor` runs it to tell a user what is wrong; `laasd serve` runs it
(through :class:`NativeGate`) before it loads GGUF models into its own process, once per build of
llama.cpp: the verdict is kept by the digest of the native libraries, so a normal start pays nothing.
A build that cannot run on this CPU (SIGILL: instructions the CPU lacks, or ggml's AMX kernels) makes
the GGUF models FAILED with the reason and the fix, and the daemon goes on serving the rest.

The child is `python -m laas.daemon.native_probe --model FILE`: it prints one JSON line (versions,
the CPU backend variant in use, the decoded token). `wrapper` runs it under another program, e.g.
`qemu-x86_64 -cpu Haswell` (`laasd doctor --cpu Haswell`): would this build run on such a CPU?
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 300.0  # a cold page cache, a loaded 2-core machine
# Under qemu's user-mode emulation every instruction is translated: a Python start, llama.cpp's load
# and one prefill take minutes, more on a loaded machine (a CI run needed over 300 s).
EMULATED_TIMEOUT_S = 1800.0
REBUILD = "rebuild llama-cpp-python for this CPU: `bash packaging/setup.sh` (it rebuilds when the flags differ)"
_FIXES = {
    signal.SIGILL: ("illegal instruction: this llama.cpp build uses CPU instructions this machine cannot run "
                    "(a build made for another CPU, or ggml's AMX kernels, ggml-org/llama.cpp#26954); "
                    f"{REBUILD}, then check with `laasd doctor`"),
    signal.SIGSEGV: "segmentation fault in llama.cpp; run `laasd doctor` and report it with its output",
    signal.SIGBUS: "bus error in llama.cpp (a truncated or changing model file?); run `laasd doctor`",
    signal.SIGABRT: "llama.cpp aborted",
    signal.SIGKILL: "killed (out of memory?)",
}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    reason: str  # "" when ok; else one sentence with the cause and the fix
    info: dict[str, Any] = field(default_factory=dict)
    definitive: bool = True  # False for a timeout or a missing model: not worth remembering


def probe_command(model: Path, *, threads: int, wrapper: Sequence[str] = ()) -> list[str]:
    # Under an emulator the child checks llama.cpp only: onnxruntime's import would take minutes there.
    return [*wrapper, sys.executable, "-m", "laas.daemon.native_probe", "--model", str(model),
            "--threads", str(threads), *(["--no-onnx"] if wrapper else [])]


def probe_timeout(wrapper: Sequence[str]) -> float:
    return EMULATED_TIMEOUT_S if wrapper else PROBE_TIMEOUT_S


def interpret(returncode: int, stdout: str, stderr: str) -> ProbeResult:
    """What a finished probe child says: its JSON line, or why it died."""
    if returncode == 0:
        for line in reversed(stdout.splitlines()):
            if line.startswith("{"):
                info = json.loads(line)
                return ProbeResult(ok=True, reason="", info=info)
        return ProbeResult(ok=False, reason="the native check printed no result")
    asserted = [line.strip() for line in stderr.splitlines() if "GGML_ASSERT" in line or "error" in line.lower()]
    detail = f" ({asserted[-1][:300]})" if asserted else ""
    if returncode < 0:
        sig = signal.Signals(-returncode)
        fix = _FIXES.get(sig, f"killed by {sig.name}")
        if sig == signal.SIGABRT and detail:
            return ProbeResult(ok=False, reason=f"llama.cpp aborted{detail}; run `laasd doctor`")
        return ProbeResult(ok=False, reason=f"llama.cpp died with {sig.name}: {fix}{detail}")
    last = stderr.strip().splitlines()[-1][:300] if stderr.strip() else f"exit status {returncode}"
    return ProbeResult(ok=False, reason=f"the native check failed: {last}")


def run_probe(model: Path, *, threads: int = 2, wrapper: Sequence[str] = (),
              timeout_s: float | None = None) -> ProbeResult:
    """Runs the child and waits for it (blocking: the doctor's way)."""
    timeout_s = probe_timeout(wrapper) if timeout_s is None else timeout_s
    try:
        done = subprocess.run(probe_command(model, threads=threads, wrapper=wrapper), capture_output=True,
                              text=True, timeout=timeout_s, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return ProbeResult(ok=False, reason=f"the native check did not finish within {timeout_s:.0f} s",
                           definitive=False)
    except OSError as e:
        return ProbeResult(ok=False, reason=f"the native check could not start: {e}", definitive=False)
    return interpret(done.returncode, done.stdout, done.stderr)


async def run_probe_async(model: Path, *, threads: int = 2, wrapper: Sequence[str] = (),
                          timeout_s: float | None = None) -> ProbeResult:
    """Runs the child without blocking the event loop (the daemon's way)."""
    timeout_s = probe_timeout(wrapper) if timeout_s is None else timeout_s
    proc = await asyncio.create_subprocess_exec(*probe_command(model, threads=threads, wrapper=wrapper),
                                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return ProbeResult(ok=False, reason=f"the native check did not finish within {timeout_s:.0f} s",
                           definitive=False)
    assert proc.returncode is not None
    return interpret(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def default_cache() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "laas" / "native-check.json"


WRAPPER_ENV = "LAAS_NATIVE_CHECK_WRAPPER"


class NativeGate:
    """Runs the native check once per llama.cpp build before GGUF models load in this process.

    `wrapper` (from $LAAS_NATIVE_CHECK_WRAPPER, e.g. "qemu-x86_64 -cpu Haswell") runs the check under
    another program: how the daemon answers when its llama.cpp cannot run on the machine."""

    def __init__(self, cache: Path | None = None, *, threads: int = 2, wrapper: Sequence[str] = ()) -> None:
        self._cache = cache or default_cache()
        self._threads = threads
        self._wrapper = tuple(wrapper)
        self._lock = asyncio.Lock()
        # One verdict per process: the llama.cpp this process loads cannot change under it.
        self._verdict: ProbeResult | None = None

    async def check(self, model: Path) -> None:
        """Returns when this build of llama.cpp runs here; raises ModelLoadError with the reason if not."""
        from laas.core.errors import ModelLoadError  # not at the top: the child need not import grpc
        from laas.daemon.backends.llama_lib import native_digest

        async with self._lock:
            if self._verdict is None:
                digest = await asyncio.to_thread(native_digest)
                if self._wrapper:
                    digest = f"{digest} {' '.join(self._wrapper)}"
                self._verdict = self._read(digest)
                if self._verdict is None:
                    started = time.monotonic()
                    self._verdict = await run_probe_async(model, threads=self._threads, wrapper=self._wrapper)
                    log.info("native check of llama.cpp (%s): %s in %.1f s", digest[:12],
                             "ok" if self._verdict.ok else self._verdict.reason, time.monotonic() - started)
                    if self._verdict.definitive:
                        self._write(digest, self._verdict)
            verdict = self._verdict
        if not verdict.ok:
            raise ModelLoadError(verdict.reason)

    def _read(self, digest: str) -> ProbeResult | None:
        try:
            saved = json.loads(self._cache.read_text()).get(digest)
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(saved, dict):
            return None
        return ProbeResult(ok=bool(saved.get("ok")), reason=str(saved.get("reason", "")))

    def _write(self, digest: str, verdict: ProbeResult) -> None:
        try:
            self._cache.parent.mkdir(parents=True, exist_ok=True)
            try:
                saved = json.loads(self._cache.read_text())
                saved = saved if isinstance(saved, dict) else {}
            except (OSError, ValueError):
                saved = {}
            saved[digest] = {"ok": verdict.ok, "reason": verdict.reason}
            tmp = self._cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(saved))
            tmp.replace(self._cache)
        except OSError as e:  # a read-only cache: the check runs again at the next start
            log.warning("could not keep the native check's verdict in %s: %s", self._cache, e)


def _probe(model: Path, threads: int, onnx: bool) -> dict[str, Any]:
    """The child's work: load llama.cpp, prefill a short prompt in one batch, decode one token."""
    from importlib.metadata import version

    from laas.daemon.backends.llama_lib import build_key, cpu_backend_in_use, init_backends

    init_backends()
    import llama_cpp

    info: dict[str, Any] = {"llama_cpp_python": version("llama-cpp-python"), "build": build_key()}
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, n_batch=128, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    info["cpu_backend"] = cpu_backend_in_use()
    info["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    # A prompt of some length goes through the batched (prefill) matrix kernels, one token through decode's.
    out: Any = llm.create_completion("The capital of France is Paris. " * 8 + "The capital of Italy is",
                                     max_tokens=1, temperature=0.0)
    info["token"] = out["choices"][0]["text"]
    llm.close()
    if not onnx:
        return info
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnx_providers"] = list(onnxruntime.get_available_providers())
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="laas native check: one decode with llama.cpp (a child process)")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="check llama.cpp only")
    args = parser.parse_args(argv)
    info = _probe(args.model, args.threads, args.onnx)
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
