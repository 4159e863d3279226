"""A model's digest: what tells two daemons' copies of one embedding model apart (LAN peers compare it).

Layer: daemon. An ONNX package's digest is the sha256 of its manifest's file list (each file's path and
sha256, sorted): two exports of the same model with the same settings agree, whenever they were made; a
GGUF file's is its sha256 (the configured `sha256` when given, else the file's, hashed once per
size and mtime). A configured model whose files are not here has the configured `sha256` as its
digest: the model it stands for. None: nothing to tell it by. Peers advertise the digests of their
embedding models (mdns.py, key `emb`), cut to DIGEST_CHARS hex digits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from laas.core.errors import LaasError
from laas.daemon.onnx_package import read_manifest
from laas.daemon.settings import ModelConfig
from laas.daemon.store import ModelStore, sha256_of

DIGEST_CHARS = 16  # 64 bits: enough to tell packages apart, short enough for a TXT record

_hashed: dict[tuple[Path, int, int], str] = {}  # a GGUF's sha256 by (path, size, mtime)


def package_digest(folder: Path) -> str:
    """An ONNX package's digest, from its manifest (the files themselves are checked against it on load)."""
    files = sorted(f"{f.path} {f.sha256}" for f in read_manifest(folder).files)
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def model_digest(store: ModelStore, config: ModelConfig) -> str | None:
    """The digest of the model `config` names, as this daemon has it (module docstring); None: unknown."""
    configured = config.sha256.lower() if config.sha256 else None
    try:
        path = store.resolve(config.path, field="path")
        if config.format == "onnx":
            return package_digest(path) if path.is_dir() else configured
        if configured or not path.is_file():
            return configured
        st = path.stat()
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in _hashed:
            _hashed[key] = sha256_of(path)
        return _hashed[key]
    except (LaasError, OSError):
        return configured
