"""A FIFO in an ONNX package fails that model with the reason; nothing blocks on it: not the other
models' loads and unloads, not SIGTERM (issue #13, item 16)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from laas.client import Client
from laas.core.errors import ModelLoadError
from laas.daemon.onnx_package import DecoderShape, Manifest, PackageFile, describe_files, write_manifest
from tests.daemon_process import DaemonProcess


@pytest.fixture
def fifo_package(make_home: Callable[..., Path]) -> Iterator[tuple[Path, Path]]:
    """A home whose store holds the default model and a package "piped" whose graph is a FIFO."""
    home = make_home()
    folder = home / "models" / "piped"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    fifo = folder / "model.onnx"
    os.mkfifo(fifo)
    write_manifest(folder, Manifest(
        name="piped", quantization="int8", context_length=2048, architecture="llama",
        decoder=DecoderShape(30, 9, 3, 64, 49152), bos_token_id=1, eos_token_ids=(2,), add_bos=False,
        source={"kind": "gguf"}, files=(PackageFile("model.onnx", 0, "00" * 32),
                                        *describe_files(folder, ["tokenizer.json"]))))
    yield home, fifo
    with contextlib.suppress(OSError):  # a reader still blocked on it (before the fix) gets EOF
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_in_a_package_fails_that_model_and_blocks_nothing(
        start_daemon: Callable[..., DaemonProcess], fifo_package: tuple[Path, Path]) -> None:
    home, _ = fifo_package
    daemon = start_daemon(home=home)
    with Client(daemon.target) as client:
        with pytest.raises(ModelLoadError, match=r"model\.onnx is not a regular file"):
            client.complete("hi", model="piped", max_tokens=1, timeout=20)
        assert client.model("piped").state == "failed"
        assert client.unload_model(timeout=20).state == "not_loaded"  # the residency lock is free
        assert client.load_model(timeout=20).state == "ready"
    assert daemon.stop(timeout=30) == 0, daemon.log
