"""ONNX model packages: a folder in the model store with a graph, its weights, a tokenizer and a manifest.

Layer: infrastructure (pure file handling; no onnxruntime). The exporters write packages; the daemon
finds them in the store (any folder with a `manifest.json`), checks every file against the sizes and
sha256 digests the manifest records, and only then lets onnxruntime parse the graph. A truncated or
altered file is refused with the file's name, not with a parser's stack trace. Only regular files are
read: a FIFO, device or socket in a package is refused before anything opens it for a blocking read
(it would hang the load, and the residency lock with it), and hashing is bounded in bytes and time.

    models/smollm2-135m-instruct-int4/
        manifest.json          what this is: format, quantization, context, source, files, evaluation
        model.onnx             the decoder graph (GroupQueryAttention layout, see laas.exporters.fuse)
        model.onnx.data        its weights (ONNX external data)
        tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json, config.json

An embedding package (a sentence-embedding encoder, `embedding` set, `decoder` null) holds model.onnx
(optimum's feature-extraction graph: token ids in, last hidden states out) and tokenizer.json; how the
hidden states become one vector (pooling, normalization, the window) is in `embedding`, read at export
from the model's sentence-transformers files (modules.json, 1_Pooling/config.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from laas.core.errors import ModelLoadError
from laas.daemon.store import sha256_of

MANIFEST = "manifest.json"
PACKAGE_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20
CHUNK = 1 << 20
# Hashing a file may take this long, plus a second per MIN_HASH_RATE bytes (a slow SD card reads ~20 MB/s).
HASH_SLACK_S = 10.0
MIN_HASH_RATE = 5 << 20


@dataclass(frozen=True, slots=True)
class PackageFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class DecoderShape:
    """What the engine needs to preallocate the KV cache and feed the graph."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


POOLINGS = ("mean", "cls", "max", "mean_sqrt_len", "last")


@dataclass(frozen=True, slots=True)
class EmbeddingSpec:
    """How an encoder's hidden states become one vector per input."""

    dimensions: int  # the vector size (the hidden size, with no dense layer after pooling)
    pooling: str  # one of POOLINGS, over the tokens the attention mask keeps
    normalize: bool  # the model's own last step is L2 normalization (sentence-transformers' Normalize)
    max_tokens: int  # the window: inputs longer than this are refused, or cut when the caller asks
    pad_token_id: int = 0
    # Smaller sizes the model was trained to be cut to (Matryoshka); empty: only the full size.
    matryoshka_dimensions: tuple[int, ...] = ()
    # Graph inputs besides input_ids/attention_mask (BERT's token_type_ids: all zeros for one segment).
    token_type_ids: bool = False


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    quantization: str  # "fp32", "int8", "int4-b32", ...
    context_length: int
    architecture: str
    decoder: DecoderShape | None  # None: an embedding package (see `embedding`)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos: bool
    source: Mapping[str, Any]  # {"kind": "gguf"|"hf", "name": ..., "sha256": ...}
    files: tuple[PackageFile, ...]
    graph: str = "model.onnx"
    tokenizer: str = "tokenizer.json"
    chat_template: str | None = "chat_template.jinja"
    reference: str | None = None  # the unquantized package this one was evaluated against
    evaluation: Mapping[str, Any] | None = None
    format: str = "onnx"
    version: int = PACKAGE_VERSION
    created: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    embedding: EmbeddingSpec | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @staticmethod
    def from_json(text: str, where: str = MANIFEST) -> Manifest:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            if data.get("format") != "onnx":
                raise ValueError(f"format is {data.get('format')!r}, not 'onnx'")
            if int(data.get("version", 0)) > PACKAGE_VERSION:
                raise ValueError(f"version {data['version']} is newer than this daemon reads ({PACKAGE_VERSION})")
            data["decoder"] = DecoderShape(**data["decoder"]) if data.get("decoder") is not None else None
            if data.get("embedding") is not None:
                spec = dict(data["embedding"])
                spec["matryoshka_dimensions"] = tuple(int(d) for d in spec.get("matryoshka_dimensions", ()))
                data["embedding"] = EmbeddingSpec(**spec)
                if data["embedding"].pooling not in POOLINGS:
                    raise ValueError(f"embedding.pooling {data['embedding'].pooling!r} is not one of {POOLINGS}")
                if data["embedding"].dimensions < 1 or data["embedding"].max_tokens < 2:
                    raise ValueError("embedding.dimensions and embedding.max_tokens must be positive")
            elif data["decoder"] is None:
                raise ValueError("neither decoder nor embedding is set")
            data["files"] = tuple(PackageFile(**f) for f in data["files"])
            data["eos_token_ids"] = tuple(int(i) for i in data["eos_token_ids"])
            return Manifest(**data)
        except (ValueError, TypeError, KeyError) as e:
            raise ModelLoadError(f"{where} is not a valid laas ONNX manifest: {e}") from e

    def file(self, path: str) -> PackageFile | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def open_regular(path: Path, where: str) -> BinaryIO:
    """Opens `path` for reading if it is a regular file (symlinks followed). It is opened non-blocking,
    so a FIFO does not wait for a writer, and checked on the opened descriptor (no swap in between)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError as e:
        raise ModelLoadError(f"{where} is missing") from e
    except OSError as e:
        raise ModelLoadError(f"{where} cannot be opened: {e.strerror}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelLoadError(f"{where} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_manifest(folder: Path) -> Manifest:
    where = f"{folder.name}/{MANIFEST}"
    try:
        with open_regular(folder / MANIFEST, where) as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except ModelLoadError as e:
        if not (folder / MANIFEST).exists():
            raise ModelLoadError(f"{folder.name}: no {MANIFEST}; not an ONNX model package") from e
        raise
    except OSError as e:
        raise ModelLoadError(f"{where} cannot be read: {e}") from e
    if len(data) > MAX_MANIFEST_BYTES:
        raise ModelLoadError(f"{where} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{where} cannot be read: {e}") from e
    return Manifest.from_json(text, where)


def hash_file(path: Path, size: int, where: str) -> str:
    """sha256 of a regular file of `size` bytes, reading at most one byte more, within a time bound."""
    bound_s = HASH_SLACK_S + size / MIN_HASH_RATE
    deadline = time.monotonic() + bound_s
    digest = hashlib.sha256()
    read = 0
    with open_regular(path, where) as f:
        while read <= size and (block := f.read(min(CHUNK, size + 1 - read))):
            digest.update(block)
            read += len(block)
            if time.monotonic() > deadline:
                raise ModelLoadError(f"{where} could not be read within {bound_s:.0f}s")
    if read != size:
        raise ModelLoadError(f"{where} changed while it was read (size {size} in the manifest)")
    return digest.hexdigest()


def verify_files(folder: Path, manifest: Manifest, digests: bool = True) -> None:
    """Checks each file's presence, size and (unless `digests` is False) sha256 against the manifest."""
    root = folder.resolve()
    for entry in manifest.files:
        path = (folder / entry.path).resolve()
        if root not in path.parents:
            raise ModelLoadError(f"{folder.name}/{MANIFEST}: file {entry.path!r} is outside the package")
        try:
            info = path.stat()
        except FileNotFoundError as e:
            raise ModelLoadError(f"{folder.name}/{entry.path} is missing") from e
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(f"{folder.name}/{entry.path} is not a regular file")
        size = info.st_size
        if size != entry.size:
            raise ModelLoadError(f"{folder.name}/{entry.path} is {size} bytes, the manifest says {entry.size}: "
                                 "truncated or replaced since export")
    for entry in manifest.files if digests else ():
        if hash_file(folder / entry.path, entry.size, f"{folder.name}/{entry.path}") != entry.sha256:
            raise ModelLoadError(f"{folder.name}/{entry.path} does not match its sha256 in the manifest: "
                                 "corrupted or modified since export")
    for needed in (manifest.graph, manifest.tokenizer):
        if manifest.file(needed) is None:
            raise ModelLoadError(f"{folder.name}/{MANIFEST} does not list {needed}")


def describe_files(folder: Path, names: list[str]) -> tuple[PackageFile, ...]:
    """Manifest entries for files already written into `folder`."""
    return tuple(PackageFile(n, (folder / n).stat().st_size, sha256_of(folder / n)) for n in sorted(names))


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def find_packages(store_root: Path) -> list[Path]:
    """Folders directly under the store that hold a manifest (not checked here: loading checks them)."""
    try:
        children = sorted(store_root.iterdir())
    except OSError:
        return []
    return [c for c in children if not c.name.startswith(".") and (c / MANIFEST).is_file()]
