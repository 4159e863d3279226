#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` (or another of its CMake targets, e.g. `llama-server`) from the llama.cpp
# sources vendored in the llama-cpp-python sdist of the version installed in the project's venv, so
# bench/batching.py and bench/http_vs_llama_server.py compare laasd against the very same llama.cpp the
# daemon links. CPU only, Release, OpenMP, and the installed wheel's CPU flags (native, minus AMX).
# Idempotent: the sdist, the unpacked tree and the build folder are reused.
#
# Everything goes into $LLAMA_BENCH_DIR (default /work/llama-bench), never into the repository.
# One line per target built is printed, the binary's path; the last line is the last target's binary.
#
# Usage: bench/build_llama_bench.sh [TARGET...]   (default: llama-bench; env: LLAMA_BENCH_DIR, PYTHON, JOBS, CXX)
#        bench/build_llama_bench.sh llama-server   (the OpenAI-compatible server, for bench/http_vs_llama_server.py)
#        nice -n 19 bench/build_llama_bench.sh     (on a shared machine)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
DIR="${LLAMA_BENCH_DIR:-/work/llama-bench}"
JOBS="${JOBS:-2}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(llama-bench)

die() { echo "build_llama_bench: $*" >&2; exit 1; }
for t in "${TARGETS[@]}"; do
  case "$t" in
    llama-*) ;;
    *) die "unknown target '$t' (llama.cpp's binaries are named llama-*, e.g. llama-bench, llama-server)" ;;
  esac
done

case "$(realpath -m "$DIR")/" in
  "$ROOT"/*) die "LLAMA_BENCH_DIR ($DIR) is inside the repository; choose a folder outside $ROOT" ;;
esac
[ -x "$PYTHON" ] || die "no Python at $PYTHON (set PYTHON to the venv's python)"
command -v cmake >/dev/null || die "cmake not found (e.g. python -m venv /tmp/cmake-venv && /tmp/cmake-venv/bin/pip install cmake, then put /tmp/cmake-venv/bin on PATH)"
CXX_BIN="${CXX:-}"
if [ -z "$CXX_BIN" ]; then
  for c in c++ g++ clang++; do command -v "$c" >/dev/null && { CXX_BIN="$c"; break; }; done
fi
[ -n "$CXX_BIN" ] && command -v "$CXX_BIN" >/dev/null || die "no C++ compiler found (install g++ or set CXX)"

VERSION="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')" \
  || die "llama-cpp-python is not installed in $PYTHON's environment"
SRC="$DIR/llama_cpp_python-$VERSION"
LLAMA="$SRC/vendor/llama.cpp"
BUILD="$LLAMA/build"
mkdir -p "$DIR/sdist"

# 1. The sdist of exactly the installed version.
SDIST="$(ls "$DIR"/sdist/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [ -z "$SDIST" ]; then
  echo "downloading the llama-cpp-python $VERSION sdist into $DIR/sdist"
  # --no-binary for this package only: its build requirements (scikit-build-core, for the metadata step)
  # may come as wheels, which keeps the download quick.
  "$PYTHON" -m pip download --no-binary llama-cpp-python --no-deps --dest "$DIR/sdist" \
    "llama-cpp-python==$VERSION" >&2
  SDIST="$(ls "$DIR"/sdist/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
  [ -n "$SDIST" ] || die "pip did not leave llama_cpp_python-$VERSION.tar.gz in $DIR/sdist"
fi

# 2. Unpacked (into a temporary folder first, so a broken unpack is never mistaken for a finished one).
if [ ! -f "$LLAMA/CMakeLists.txt" ]; then
  echo "unpacking $(basename "$SDIST")"
  tmp="$(mktemp -d "$DIR/unpack.XXXXXX")"
  tar -xzf "$SDIST" -C "$tmp"
  [ -f "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp/CMakeLists.txt" ] \
    || { rm -rf "$tmp"; die "the sdist has no vendor/llama.cpp/CMakeLists.txt"; }
  rm -rf "$SRC"
  mv "$tmp/llama_cpp_python-$VERSION" "$SRC"
  rmdir "$tmp"
fi

# 3. Configure (CPU only, Release, static libraries: self-contained binaries) and build only the targets
# asked for. The server's targets are configured too (it costs nothing until built); a build folder
# configured before without them (LLAMA_BUILD_SERVER=OFF) is reconfigured in place.
# The venv's own flags (daemon/laas/daemon/native_build.py, as packaging/llama_wheel.sh uses them): native
# minus Intel AMX, whose kernels crash llama.cpp at its first decode (ggml-org/llama.cpp#26954).
eval "$("$PYTHON" "$ROOT/daemon/laas/daemon/native_build.py" native --version "$VERSION")"
if ! grep -qxF "# laas flags: $LLAMA_CMAKE_ARGS $LLAMA_CFLAGS" "$BUILD/laas-flags.txt" 2>/dev/null; then
  echo "configuring $LLAMA ($LLAMA_CMAKE_ARGS $LLAMA_CFLAGS)"
  rm -f "$BUILD/CMakeCache.txt"
  # shellcheck disable=SC2086  # the flags are words
  CFLAGS="$LLAMA_CFLAGS" CXXFLAGS="$LLAMA_CFLAGS" cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_COMPILER="$CXX_BIN" $LLAMA_CMAKE_ARGS -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF -DGGML_OPENCL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >&2
  echo "# laas flags: $LLAMA_CMAKE_ARGS $LLAMA_CFLAGS" > "$BUILD/laas-flags.txt"
fi
start=$SECONDS
cmake --build "$BUILD" --target "${TARGETS[@]}" -j"$JOBS" >&2
echo "${TARGETS[*]} built in $((SECONDS - start)) s (llama.cpp from llama-cpp-python $VERSION)" >&2
for t in "${TARGETS[@]}"; do
  BIN="$BUILD/bin/$t"
  [ -x "$BIN" ] || die "the build finished but $BIN is missing"
  echo "$BIN"
done
