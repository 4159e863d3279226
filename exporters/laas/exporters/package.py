"""Turning an exported folder into a registered package: manifest, quality gate, install into the store.

Layer: exporters. A package is built in a staging folder inside the store (same filesystem), described
by a manifest that lists the sha256 of every file, and only then renamed into place, so the daemon never
sees a half-written package. A quantized package whose perplexity rose more than the threshold over its
fp32 reference is not installed unless forced.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Any

from laas.daemon.onnx_package import DecoderShape, Manifest, describe_files, write_manifest
from laas.exporters.errors import QualityGateFailed
from laas.exporters.evaluate import Evaluation
from laas.exporters.export import EXPORT_META, read_meta

DEFAULT_THRESHOLD = 0.10


def write_package_manifest(folder: Path, *, name: str, quantization: str, reference: str | None,
                           evaluation: Evaluation | None, extra: dict[str, Any] | None = None) -> Manifest:
    meta = read_meta(folder)
    files = [p.name for p in folder.iterdir() if p.is_file() and p.name not in ("manifest.json", EXPORT_META)]
    manifest = Manifest(
        name=name, quantization=quantization, context_length=meta["context_length"],
        architecture=meta["architecture"],
        decoder=DecoderShape(meta["num_layers"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"],
                             meta["vocab_size"]),
        bos_token_id=meta["bos_token_id"], eos_token_ids=tuple(meta["eos_token_ids"]), add_bos=meta["add_bos"],
        source=meta["source"], files=describe_files(folder, files),
        chat_template="chat_template.jinja" if (folder / "chat_template.jinja").is_file() else None,
        reference=reference, evaluation=evaluation.to_dict() if evaluation else None,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), extra=extra or {},
    )
    write_manifest(folder, manifest)
    return manifest


def check_gate(name: str, evaluation: Evaluation, threshold: float = DEFAULT_THRESHOLD, force: bool = False) -> None:
    """Raises QualityGateFailed when perplexity rose more than `threshold` (0.10 = 10%) over the reference."""
    rise = evaluation.perplexity_increase
    if rise is None or rise <= threshold:
        return
    if force:
        return
    raise QualityGateFailed(
        f"{name}: perplexity {evaluation.perplexity:.3f} is {rise:+.1%} over the fp32 reference "
        f"({evaluation.reference_perplexity:.3f}), above the {threshold:.0%} threshold; not registered "
        "(--threshold to change it, --force to register anyway)")


def install(staging: Path, store_root: Path, name: str) -> Path:
    """Moves a finished package into the store as `name`, replacing an older package of that name."""
    target = store_root / name
    if target.exists():
        old = store_root / f".replaced-{name}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)
    return target
