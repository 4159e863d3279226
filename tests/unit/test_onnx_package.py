"""ONNX package manifests: written, read back, and every file checked before a parser sees it."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path

import pytest

from laas.core.errors import ModelLoadError
from laas.daemon.onnx_package import (
    MANIFEST,
    DecoderShape,
    Manifest,
    describe_files,
    find_packages,
    hash_file,
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


def _bounded(fn: Callable[[], object], fifos: list[Path]) -> None:
    """Runs `fn` in a thread; fails (and unblocks a reader stuck on a FIFO) if it does not end in 10 s."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn)
        try:
            future.result(timeout=10)
        except FuturesTimeout:
            for fifo in fifos:  # a writer that closes at once: the blocked reader sees EOF and the thread ends
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            raise AssertionError("reading the package blocked on a FIFO") from None


@pytest.mark.parametrize("name", ["model.onnx.data", MANIFEST])
def test_a_fifo_in_a_package_is_refused_without_blocking(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "m"
    _package(folder)
    fifo = folder / name
    if name != MANIFEST:  # the manifest lists it with the size a FIFO stats as
        data = json.loads((folder / MANIFEST).read_text())
        data["files"] = [f | {"size": 0} if f["path"] == name else f for f in data["files"]]
        (folder / MANIFEST).write_text(json.dumps(data))
    fifo.unlink()
    os.mkfifo(fifo)

    def load() -> None:
        with pytest.raises(ModelLoadError, match=f"m/{name} is not a regular file"):
            verify_files(folder, read_manifest(folder))

    _bounded(load, [fifo])
    if name != MANIFEST:  # and when it became a FIFO after the cheap check, hashing refuses it too
        with pytest.raises(ModelLoadError, match="is not a regular file"):
            _bounded(lambda: hash_file(fifo, 0, name), [fifo])


def test_hashing_reads_no_more_than_the_manifest_says(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    manifest = _package(folder)
    entry = next(f for f in manifest.files if f.path == "model.onnx.data")
    assert hash_file(folder / entry.path, entry.size, entry.path) == entry.sha256
    with pytest.raises(ModelLoadError, match="changed while it was read"):
        hash_file(folder / entry.path, entry.size - 1, entry.path)


def test_hashing_gives_up_past_its_time_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "m"
    manifest = _package(folder)
    monkeypatch.setattr("laas.daemon.onnx_package.HASH_SLACK_S", -1.0)  # a bound already past: slow storage
    with pytest.raises(ModelLoadError, match="could not be read within"):
        verify_files(folder, manifest)
