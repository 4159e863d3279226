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
# llama-cpp-python compiles llama.cpp from source (several minutes on 2 cores); pip caches the wheel.
log "installing laas, its test tools and the export extra (torch CPU, transformers, optimum) into .venv"
.venv/bin/python -m pip install -q -e '.[dev,export]'
log "fetching the default model (once)"
.venv/bin/laasd pull
log "ready: .venv/bin/laasd serve   |   .venv/bin/laas generate 'Hello'"
