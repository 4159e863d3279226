"""Which llama.cpp build a CPU gets (CPU flags in, build flags out), and what a dead native check says."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from laas.daemon.doctor import effective_config, mask
from laas.daemon.native_build import NO_AMX, cpu_flags, cpu_model, native_build, patches_in, portable_build
from laas.daemon.native_probe import PROBE_TIMEOUT_S, interpret, probe_command, probe_timeout
from laas.daemon.settings import RemoteConfig, Settings

ROOT = Path(__file__).resolve().parents[2]
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile amx_int8
"""
ZEN4 = "model name : AMD EPYC 9654\nflags : fpu sse4_2 avx f16c fma avx2 bmi2 avx512f avx512_vnni avx512_bf16\n"
HASWELL = "model name : Intel(R) Core(TM) i7-4770\nflags : fpu sse4_2 avx f16c fma avx2 bmi2\n"
GRAVITON = "processor : 0\nFeatures : fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp sve i8mm bf16\n"


def test_cpuinfo_parsing() -> None:
    assert {"amx_tile", "avx512f", "avx2"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert cpu_model(SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"asimd", "sve", "i8mm"} <= cpu_flags(GRAVITON)
    assert cpu_flags("") == frozenset()


def test_native_x86_builds_keep_amx_off_whatever_the_cpu() -> None:
    for info in (SAPPHIRE_RAPIDS, ZEN4, HASWELL):
        build = native_build("x86_64", cpu_flags(info))
        assert build.cmake_args == ("-DGGML_NATIVE=ON",)
        assert build.cflags == NO_AMX == ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
        assert build.env("0.3.36")["LLAMA_CFLAGS"] == "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def test_native_arm_build_has_no_x86_flags() -> None:
    build = native_build("aarch64", cpu_flags(GRAVITON))
    assert build.cmake_args == ("-DGGML_NATIVE=ON",) and build.cflags == ()
    assert "sve" in build.cpu.split()


def test_a_native_build_is_keyed_by_its_cpu_version_and_flags() -> None:
    spr, zen4 = native_build("x86_64", cpu_flags(SAPPHIRE_RAPIDS)), native_build("x86_64", cpu_flags(ZEN4))
    assert spr.key("0.3.36") != zen4.key("0.3.36")  # a wheel made for one CPU is not taken on another
    assert spr.key("0.3.36") != spr.key("0.3.37")
    assert spr.key("0.3.36") == native_build("x86_64", cpu_flags(SAPPHIRE_RAPIDS)).key("0.3.36")
    assert spr.key("0.3.36") != portable_build("x86_64").key("0.3.36")
    # Flags that do not matter to llama.cpp's kernels do not change the key.
    assert native_build("x86_64", cpu_flags(HASWELL) | {"rdrand"}).key("1") == native_build(
        "x86_64", cpu_flags(HASWELL)).key("1")


def test_portable_builds_dispatch_at_run_time_and_leave_amx_out() -> None:
    x86 = portable_build("x86_64")
    assert "-DGGML_NATIVE=OFF" in x86.cmake_args and "-DGGML_BACKEND_DL=ON" in x86.cmake_args
    assert "-DGGML_CPU_ALL_VARIANTS=ON" in x86.cmake_args
    assert not any("native" in f.lower() for f in x86.cflags)
    assert x86.excluded_variants == ("sapphirerapids",)
    assert x86.cpu == ""  # the same package for every CPU
    arm = portable_build("aarch64")
    assert "-DGGML_CPU_ALL_VARIANTS=ON" in arm.cmake_args and arm.excluded_variants == ()
    assert portable_build("riscv64").cmake_args == ("-DGGML_NATIVE=OFF", "-DLLAVA_BUILD=OFF")


def test_the_script_prints_shell_assignments() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "daemon/laas/daemon/native_build.py"), "native",
                          "--version", "0.3.36"], capture_output=True, text=True, check=True).stdout
    names = {line.split("=", 1)[0] for line in out.splitlines()}
    assert names == {"LLAMA_CMAKE_ARGS", "LLAMA_CFLAGS", "LLAMA_BUILD_KEY", "LLAMA_EXCLUDED_VARIANTS", "LLAMA_PATCHES"}
    assert "LLAMA_BUILD_KEY=0.3.36-native-" in out
    assert "LLAMA_PATCHES=''" in out  # none unless asked (llama_wheel.sh passes --patches packaging/patches)


def test_a_build_is_keyed_by_its_patches_contents(tmp_path: Path) -> None:
    (tmp_path / "b.patch").write_text("second\n")
    (tmp_path / "a.patch").write_text("first\n")
    (tmp_path / "notes.txt").write_text("not a patch\n")
    assert [p.name for p in patches_in(tmp_path)] == ["a.patch", "b.patch"]  # applied in name order
    plain = native_build("x86_64", cpu_flags(ZEN4))
    patched = replace(plain, patches=patches_in(tmp_path))
    key = patched.key("0.3.36")
    assert key != plain.key("0.3.36")  # a wheel built without the patches is never taken
    (tmp_path / "b.patch").write_text("second, changed\n")
    assert replace(plain, patches=patches_in(tmp_path)).key("0.3.36") != key  # nor one with an older patch
    assert patched.env("0.3.36")["LLAMA_PATCHES"].splitlines() == [str(tmp_path / "a.patch"), str(tmp_path / "b.patch")]
    out = subprocess.run([sys.executable, str(ROOT / "daemon/laas/daemon/native_build.py"), "portable", "--version",
                          "0.3.36", "--patches", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert "a.patch" in out and "notes.txt" not in out


def test_a_dead_native_check_names_the_cause_and_the_fix() -> None:
    ill = interpret(-signal.SIGILL, "", "")
    assert not ill.ok and "SIGILL" in ill.reason and "illegal instruction" in ill.reason
    assert "packaging/setup.sh" in ill.reason and ill.definitive
    abort = interpret(-signal.SIGABRT, "", "llama.cpp/ggml.c:12: GGML_ASSERT(eps >= 0.0f) failed\n")
    assert "GGML_ASSERT(eps >= 0.0f)" in abort.reason
    assert "SIGSEGV" in interpret(-signal.SIGSEGV, "", "").reason
    assert "exit status 3" in interpret(3, "", "").reason
    ok = interpret(0, "noise\n" + json.dumps({"token": " Rome", "cpu_backend": "haswell"}) + "\n", "")
    assert ok.ok and ok.info["cpu_backend"] == "haswell"


def test_an_emulated_check_gets_more_time_and_checks_llama_cpp_only() -> None:
    wrapper = ["/usr/bin/qemu-x86_64", "-cpu", "Haswell"]
    emulated = probe_command(Path("m.gguf"), threads=2, wrapper=wrapper)
    assert emulated[:3] == wrapper and emulated[-1] == "--no-onnx"
    assert "--no-onnx" not in probe_command(Path("m.gguf"), threads=2)
    assert probe_timeout(wrapper) >= 5 * PROBE_TIMEOUT_S and probe_timeout(()) == PROBE_TIMEOUT_S


def test_doctor_masks_secrets_in_the_config() -> None:
    assert mask("api_key", "sk-live-123") == "***"
    assert mask("api_key_env", "OPENAI_API_KEY") == "OPENAI_API_KEY"  # a variable's name, not a secret
    assert mask("url", "https://user:pw@api.example.org/v1") == "https://***@api.example.org/v1"
    config = effective_config(Settings(remotes=(RemoteConfig(name="c", url="https://u:secret@h/v1", model="m"),)))
    assert "secret" not in json.dumps(config, default=str)
