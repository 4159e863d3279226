"""ONNX model packages: a folder in the model store with a graph, its weights, a tokenizer and a manifest.

Layer: infrastructure (pure file handling; no onnxruntime). The exporters write packages; the daemon
finds them in the store (any folder with a `manifest.json`), checks every file against the sizes and
sha256 digests the manifest records, and only then lets onnxruntime parse the graph. A truncated or
altered file is refused with the file's name, not with a parser's stack trace.

    models/smollm2-135m-instruct-int4/
        manifest.json          what this is: format, quantization, context, source, files, evaluation
        model.onnx             the decoder graph (GroupQueryAttention layout, see laas.exporters.fuse)
        model.onnx.data        its weights (ONNX external data)
        tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json, config.json
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from laas.daemon.errors import ModelLoadError
from laas.daemon.store import sha256_of

MANIFEST = "manifest.json"
PACKAGE_VERSION = 1


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


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    quantization: str  # "fp32", "int8", "int4-b32", ...
    context_length: int
    architecture: str
    decoder: DecoderShape
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
            data["decoder"] = DecoderShape(**data["decoder"])
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


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ModelLoadError(f"{folder.name}: no {MANIFEST}; not an ONNX model package") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{folder.name}/{MANIFEST} cannot be read: {e}") from e
    return Manifest.from_json(text, f"{folder.name}/{MANIFEST}")


def verify_files(folder: Path, manifest: Manifest, digests: bool = True) -> None:
    """Checks each file's presence, size and (unless `digests` is False) sha256 against the manifest."""
    root = folder.resolve()
    for entry in manifest.files:
        path = (folder / entry.path).resolve()
        if root not in path.parents:
            raise ModelLoadError(f"{folder.name}/{MANIFEST}: file {entry.path!r} is outside the package")
        try:
            size = path.stat().st_size
        except FileNotFoundError as e:
            raise ModelLoadError(f"{folder.name}/{entry.path} is missing") from e
        if size != entry.size:
            raise ModelLoadError(f"{folder.name}/{entry.path} is {size} bytes, the manifest says {entry.size}: "
                                 "truncated or replaced since export")
    for entry in manifest.files if digests else ():
        if sha256_of(folder / entry.path) != entry.sha256:
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
