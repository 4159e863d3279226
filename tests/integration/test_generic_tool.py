"""The README's generic-tool examples, run with a real grpcurl against the real daemon (reflection only)."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="grpcurl ships as an x86-64 binary")


def grpcurl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert tool, "grpcurl is installed by the dev extra"
    *flags, method = args
    return subprocess.run([tool, "-plaintext", *flags, daemon.target, method],
                          capture_output=True, text=True, timeout=60, check=False)


def _messages(stdout: str) -> list[dict[str, object]]:
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(stdout):
        if stdout[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(stdout, i)
        out.append(obj)
    return out


def test_grpcurl_lists_services_through_reflection(daemon: DaemonProcess) -> None:
    result = grpcurl(daemon, "list")
    assert result.returncode == 0, result.stderr
    assert {"laas.v1.Runtime", "grpc.health.v1.Health"} <= set(result.stdout.split())


def test_grpcurl_streams_generate_and_chat(daemon: DaemonProcess) -> None:
    body = {"prompt": "The capital of France is", "sampling": {"max_tokens": 16, "temperature": 0}}
    result = grpcurl(daemon, "-d", json.dumps(body), "laas.v1.Runtime/Generate")
    assert result.returncode == 0, result.stderr
    messages = _messages(result.stdout)
    assert len(messages) > 2
    assert "Paris" in "".join(str(m.get("text", "")) for m in messages)
    assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 16}
    # The README's chat example, greedy: sampled at the defaults (no seed), a small model's answer to "Hi" can
    # run to default_max_tokens now and then and end by length.
    chat = grpcurl(daemon, "-d", '{"messages": [{"role": "user", "content": "Hi"}], "sampling": {"temperature": 0}}',
                   "laas.v1.Runtime/Chat")
    assert chat.returncode == 0, chat.stderr
    assert _messages(chat.stdout)[-1]["finish_reason"] == "FINISH_REASON_STOP"


def test_grpcurl_health_and_errors(daemon: DaemonProcess) -> None:
    health = grpcurl(daemon, "grpc.health.v1.Health/Check")
    assert _messages(health.stdout) == [{"status": "SERVING"}]
    bad = grpcurl(daemon, "-d", '{"sampling": {"top_p": 3}}', "laas.v1.Runtime/Generate")
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "sampling.top_p" in bad.stderr
