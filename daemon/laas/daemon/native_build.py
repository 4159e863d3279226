"""Which llama.cpp build a machine gets: CPU flags in, CMake arguments and compiler flags out.

Layer: packaging support (standard library only): `packaging/setup.sh` and `packaging/deb/build.sh`
run this file as a script before laas is installed, and `laasd doctor` imports it.

Two builds:

- `native` (setup.sh, a developer's or user's own machine): llama.cpp's native CPU flags, so the
  build runs as fast as the CPU allows, minus Intel AMX. ggml's AMX kernels die with SIGILL on
  Sapphire Rapids and later (the tile permission is requested on one thread only and an invalid tile
  config can be loaded; upstream PR ggml-org/llama.cpp#26954, still open for the llama.cpp vendored
  in llama-cpp-python 0.3.36). `-mno-amx-*` keeps the compiler from defining `__AMX_INT8__`, which
  is what turns those kernels on. Drop the flags once the llama.cpp we build carries the fix.
- `portable` (the .deb, built once and installed on many CPUs): no native flags at all; every CPU
  variant of ggml's CPU backend is built as a shared library (`GGML_BACKEND_DL`,
  `GGML_CPU_ALL_VARIANTS`) and the best one the running CPU supports is picked at load time. The
  AMX variant (`sapphirerapids`) is left out of the package for the same reason as above.

Both builds carry laas' own patches to the vendored llama.cpp (`packaging/patches/*.patch`, applied
by llama_wheel.sh before it builds; each says what it changes and why).

The build key names a build exactly (version, kind, flags, the patches' digests and, for a native
build, the CPU it was made for), so a wheel built with other flags, other patches or for another CPU
is never reused for this one.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

# Compiler flags that keep ggml's AMX kernels out of a native x86-64 build (ggml-org/llama.cpp#26954).
NO_AMX = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
# ggml CPU backend variants never shipped in a portable build, by architecture.
EXCLUDED_VARIANTS = {"x86_64": ("sapphirerapids",)}
# The CPU features that decide which kernels llama.cpp can use (the /proc/cpuinfo names).
X86_FEATURES = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
                "avx512vbmi", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
ARM_FEATURES = ("asimd", "asimddp", "fphp", "asimdhp", "sve", "sve2", "i8mm", "bf16", "sme")


@dataclass(frozen=True, slots=True)
class Build:
    """How to build llama-cpp-python for one target."""

    kind: str  # "native" or "portable"
    machine: str  # x86_64, aarch64, ...
    cmake_args: tuple[str, ...]
    cflags: tuple[str, ...]
    excluded_variants: tuple[str, ...]
    cpu: str  # the CPU a native build is made for ("" for portable)
    patches: tuple[Path, ...] = ()  # applied to the sdist's tree, in this order, before the build

    def key(self, version: str) -> str:
        """A name for this build of llama-cpp-python `version`: equal keys, interchangeable wheels."""
        digests = (f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in self.patches)
        spec = "\n".join((version, self.kind, self.machine, *self.cmake_args, *self.cflags,
                          *self.excluded_variants, self.cpu, *digests))
        return f"{version}-{self.kind}-{self.machine}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"

    def env(self, version: str) -> dict[str, str]:
        """The variables setup.sh and build.sh build with (CMAKE_ARGS and the C/C++ flags pip passes on)."""
        flags = " ".join(self.cflags)
        return {"LLAMA_CMAKE_ARGS": " ".join(self.cmake_args), "LLAMA_CFLAGS": flags,
                "LLAMA_BUILD_KEY": self.key(version), "LLAMA_EXCLUDED_VARIANTS": " ".join(self.excluded_variants),
                "LLAMA_PATCHES": "\n".join(str(p) for p in self.patches)}  # a path a line


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo text (`flags` on x86, `Features` on ARM)."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in ("model name", "cpu model", "hardware"):
            return value.strip()
    return ""


def relevant_features(machine: str, flags: Iterable[str]) -> tuple[str, ...]:
    """The flags that matter to llama.cpp's kernels, in a fixed order."""
    have = set(flags)
    names = X86_FEATURES if machine in ("x86_64", "amd64") else ARM_FEATURES
    return tuple(f for f in names if f in have)


def native_build(machine: str, flags: Iterable[str]) -> Build:
    """The fastest safe build for the CPU whose flags are given."""
    features = relevant_features(machine, flags)
    cflags = NO_AMX if machine in ("x86_64", "amd64") else ()
    return Build(kind="native", machine=machine, cmake_args=("-DGGML_NATIVE=ON",), cflags=cflags,
                 excluded_variants=(), cpu=" ".join(features))


def portable_build(machine: str) -> Build:
    """A build that runs on every CPU of the architecture, picking its kernels at run time."""
    args: tuple[str, ...]
    if machine in ("x86_64", "amd64", "aarch64", "arm64"):
        # GGML_BACKEND_DIR, relative to the wheel's root: the variants go beside libllama.so, where
        # laas loads them from (backends/llama_lib.py), instead of a bin/ folder in site-packages.
        args = ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
                "-DGGML_BACKEND_DIR=llama_cpp/lib")
    else:  # no variant list upstream: the architecture's baseline
        args = ("-DGGML_NATIVE=OFF",)
    # The package serves text models: llama-cpp-python's multimodal library (mtmd) is not built.
    args += ("-DLLAVA_BUILD=OFF",)
    return Build(kind="portable", machine=machine, cmake_args=args, cflags=(),
                 excluded_variants=EXCLUDED_VARIANTS.get(machine, ()), cpu="")


def patches_in(folder: Path) -> tuple[Path, ...]:
    """The patches in `folder`, in name order (absolute paths)."""
    return tuple(sorted(p.resolve() for p in folder.glob("*.patch")))


def this_machine() -> tuple[str, frozenset[str], str]:
    """(machine, CPU flags, CPU model) of the running machine."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        info = ""
    return platform.machine(), cpu_flags(info), cpu_model(info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llama.cpp build flags for this machine, as shell assignments")
    parser.add_argument("kind", choices=("native", "portable"))
    parser.add_argument("--version", required=True, help="the llama-cpp-python version to build")
    parser.add_argument("--patches", type=Path, metavar="DIR", help="apply DIR/*.patch (in name order)")
    args = parser.parse_args(argv)
    machine, flags, _model = this_machine()
    build = native_build(machine, flags) if args.kind == "native" else portable_build(machine)
    if args.patches:
        build = replace(build, patches=patches_in(args.patches))
    for name, value in build.env(args.version).items():
        print(f"{name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
