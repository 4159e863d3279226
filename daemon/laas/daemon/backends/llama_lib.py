"""The llama.cpp library laas runs: loading its CPU backend, and saying which build and variant is in use.

Layer: infrastructure. A portable build (the .deb) ships every CPU variant of ggml's CPU backend as a
shared library beside libllama.so (`libggml-cpu-haswell.so`, ...); ggml picks the best one the CPU
supports, but by default it looks only beside the executable and in the working directory, so
:func:`init_backends` points it at the package's own folder before llama.cpp starts. A native build
(setup.sh) has one CPU backend linked in and needs nothing. Everything here except :func:`init_backends`
is safe to call without loading native code.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import sys
import threading
from pathlib import Path

_lock = threading.Lock()
_initialised = False
# The stamp setup.sh and the .deb write: "<build key> <sha256 of libllama.so>".
BUILD_STAMP = "llama-build.txt"


def lib_dir() -> Path | None:
    """llama-cpp-python's folder of native libraries, found without importing (loading) it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "lib"


def cpu_variants(folder: Path | None = None) -> list[str]:
    """The CPU backend variants a portable build ships (empty for a native build)."""
    folder = folder or lib_dir()
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name.removeprefix("libggml-cpu-").removesuffix(".so") for p in folder.glob("libggml-cpu-*.so"))


def init_backends() -> None:
    """Loads llama.cpp and, for a portable build, the best CPU variant from the package's own folder.

    Idempotent and thread-safe; call before `llama_backend_init`. (Importing llama_cpp loads the
    native library; the variant's kernels first run at the first decode.)"""
    global _initialised
    with _lock:
        if _initialised:
            return
        import llama_cpp  # noqa: F401  (loads libllama.so and libggml*.so)

        folder = lib_dir()
        if folder is not None and cpu_variants(folder):
            ggml = ctypes.CDLL(str(_loaded("libggml.so") or folder / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
            if ggml.ggml_backend_reg_count() == 0:
                ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
                ggml.ggml_backend_load_all_from_path(str(folder).encode())
        _initialised = True


def _loaded(prefix: str) -> Path | None:
    """The file of an already loaded library whose name starts with `prefix` (a wheel holds copies, not
    links: libggml.so and libggml.so.0 are two files, and only the one libllama.so loaded has the registry)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if path.startswith("/") and Path(path).name.startswith(prefix):
            return Path(path)
    return None


def cpu_backend_in_use() -> str:
    """The CPU variant this process loaded ("haswell", ...), or "built in" for a native build."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith("libggml-cpu-") and name.endswith(".so"):
            return name.removeprefix("libggml-cpu-").removesuffix(".so")
    return "built in"


def native_digest() -> str:
    """A digest of llama.cpp's native libraries: a new build (or a replaced file) gets a new one."""
    folder = lib_dir()
    h = hashlib.sha256()
    if folder is not None and folder.is_dir():
        for path in sorted(folder.glob("*.so*")):
            h.update(path.name.encode())
            with path.open("rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def build_key() -> str:
    """The build setup.sh or the .deb installed (its flags are named by the key), or "unknown"."""
    try:
        return (Path(sys.prefix) / BUILD_STAMP).read_text().split()[0]
    except (OSError, IndexError):
        return "unknown (not installed by packaging/setup.sh or the .deb)"
