"""What `laas export` is asked for and what it gives back, for decoders and sentence encoders alike.

Layer: exporters (plain data; pipeline.py and encoder_pipeline.py both build these).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from laas.exporters.encoder_eval import EmbeddingEvaluation
from laas.exporters.evaluate import Evaluation
from laas.exporters.package import DEFAULT_THRESHOLD


@dataclass(frozen=True, slots=True)
class ExportOptions:
    quantizations: Sequence[str] = ("fp32", "int8", "int4")
    name: str | None = None
    block_size: int = 32
    threshold: float = DEFAULT_THRESHOLD
    force: bool = False
    threads: int = os.cpu_count() or 1
    eval_tokens: int | None = None  # None: the whole held-out text


@dataclass(frozen=True, slots=True)
class PackageResult:
    name: str
    quantization: str
    evaluation: Evaluation | EmbeddingEvaluation  # the second for a sentence encoder's packages
    path: Path | None  # None: refused by the gate
    refusal: str = ""
