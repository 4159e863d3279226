"""`laas export`: source -> optimum export -> fp32 package -> quantized packages -> evaluation -> store.

A sentence-transformers folder (modules.json) takes the encoder's path instead (encoder_pipeline.py).

Layer: exporters (the application service behind the command). The fp32 package is always built and
installed: it is the reference every quantized package is measured against (perplexity, top-1
agreement), and stays servable. Each quantized package passes the quality gate or is left out (its
result then has no path and says why); the others are installed regardless.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from laas.daemon.store import ModelStore
from laas.exporters.encoder import is_sentence_encoder
from laas.exporters.encoder_pipeline import export_encoder
from laas.exporters.errors import ExportError, QualityGateFailed
from laas.exporters.evaluate import Evaluation, evaluate_onnx
from laas.exporters.export import build_fp32, optimum_export
from laas.exporters.package import check_gate, install, write_package_manifest
from laas.exporters.quantize import quantization_label, quantize_int4, quantize_int8
from laas.exporters.results import ExportOptions, PackageResult
from laas.exporters.source import describe_source

__all__ = ["QUANTIZATIONS", "ExportOptions", "PackageResult", "export", "register"]

QUANTIZATIONS = ("fp32", "int8", "int4")


class Steps:
    """Prints each long step with how long it took."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self._out = out
        self._started = time.perf_counter()

    def __call__(self, message: str) -> None:
        self._out(f"[{time.perf_counter() - self._started:6.1f}s] {message}")


DEFAULT_OPTIONS = ExportOptions()


def export(source_location: str | Path, store: ModelStore, cache: Path, options: ExportOptions = DEFAULT_OPTIONS,
           progress: Callable[[str], None] = print) -> list[PackageResult]:
    unknown = set(options.quantizations) - set(QUANTIZATIONS)
    if unknown:
        raise ExportError(f"unknown quantization(s) {sorted(unknown)}; choose from {', '.join(QUANTIZATIONS)}")
    step = Steps(progress)
    source = describe_source(source_location)
    if is_sentence_encoder(source):  # a sentence-transformers folder: embedding packages (encoder_pipeline.py)
        return export_encoder(source, store, cache, options, step)
    base = options.name or source.name
    exported = optimum_export(source, cache, step)
    store.ensure()
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=store.root))
    try:
        fp32 = build_fp32(exported, staging / "fp32", step)
        folders = {"fp32": fp32}
        for kind in options.quantizations:
            if kind == "int8":
                step("quantizing: dynamic int8 (MatMul weights)")
                folders["int8"] = quantize_int8(fp32, staging / "int8")
            elif kind == "int4":
                step(f"quantizing: int4 weight-only (MatMulNBits, block size {options.block_size})")
                folders["int4"] = quantize_int4(fp32, staging / "int4", block_size=options.block_size)
        ref_name = f"{base}-fp32"
        for kind, folder in folders.items():  # provisional manifests: the engine loads packages by them
            write_package_manifest(folder, name=f"{base}-{kind}", evaluation=None,
                                   quantization=quantization_label(kind, options.block_size),
                                   reference=None if kind == "fp32" else ref_name)
        step("evaluating fp32 (the reference): perplexity, size, decode speed")
        ref_eval, ref_scores = evaluate_onnx(fp32, threads=options.threads, tokens=options.eval_tokens)
        results = [register(fp32, store, ref_name, "fp32", None, ref_eval, options, gate=False)]
        for kind in (k for k in options.quantizations if k != "fp32"):
            name = f"{base}-{kind}"
            step(f"evaluating {kind}: perplexity and top-1 agreement against fp32, size, decode speed")
            evaluation, _ = evaluate_onnx(folders[kind], threads=options.threads, tokens=options.eval_tokens,
                                          reference=(ref_name, ref_scores))
            results.append(register(folders[kind], store, name, quantization_label(kind, options.block_size),
                                   ref_name, evaluation, options, gate=True))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    step("done")
    return results


def register(folder: Path, store: ModelStore, name: str, quantization: str, reference: str | None,
             evaluation: Evaluation, options: ExportOptions, *, gate: bool) -> PackageResult:
    """Writes the final manifest and installs the package, unless `gate` is on and the gate refuses it."""
    try:
        if gate:
            check_gate(name, evaluation, options.threshold, options.force)
    except QualityGateFailed as e:
        return PackageResult(name, quantization, evaluation, None, str(e))
    write_package_manifest(folder, name=name, quantization=quantization, reference=reference,
                           evaluation=evaluation, extra={"threshold": options.threshold, "forced": options.force})
    return PackageResult(name, quantization, evaluation, install(folder, store.root, name))
