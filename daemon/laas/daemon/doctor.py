"""`laasd doctor`: what a user runs when something is wrong. Exit 0 only when all is well.

Layer: composition root (a command). It prints the CPU and its features, the llama.cpp build and the
CPU backend variant it picks, onnxruntime's providers, the effective config (secrets masked), the
listeners, the model store with each model's validation result, and it decodes one token of the
default model in a child process (native_probe.py), so a crash (SIGILL, SIGSEGV) becomes a sentence
with the fix instead of killing the caller. `--cpu NAME` runs that child under qemu's user-mode
emulation of that CPU model: would this build run on such a machine?
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, TextIO

from laas.daemon.listeners import unix_path
from laas.daemon.native_build import relevant_features, this_machine
from laas.daemon.native_probe import run_probe
from laas.daemon.security import listen_refusal, metrics_refusal, tokens_path
from laas.daemon.settings import Settings

_SECRET_NAMES = re.compile(r"(^|_)(api_key|password|secret|token)$")
_URL_USERINFO = re.compile(r"(://)[^/@\s]+@")


def mask(name: str, value: Any) -> Any:
    """A setting's value fit to print: secrets and URL credentials replaced by ***."""
    if isinstance(value, str):
        if value and _SECRET_NAMES.search(name):
            return "***"
        return _URL_USERINFO.sub(r"\1***@", value)
    if isinstance(value, (list, tuple)):
        return [mask(name, v) for v in value]
    if isinstance(value, dict):
        return {k: mask(str(k), v) for k, v in value.items()}
    return value


def effective_config(settings: Settings) -> dict[str, Any]:
    raw = settings.model_dump()
    return {k: mask(k, str(v) if isinstance(v, Path) else v) for k, v in raw.items()}


class Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.problems: list[str] = []

    def section(self, title: str) -> None:
        print(f"\n{title}", file=self.out)

    def line(self, text: str) -> None:
        print(f"  {text}", file=self.out)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"  PROBLEM: {text}", file=self.out)


def _cpu(report: Report) -> None:
    machine, flags, model = this_machine()
    report.section("CPU")
    report.line(f"{model or 'unknown model'} ({machine})")
    report.line("features: " + (" ".join(relevant_features(machine, flags)) or "none of note"))
    if {"amx_tile", "amx_int8"} <= flags:
        report.line("Intel AMX present: llama.cpp is built without its AMX kernels (ggml-org/llama.cpp#26954)")


def _llama_build(report: Report) -> None:
    from laas.daemon.backends.llama_lib import build_key, cpu_variants

    report.section("llama.cpp")
    try:
        report.line(f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, build {build_key()}")
    except importlib.metadata.PackageNotFoundError:
        report.problem("llama-cpp-python is not installed: run `bash packaging/setup.sh`")
        return
    variants = cpu_variants()
    report.line("CPU backend: " + (f"picked at run time among {', '.join(variants)}" if variants
                                   else "built in (native build)"))


def _listeners(report: Report, settings: Settings) -> None:
    report.section("Listeners")
    tokens = tokens_path(settings) is not None
    for refusal in (listen_refusal(settings, tokens), metrics_refusal(settings, tokens)):
        if refusal:
            report.problem(refusal)
    for address in settings.listen_addresses:
        report.line(f"{address}: {_listener_state(address)}")
    if settings.metrics_listen:
        report.line(f"metrics {settings.metrics_listen}: {_listener_state(settings.metrics_listen)}")


def _listener_state(address: str) -> str:
    path = unix_path(address)
    if path is not None:
        return "a socket file exists (a daemon is running?)" if path.exists() else "free"
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=0.5):
            return "in use (a daemon is running?)"
    except (OSError, ValueError):
        return "free"


def _store(report: Report, settings: Settings) -> Path | None:
    """Validates every model as the daemon would at start; returns the default model's file if usable."""
    from laas.core.engine import Engine
    from laas.daemon.registry import ModelRegistry, ModelState
    from laas.daemon.store import ModelStore

    async def never(*_args: object) -> Engine:
        raise AssertionError("the doctor loads no model")

    report.section(f"Model store: {settings.store}")
    registry = ModelRegistry(settings, ModelStore(settings.store), never)

    async def describe_all() -> None:
        for entry in registry.entries():
            await registry.describe(entry)

    asyncio.run(describe_all())
    default: Path | None = None
    for entry in registry.entries():
        path = settings.store / entry.config.path
        mark = " (default)" if entry is registry.default else ""
        if entry.state is ModelState.FAILED:
            report.problem(f"{entry.name}{mark}: {entry.error}")
        elif entry.described is None:
            report.problem(f"{entry.name}{mark}: {path} is missing (`laasd pull` fetches the default model)")
        else:
            info = entry.described
            report.line(f"{entry.name}{mark}: ok, {info.format.value} {info.quantization}, context "
                        f"{info.context_length}, {info.size_bytes / 1e6:.1f} MB")
            if entry is registry.default and info.format.value == "gguf":
                default = path
    return default


def _native(report: Report, model: Path | None, settings: Settings, cpu: str | None) -> None:
    title = "One-token decode in a child process" + (f" (emulating {cpu} with qemu)" if cpu else "")
    report.section(title)
    if model is None:
        report.problem("no GGUF default model to decode with")
        return
    wrapper: list[str] = []
    if cpu:
        machine = this_machine()[0]
        qemu = shutil.which(f"qemu-{'aarch64' if machine in ('aarch64', 'arm64') else 'x86_64'}")
        if qemu is None:
            report.problem("qemu user-mode emulation is not installed (Debian: qemu-user)")
            return
        wrapper = [qemu, "-cpu", cpu]
    result = run_probe(model, threads=min(settings.threads, 2) if cpu else settings.threads, wrapper=wrapper)
    if not result.ok:
        report.problem(result.reason)
        return
    info = result.info
    report.line(f"decoded {info.get('token', '')!r} with CPU backend {info.get('cpu_backend')}")
    report.line(f"llama.cpp system info: {info.get('system_info', '')}")
    if info.get("onnxruntime"):
        report.line(f"onnxruntime {info['onnxruntime']}, providers: {', '.join(info.get('onnx_providers', []))}")


def run(settings: Settings, *, cpu: str | None = None, out: TextIO = sys.stdout) -> int:
    report = Report(out)
    print("laasd doctor", file=out)
    _cpu(report)
    _llama_build(report)
    model = _store(report, settings)
    _native(report, model, settings, cpu)
    _listeners(report, settings)
    report.section("Effective config")
    for key, value in effective_config(settings).items():
        report.line(f"{key} = {value!r}")
    if report.problems:
        print(f"\n{len(report.problems)} problem(s):", file=out)
        for p in report.problems:
            print(f"- {p}", file=out)
        return 1
    print("\nall is well", file=out)
    return 0
