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
from collections.abc import Callable
from pathlib import Path

from laas.core.errors import LaasError
from laas.daemon.onnx_package import MANIFEST, read_manifest
from laas.daemon.settings import ModelConfig
from laas.daemon.store import ModelStore, sha256_of

DIGEST_CHARS = 16  # 64 bits: enough to tell packages apart, short enough for a TXT record

_known: dict[tuple[Path, int, int], str] = {}  # digests by (GGUF file or package manifest, size, mtime)


def package_digest(folder: Path) -> str:
    """An ONNX package's digest, from its manifest (the files themselves are checked against it on load)."""
    files = sorted(f"{f.path} {f.sha256}" for f in read_manifest(folder).files)
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def _once(path: Path, compute: Callable[[], str]) -> str:
    """`compute()` for `path` as it is now: asked again (every Embed, every TXT update), it is not redone."""
    st = path.stat()
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _known:
        _known[key] = compute()
    return _known[key]


def model_digest(store: ModelStore, config: ModelConfig) -> str | None:
    """The digest of the model `config` names, as this daemon has it (module docstring); None: unknown."""
    configured = config.sha256.lower() if config.sha256 else None
    try:
        path = store.resolve(config.path, field="path")
        if config.format == "onnx":
            manifest = path / MANIFEST
            return _once(manifest, lambda: package_digest(path)) if manifest.is_file() else configured
        if configured or not path.is_file():
            return configured
        return _once(path, lambda: sha256_of(path))
    except (LaasError, OSError):
        return configured
