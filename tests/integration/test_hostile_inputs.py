"""Hostile inputs from clients and files: model names that try to leave the store, malformed GGUF files
given to `laasd pull`, and a garbage ONNX model (refused with a clear error while the daemon serves on).
Corrupt files and escaping paths in [[models]] are in test_errors.py; the store's own confinement
(.., absolute paths, symlinks out) in tests/unit/test_store.py; fuzzing in tests/fuzz."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from laas.client import Client, LaasError
from tests.daemon_process import DaemonProcess

NAMES = ["../../../../etc/passwd", "/etc/passwd", "models/../../secret.gguf", "..", ".", "a\x00b",
         "SmolLM2-135M-Instruct.Q4_1.gguf", "~root/.ssh/id_rsa", "x" * 5000, "%2e%2e/%2e%2e/etc/passwd"]


@pytest.mark.parametrize("name", NAMES)
def test_client_model_names_never_reach_the_file_system(client: Client, name: str) -> None:
    for call in (lambda: client.model(name), lambda: client.complete("Hi", model=name, max_tokens=1),
                 lambda: client.tokenize("Hi", model=name)):
        with pytest.raises(LaasError) as info:
            call()
        assert info.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), info.value
        assert "root:" not in str(info.value)


def _gguf(*, version: int = 3, tensors: int = 0, kvs: int = 0, body: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, kvs) + body


MALFORMED = {
    "empty": b"",
    "bad-magic": b"GGML" + b"\x00" * 60,
    "truncated-header": b"GGUF\x03\x00",
    "unknown-version": _gguf(version=99),
    "huge-tensor-count": _gguf(tensors=2**62),
    "huge-kv-count": _gguf(kvs=2**62),
    "huge-string": _gguf(kvs=1, body=struct.pack("<Q", 2**60) + b"key"),
    "bad-value-type": _gguf(kvs=1, body=struct.pack("<Q", 3) + b"key" + struct.pack("<I", 77)),
    "deep-array": _gguf(kvs=1, body=struct.pack("<Q", 1) + b"k" + (struct.pack("<IIQ", 9, 9, 1)) * 64),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_laasd_pull_refuses_malformed_gguf_with_a_clear_error(tmp_path: Path, name: str) -> None:
    bad = tmp_path / f"{name}.gguf"
    bad.write_bytes(MALFORMED[name])
    done = subprocess.run([sys.executable, "-m", "laas.daemon.cli", "--home", str(tmp_path / "home"), "pull",
                           str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, (done.returncode, done.stderr)  # an error, not a crash (negative: a signal)
    assert f"{name}.gguf" in done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "home" / "models").glob("*.gguf")) if (tmp_path / "home" / "models").exists() \
        else True


def test_a_garbage_onnx_model_is_refused_and_the_daemon_serves(start_daemon: Callable[..., DaemonProcess],
                                                                 make_home: Callable[..., Path]) -> None:
    home = make_home()
    (home / "models" / "bad.onnx").write_bytes(b"\x08\x07garbage")
    daemon = start_daemon('[[models]]\nname = "x"\npath = "bad.onnx"\nformat = "onnx"\n', home=home)
    with Client(daemon.target) as client:
        bad = next(m for m in client.models() if m.name == "x")
        assert bad.state == "failed" and bad.error
        with pytest.raises(LaasError) as info:
            list(client.generate("Hi", model="x", max_tokens=2))
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert client.complete("Hello", max_tokens=2).completion_tokens == 2
