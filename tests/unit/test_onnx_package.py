"""ONNX package manifests: written, read back, and every file checked before a parser sees it."""

from __future__ import annotations

from pathlib import Path

import pytest

from laas.daemon.errors import ModelLoadError
from laas.daemon.onnx_package import (
    DecoderShape,
    Manifest,
    describe_files,
    find_packages,
    read_manifest,
    verify_files,
    write_manifest,
)


def _package(folder: Path) -> Manifest:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"graph" * 100)
    (folder / "model.onnx.data").write_bytes(b"\x00" * 4096)
    (folder / "tokenizer.json").write_text("{}")
    manifest = Manifest(
        name=folder.name, quantization="int4-b32", context_length=8192, architecture="llama",
        decoder=DecoderShape(30, 9, 3, 64, 49152), bos_token_id=1, eos_token_ids=(2,), add_bos=False,
        source={"kind": "gguf", "sha256": "ab" * 32},
        files=describe_files(folder, ["model.onnx", "model.onnx.data", "tokenizer.json"]),
        evaluation={"perplexity": 12.5},
    )
    write_manifest(folder, manifest)
    return manifest


def test_manifest_round_trips(tmp_path: Path) -> None:
    written = _package(tmp_path / "m-int4")
    read = read_manifest(tmp_path / "m-int4")
    assert read == written
    assert read.size_bytes == 500 + 4096 + 2
    verify_files(tmp_path / "m-int4", read)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / "model.onnx.data").write_bytes(b"\x00" * 100), "truncated or replaced"),
    (lambda f: (f / "model.onnx.data").write_bytes(b"\x01" * 4096), "does not match its sha256"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
])
def test_damaged_files_are_named(tmp_path: Path, damage: object, message: str) -> None:
    folder = tmp_path / "m"
    manifest = _package(folder)
    damage(folder)  # type: ignore[operator]
    with pytest.raises(ModelLoadError, match=message):
        verify_files(folder, manifest)


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "not a valid laas ONNX manifest"),
    ('{"format": "gguf"}', "format is 'gguf'"),
    ('{"format": "onnx", "version": 99}', "newer than this daemon reads"),
    ('{"format": "onnx", "name": "x"}', "not a valid laas ONNX manifest"),
])
def test_bad_manifests_are_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        read_manifest(tmp_path / "m")


def test_files_outside_the_package_are_refused(tmp_path: Path) -> None:
    manifest = _package(tmp_path / "m")
    (tmp_path / "secret").write_text("x")
    escaping = Manifest(**{**{f: getattr(manifest, f) for f in manifest.__dataclass_fields__},
                           "files": (*manifest.files, *describe_files(tmp_path, ["secret"]))})
    object.__setattr__(escaping.files[-1], "path", "../secret")
    with pytest.raises(ModelLoadError, match="outside the package"):
        verify_files(tmp_path / "m", escaping)


def test_find_packages_lists_folders_with_a_manifest(tmp_path: Path) -> None:
    _package(tmp_path / "b-int4")
    _package(tmp_path / "a-fp32")
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    _package(tmp_path / ".staging-x")
    assert [p.name for p in find_packages(tmp_path)] == ["a-fp32", "b-int4"]
    assert find_packages(tmp_path / "missing") == []
