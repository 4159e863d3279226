"""What quantization cost, measured and enforced: the gate refuses a bad quantization; `laas eval` reruns
the evaluation on served models, GGUF included."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from laas.client.cli import main as laas
from laas.daemon.onnx_package import read_manifest
from laas.daemon.store import ModelStore
from laas.exporters.evaluate import evaluate_onnx
from laas.exporters.export import save_graph
from laas.exporters.package import write_package_manifest
from laas.exporters.pipeline import ExportOptions, register
from tests.conftest import OnnxExport, copy_package

TOKENS = 128


def _spoil(folder: Path) -> None:
    """A bad int4 quantization: every block scale off by a random factor (what a broken quantizer does)."""
    model = onnx.load(str(folder / "model.onnx"))
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        if tensor.name.endswith("_scales") and "embed" not in tensor.name:
            scales = numpy_helper.to_array(tensor)
            noisy = (scales * rng.uniform(0.3, 1.7, scales.shape)).astype(scales.dtype)
            tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    save_graph(model, folder)


def test_the_gate_refuses_a_bad_quantization_unless_forced(onnx_export: OnnxExport, tmp_path: Path) -> None:
    reference = onnx_export.package("fp32")
    _, ref_scores = evaluate_onnx(reference, threads=2, tokens=TOKENS)
    bad = copy_package(onnx_export.package("int4"), tmp_path, "staging", link=False)
    _spoil(bad)
    write_package_manifest(bad, name="bad-int4", quantization="int4-b32", reference=reference.name, evaluation=None)
    evaluation, _ = evaluate_onnx(bad, threads=2, tokens=TOKENS, reference=(reference.name, ref_scores))
    assert evaluation.perplexity_increase is not None and evaluation.perplexity_increase > 0.10

    store = ModelStore(tmp_path / "models")
    store.ensure()
    refused = register(bad, store, "bad-int4", "int4-b32", reference.name, evaluation, ExportOptions(), gate=True)
    assert refused.path is None
    assert "above the 10% threshold; not registered" in refused.refusal
    assert not (store.root / "bad-int4").exists()

    forced = register(bad, store, "bad-int4", "int4-b32", reference.name, evaluation, ExportOptions(force=True),
                      gate=True)
    assert forced.path == store.root / "bad-int4"
    manifest = read_manifest(forced.path)
    assert manifest.extra["forced"] is True
    assert manifest.evaluation is not None and manifest.evaluation["perplexity_increase"] > 0.10


def test_laas_eval_reruns_the_evaluation_on_gguf_and_onnx_models(
        onnx_export: OnnxExport, make_home: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    home = make_home()
    for kind in ("fp32", "int4"):
        copy_package(onnx_export.package(kind), home / "models")
    common = ["--home", str(home), "--tokens", str(TOKENS), "--threads", "2"]

    assert laas(["eval", "smollm2-135m-instruct", *common]) == 0
    row = _row(capsys.readouterr().out, "smollm2-135m-instruct")
    assert row[1] == "Q4_1" and 5 < float(row[2]) < 100 and row[3] == "-"

    assert laas(["eval", "smollm2-135m-instruct-int4", *common]) == 0
    row = _row(capsys.readouterr().out, "smollm2-135m-instruct-int4")
    assert row[1] == "int4-b32"
    assert re.fullmatch(r"[+-]\d+\.\d%", row[3]), row  # perplexity against the package's fp32 reference
    assert float(row[4].rstrip("%")) > 75  # top-1 agreement

    assert laas(["eval", "no-such-model", *common]) == 1
    assert "no model 'no-such-model'" in capsys.readouterr().err


def _row(table: str, name: str) -> list[str]:
    return next(line.split() for line in table.splitlines() if line.split()[:1] == [name])


def test_laas_export_command_registers_packages_and_prints_the_report(
        onnx_export: OnnxExport, tmp_path: Path, capsys: pytest.CaptureFixture[str], model_file: Path) -> None:
    home = tmp_path / "home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "onnx-export").symlink_to(onnx_export.cache)  # reuse the session's optimum export
    code = laas(["export", str(model_file), "--home", str(home), "-q", "int4", "--name", "tiny",
                 "--tokens", str(TOKENS), "--threads", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "reusing the ONNX export" in err and "int4 weight-only (MatMulNBits, block size 32)" in err
    assert _row(out, "tiny-int4")[1] == "int4-b32"
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-fp32", "tiny-int4"]
    assert read_manifest(home / "models" / "tiny-int4").evaluation is not None

    assert laas(["export", str(tmp_path / "missing.gguf"), "--home", str(home)]) == 1
    assert "no such file or folder" in capsys.readouterr().err
