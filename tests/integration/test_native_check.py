"""The native check: `laasd doctor` decodes in a child process and says why it died; `laasd serve` runs the
same check once per llama.cpp build before GGUF models load in its own process, and a build that cannot
run makes those models FAILED with the reason while the daemon serves the rest.

A build that cannot run here is made real, not faked: the check runs under qemu's user-mode emulation of
a CPU without AVX (Nehalem), where this machine's native llama.cpp build dies with SIGILL.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from laas.client import Client
from laas.daemon.native_build import cpu_flags
from laas.daemon.store import DEFAULT_MODEL
from tests.conftest import OnnxExport, copy_package
from tests.daemon_process import DaemonProcess

LAASD = Path(sys.executable).with_name("laasd")
INT4 = "smollm2-135m-instruct-int4"
# A CPU model without AVX: the native build (made on a machine with AVX at least) cannot run there.
LESSER_CPU = {"x86_64": "Nehalem", "aarch64": "cortex-a53"}[platform.machine()]
QEMU = f"qemu-{platform.machine()}"


def _doctor(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LAAS_")} | (env or {})
    return subprocess.run([str(LAASD), "--home", str(home), "doctor", *args], capture_output=True, text=True,
                          timeout=600, env=environ, check=False)


def test_build_under_test_uses_instructions_the_lesser_cpu_lacks() -> None:
    # The premise of the tests below: this machine (and so its native build) has what the emulated CPU lacks.
    flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    assert ("avx" in flags) if platform.machine() == "x86_64" else ("asimddp" in flags or "sve" in flags)


def test_doctor_on_a_healthy_setup(make_home: Callable[..., Path]) -> None:
    done = _doctor(make_home())
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "all is well" in out and "PROBLEM" not in out
    assert "smollm2-135m-instruct (default): ok, gguf Q4_1" in out
    assert "decoded " in out and "with CPU backend" in out
    assert "llama-cpp-python 0.3.36" in out
    assert "amx" not in out.split("llama.cpp system info:")[1].split("\n")[0].lower()  # no AMX kernels
    assert "127.0.0.1:7734" in out and "Effective config" in out


def test_doctor_reports_a_crashing_engine_and_fails(make_home: Callable[..., Path]) -> None:
    done = _doctor(make_home(), "--cpu", LESSER_CPU)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "llama.cpp died with SIGILL: illegal instruction" in done.stdout
    assert "bash packaging/setup.sh" in done.stdout  # and the fix
    assert "Traceback" not in done.stdout + done.stderr


def test_doctor_fails_on_a_broken_store(make_home: Callable[..., Path]) -> None:
    home = make_home(with_model=False)
    (home / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    done = _doctor(home)
    assert done.returncode == 1
    assert "PROBLEM: smollm2-135m-instruct (default):" in done.stdout


def test_daemon_fails_gguf_models_whose_native_check_dies_and_serves_the_rest(
        onnx_export: OnnxExport, make_home: Callable[..., Path], start_daemon: Callable[..., DaemonProcess],
        tmp_path: Path) -> None:
    home = make_home()
    copy_package(onnx_export.package("int4"), home / "models")
    env = {"LAAS_NATIVE_CHECK_WRAPPER": f"{QEMU} -cpu {LESSER_CPU}", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    config = (f'default_model = "{INT4}"\npreload = "all"\n[[models]]\nname = "smollm2-135m-instruct"\n'
              f'path = "{DEFAULT_MODEL.filename}"\n')
    daemon = start_daemon(config, home=home, env=env)
    with Client(daemon.target) as client:
        assert client.health() == "SERVING"
        gguf = client.model("smollm2-135m-instruct")
        assert gguf.state == "failed"
        assert "llama.cpp died with SIGILL" in gguf.error and "packaging/setup.sh" in gguf.error
        text = "".join(c.text for c in client.generate("1, 2, 3,", model=INT4, max_tokens=6, temperature=0))
        assert "4" in text
    assert daemon.stop() == 0
    assert "llama.cpp died with SIGILL" in daemon.log


def test_the_verdict_is_kept_per_build_so_a_normal_start_pays_nothing(
        start_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = start_daemon(env=env)
    with Client(first.target) as client:
        assert client.complete("Hi", max_tokens=2, temperature=0).completion_tokens == 2
    assert first.stop() == 0
    assert "native check of llama.cpp" in first.log and (tmp_path / "cache/laas/native-check.json").is_file()
    second = start_daemon(env=env)
    with Client(second.target) as client:
        assert client.complete("Hi", max_tokens=2, temperature=0).completion_tokens == 2
    assert second.stop() == 0
    assert "native check of llama.cpp" not in second.log
    assert "llama.cpp: llama-cpp-python 0.3.36" in second.log  # the one-line summary at start
