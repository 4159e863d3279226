#!/usr/bin/env bash
# Builds (once) the llama-cpp-python wheel for one kind of build and prints its path on the last line:
#   bash packaging/llama_wheel.sh native|portable [PYTHON]
# native: this machine's CPU, minus Intel AMX (setup.sh); portable: every CPU of the architecture,
# kernels picked at run time (the .deb). The flags come from daemon/laas/daemon/native_build.py, which
# says why. Wheels are kept in $LAAS_WHEEL_CACHE (default ~/.cache/laas/wheels) under a key naming the
# version, the flags and (native) the CPU: a wheel built with other flags or for another CPU is never
# taken, and pip's own cache is bypassed (it reuses a wheel whatever the build flags say).
# laas' patches to the vendored llama.cpp (packaging/patches/*.patch, each saying why) are applied to
# the sdist's tree before the build; their digests are part of the key.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
kind=${1:?usage: llama_wheel.sh native|portable [PYTHON]}
python=${2:-python3}

log() { printf '\033[1m[llama]\033[0m %s\n' "$*" >&2; }

version=$("$python" -c '
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = [*project["dependencies"], *(d for extra in project.get("optional-dependencies", {}).values() for d in extra)]
print(next(re.fullmatch(r"llama-cpp-python==(\S+)", d).group(1) for d in deps if d.startswith("llama-cpp-python==")))
' "$repo/pyproject.toml")
eval "$("$python" "$repo/daemon/laas/daemon/native_build.py" "$kind" --version "$version" --patches "$repo/packaging/patches")"
cache=${LAAS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/laas/wheels}
dir=$cache/$LLAMA_BUILD_KEY
wheel=$(find "$dir" -maxdepth 1 -name 'llama_cpp_python-*.whl' 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  log "building llama-cpp-python $version ($kind: ${LLAMA_CMAKE_ARGS} ${LLAMA_CFLAGS}); several minutes on 2 cores"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$python" -m pip download -q --no-deps --no-cache-dir --no-binary llama-cpp-python --dest "$tmp/sdist" \
    "llama-cpp-python==$version" >&2
  tar -xzf "$tmp/sdist/llama_cpp_python-$version.tar.gz" -C "$tmp"
  src=$tmp/llama_cpp_python-$version
  applied=()
  while IFS= read -r patch; do
    [ -n "$patch" ] || continue
    log "patching llama.cpp: $(basename "$patch")"
    patch -p1 --forward --batch --silent -d "$src" < "$patch" >&2 \
      || { log "$(basename "$patch") does not apply to llama-cpp-python $version: update or drop it"; exit 1; }
    applied+=("$(basename "$patch")")
  done <<< "$LLAMA_PATCHES"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CFLAGS="$LLAMA_CFLAGS" CXXFLAGS="$LLAMA_CFLAGS" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$python" -m pip wheel -q --no-deps --no-cache-dir --config-settings=build-dir="$tmp/build" "$src" -w "$tmp" >&2
  mkdir -p "$dir"
  # A portable build's CPU variants (libggml-cpu-<variant>.so) are built but not put into the wheel by
  # llama-cpp-python's install rules: they are kept beside it, and the .deb puts them beside libllama.so.
  if compgen -G "$tmp/build/bin/libggml-cpu-*.so" >/dev/null; then
    mkdir -p "$dir/cpu-variants"
    cp "$tmp"/build/bin/libggml-cpu-*.so "$dir/cpu-variants/"
  fi
  mv "$tmp"/llama_cpp_python-*.whl "$dir/"
  printf '%s\n' "key=$LLAMA_BUILD_KEY" "cmake_args=$LLAMA_CMAKE_ARGS" "cflags=$LLAMA_CFLAGS" \
    "excluded_variants=$LLAMA_EXCLUDED_VARIANTS" "patches=${applied[*]}" \
    > "$dir/build.txt"
  wheel=$(find "$dir" -maxdepth 1 -name 'llama_cpp_python-*.whl' | head -n1)
fi
echo "$wheel"
