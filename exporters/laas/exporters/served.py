"""`laas eval MODEL`: the evaluation of `laas export`, rerun on any model the daemon serves.

Layer: exporters. The model is found as the daemon finds it (an ONNX package in the store, a configured
[[models]] table, or the default GGUF model), then scored in process: perplexity needs every position's
logits, which the gRPC API does not expose. An ONNX package is compared with the fp32 package named in
its manifest when that is in the store; any model can be compared with `--reference`.
"""

from __future__ import annotations

from pathlib import Path

from laas.daemon.gguf_header import read_gguf_header
from laas.daemon.onnx_package import read_manifest
from laas.daemon.settings import DEFAULT_MODEL_NAME, Settings
from laas.daemon.store import DEFAULT_MODEL, ModelStore
from laas.exporters.errors import ExportError
from laas.exporters.evaluate import Evaluation, Scores, evaluate_gguf, evaluate_onnx


def locate(settings: Settings, name: str) -> tuple[str, Path]:
    """(format, path) of a served model by name."""
    store = ModelStore(settings.store)
    for cfg in settings.models:
        if cfg.name == name:
            return cfg.format, store.resolve(cfg.path, field="model")
    package = store.root / name
    if name and (package / "manifest.json").is_file():
        return "onnx", store.resolve(name, field="model")
    if name == DEFAULT_MODEL_NAME:
        return "gguf", store.file_for(DEFAULT_MODEL.filename, field="model")
    raise ExportError(f"no model {name!r} in {store.root} or the config")


def evaluate_served(settings: Settings, name: str, *, reference: str | None = None, threads: int = 1,
                    tokens: int | None = None) -> tuple[str, str, Evaluation]:
    """(name, quantization, evaluation) of a served model."""
    fmt, path = locate(settings, name)
    if reference is None and fmt == "onnx":
        reference = read_manifest(path).reference
        if reference and not (settings.store / reference).is_dir():
            reference = None
    ref: tuple[str, Scores] | None = None
    if reference and reference != name:
        _, ref_scores = _evaluate(*locate(settings, reference), threads, tokens, None)
        ref = (reference, ref_scores)
    evaluation, _ = _evaluate(fmt, path, threads, tokens, ref)
    quantization = read_manifest(path).quantization if fmt == "onnx" else read_gguf_header(path).quantization
    return name, quantization, evaluation


def _evaluate(fmt: str, path: Path, threads: int, tokens: int | None,
              ref: tuple[str, Scores] | None) -> tuple[Evaluation, Scores]:
    if fmt == "onnx":
        return evaluate_onnx(path, threads=threads, tokens=tokens, reference=ref)
    return evaluate_gguf(path, threads=threads, tokens=tokens, reference=ref)
