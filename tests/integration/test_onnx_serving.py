"""The daemon serves exported ONNX packages over real gRPC: found in the store with no config, streamed,
chatted with, never importing torch/transformers/optimum, and refusing broken packages while it serves.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from laas.client import Client, LaasError
from laas.daemon.onnx_package import describe_files, read_manifest, write_manifest
from tests.conftest import OnnxExport, copy_package
from tests.daemon_process import DaemonProcess

INT4 = "smollm2-135m-instruct-int4"
BLOCKED = ("torch", "transformers", "optimum")

_SITECUSTOMIZE = f'''
import importlib.abc, os, sys

class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            with open(os.environ["LAAS_TEST_IMPORT_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ImportError("the laas daemon must not import " + name)

sys.meta_path.insert(0, _Refuse())
'''


def _import_guard(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment that makes any import of the export-only packages fail, and logs the attempt."""
    folder = tmp_path / "guard"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    log = tmp_path / "blocked-imports.log"
    return {"PYTHONPATH": str(folder), "LAAS_TEST_IMPORT_LOG": str(log)}, log


def test_daemon_serves_packages_from_the_store_without_torch(
        onnx_export: OnnxExport, make_home: Callable[..., Path], start_daemon: Callable[..., DaemonProcess],
        tmp_path: Path) -> None:
    env, log = _import_guard(tmp_path)
    guard_works = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert guard_works.returncode != 0 and "must not import torch" in guard_works.stderr
    log.unlink()

    home = make_home()
    for kind in ("fp32", "int8", "int4"):
        copy_package(onnx_export.package(kind), home / "models")
    daemon = start_daemon(home=home, env=env)
    with Client(daemon.target) as client:
        models = {m.name: m for m in client.models()}
        assert set(models) == {"smollm2-135m-instruct", "smollm2-135m-instruct-fp32",
                               "smollm2-135m-instruct-int8", INT4}
        m = models[INT4]
        # described from its manifest at start; loaded on first use
        assert (m.format, m.quantization, m.state, m.architecture) == ("onnx", "int4-b32", "not_loaded", "llama")
        assert (m.context_length, m.trained_context_length) == (4096, 8192)
        assert m.size_bytes == read_manifest(home / "models" / INT4).size_bytes
        assert models["smollm2-135m-instruct"].is_default and not m.is_default

        chunks = list(client.generate("Once upon a time", model=INT4, max_tokens=24, temperature=0,
                                      ignore_eos=True, timeout=60))
        assert len(chunks) >= 10, "tokens arrive as a stream, not at once"
        assert "".join(c.text for c in chunks).strip()
        last = chunks[-1]
        assert (last.finish_reason, last.completion_tokens, last.model or chunks[0].model) == ("length", 24, INT4)
        assert last.timings["decode_tokens_per_second"] > 0 and last.timings["load_ms"] > 0
        assert client.model(INT4).state == "ready"

        reply = "".join(c.text for c in client.chat([{"role": "user", "content": "What is 2+2?"}], model=INT4,
                                                    max_tokens=64, temperature=0, timeout=60))
        assert reply.strip() and "<|im_end|>" not in reply
        assert client.tokenize("Hello world, café", model=INT4) == client.tokenize("Hello world, café")
        for name in ("smollm2-135m-instruct-fp32", "smollm2-135m-instruct-int8"):
            text = "".join(c.text for c in client.generate("1, 2, 3,", model=name, max_tokens=8, temperature=0))
            assert "4" in text, (name, text)
    assert daemon.stop() == 0
    assert not log.exists(), f"the daemon tried to import: {log.read_text()}"


def test_broken_packages_are_refused_and_the_daemon_keeps_serving(
        onnx_export: OnnxExport, make_home: Callable[..., Path], start_daemon: Callable[..., DaemonProcess]) -> None:
    home = make_home()
    store = home / "models"
    truncated = copy_package(onnx_export.package("int4"), store, "truncated-int4", link=False)
    graph = truncated / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    # Garbage whose digest the manifest agrees with: only onnxruntime can tell.
    garbage = copy_package(onnx_export.package("int4"), store, "garbage-int4", link=False)
    (garbage / "model.onnx").write_bytes(b"\x08\x07this is not an onnx graph" * 100)
    manifest = read_manifest(garbage)
    write_manifest(garbage, type(manifest)(**{**{f: getattr(manifest, f) for f in manifest.__dataclass_fields__},
                                              "files": describe_files(garbage, [f.path for f in manifest.files])}))
    copy_package(onnx_export.package("int4"), store)

    daemon = start_daemon(home=home)
    with Client(daemon.target) as client:
        models = {m.name: m for m in client.models()}
        assert models["truncated-int4"].state == "failed"
        assert "model.onnx" in models["truncated-int4"].error and "truncated" in models["truncated-int4"].error
        assert models["garbage-int4"].state == "not_loaded"  # its sizes and digests agree: found at load
        with pytest.raises(LaasError) as refused:
            list(client.generate("Hi", model="truncated-int4", max_tokens=4))
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "truncated" in str(refused.value)
        with pytest.raises(LaasError) as refused:
            list(client.generate("Hi", model="garbage-int4", max_tokens=4))
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert client.model("garbage-int4").state == "failed"
        assert "onnxruntime cannot load garbage-int4/model.onnx" in client.model("garbage-int4").error
        # Everything else serves: the default GGUF model and the intact package.
        for name in ("", INT4):
            text = "".join(c.text for c in client.generate("1, 2, 3,", model=name, max_tokens=6, temperature=0))
            assert text
        assert daemon.health() == "SERVING"


def test_the_daemon_batches_an_onnx_model_and_reuses_its_prefix(
        onnx_export: OnnxExport, make_home: Callable[..., Path], start_daemon: Callable[..., DaemonProcess]) -> None:
    """`parallel = 0` (the default) gives an ONNX package sequences as it gives a GGUF model: four requests
    decode at once, and a follow-up chat turn over the OpenAI API prefills only what the cache lacks."""
    home = make_home()
    copy_package(onnx_export.package("int4"), home / "models")
    daemon = start_daemon("memory_budget_mb = 8192\n", home=home)  # room for 4 f32 KV caches on any machine
    with Client(daemon.target) as client:
        streams = [client.generate(f"{i} Once upon a time", model=INT4, max_tokens=400, ignore_eos=True, timeout=120)
                   for i in range(4)]
        try:
            for s in streams:
                next(s)  # each one's first token arrives while the others still run
            model = client.model(INT4)
            assert (model.parallel, model.active_requests, model.queued_requests) == (4, 4, 0)
        finally:
            for s in streams:
                s.close()
    sdk = openai.OpenAI(base_url=daemon.http_url, api_key="none", max_retries=0, timeout=120)
    history: list[Any] = [{"role": "system", "content": "You are a helpful assistant. " * 20},
                          {"role": "user", "content": "Name a colour."}]
    first = sdk.chat.completions.create(model=INT4, messages=history, max_tokens=8, temperature=0)
    assert first.usage is not None
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Another."}]
    second = sdk.chat.completions.create(model=INT4, messages=history, max_tokens=8, temperature=0)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens
