"""`laas export` of a sentence encoder: optimum export -> fp32 package -> int8 -> evaluation -> store.

Layer: exporters. As for decoders (pipeline.py): the fp32 package is always built and installed (the
reference), and the int8 package is installed only when its mean cosine to fp32 on the held-out
sentences reaches the gate (encoder_eval.MIN_COSINE), or with --force. int4 is not offered for encoders.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from laas.daemon.onnx_package import EmbeddingSpec, Manifest, describe_files, write_manifest
from laas.daemon.store import ModelStore
from laas.exporters.encoder import build_fp32_encoder, encoder_export, quantize_int8_encoder
from laas.exporters.encoder_eval import EmbeddingEvaluation, check_encoder_gate, evaluate_encoder
from laas.exporters.errors import QualityGateFailed
from laas.exporters.export import EXPORT_META, read_meta
from laas.exporters.package import install
from laas.exporters.results import ExportOptions, PackageResult
from laas.exporters.source import Source

ENCODER_QUANTIZATIONS = ("fp32", "int8")


def export_encoder(source: Source, store: ModelStore, cache: Path, options: ExportOptions,
                   step: Callable[[str], None]) -> list[PackageResult]:

    unsupported = sorted(set(options.quantizations) - set(ENCODER_QUANTIZATIONS))
    if unsupported:
        step(f"{source.name} is a sentence encoder: {', '.join(unsupported)} not offered for encoders; skipped")
    base = options.name or source.name
    exported = encoder_export(source, cache, step)
    store.ensure()
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=store.root))
    results: list[PackageResult] = []
    try:
        folders = {"fp32": build_fp32_encoder(exported, staging / "fp32")}
        if "int8" in options.quantizations:
            step("quantizing: dynamic int8 (MatMul weights, per channel)")
            folders["int8"] = quantize_int8_encoder(folders["fp32"], staging / "int8")
        ref_name = f"{base}-fp32"
        for kind, folder in folders.items():  # provisional manifests: the engine loads packages by them
            write_encoder_manifest(folder, name=f"{base}-{kind}", quantization=kind, evaluation=None,
                                   reference=None if kind == "fp32" else ref_name)
        step("evaluating fp32 (the reference): held-out sentences, size, sentences/s")
        ref_eval, ref_vectors = evaluate_encoder(folders["fp32"], threads=options.threads)
        results.append(_register(folders["fp32"], store, ref_name, "fp32", None, ref_eval, options, gate=False))
        if "int8" in folders:
            step("evaluating int8: cosine to fp32 on the held-out sentences, size, sentences/s")
            evaluation, _ = evaluate_encoder(folders["int8"], threads=options.threads,
                                             reference=(ref_name, ref_vectors))
            results.append(_register(folders["int8"], store, f"{base}-int8", "int8", ref_name, evaluation,
                                     options, gate=True))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    step("done")
    return results


def _register(folder: Path, store: ModelStore, name: str, quantization: str, reference: str | None,
              evaluation: EmbeddingEvaluation, options: ExportOptions, *, gate: bool) -> PackageResult:
    try:
        if gate:
            check_encoder_gate(name, evaluation, force=options.force)
    except QualityGateFailed as e:
        return PackageResult(name, quantization, evaluation, None, str(e))
    write_encoder_manifest(folder, name=name, quantization=quantization, reference=reference,
                           evaluation=evaluation, extra={"forced": options.force})
    return PackageResult(name, quantization, evaluation, install(folder, store.root, name))


def write_encoder_manifest(folder: Path, *, name: str, quantization: str, reference: str | None,
                           evaluation: EmbeddingEvaluation | None, extra: dict[str, Any] | None = None) -> Manifest:
    meta = read_meta(folder)
    e = meta["embedding"]
    spec = EmbeddingSpec(dimensions=e["dimensions"], pooling=e["pooling"], normalize=e["normalize"],
                         max_tokens=e["max_tokens"], pad_token_id=e["pad_token_id"],
                         matryoshka_dimensions=tuple(e["matryoshka_dimensions"]), token_type_ids=True)
    files = [p.name for p in folder.iterdir() if p.is_file() and p.name not in ("manifest.json", EXPORT_META)]
    manifest = Manifest(
        name=name, quantization=quantization, context_length=meta["context_length"],
        architecture=meta["architecture"], decoder=None, bos_token_id=None, eos_token_ids=(), add_bos=False,
        source=meta["source"], files=describe_files(folder, files), chat_template=None, reference=reference,
        evaluation=evaluation.to_dict() if evaluation else None,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), extra=extra or {},
        embedding=spec,
    )
    write_manifest(folder, manifest)
    return manifest
