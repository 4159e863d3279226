"""What `laas export` starts from: a GGUF file or a Hugging Face model folder, and loading it in torch.

Layer: exporters. A GGUF file is loaded by transformers (`gguf_file=`), dequantized to float32: this is
how the default SmolLM2 model becomes an ONNX model offline. A folder is loaded as it is; a name that is
neither is passed to transformers as a Hub id (the Hub is unreachable on some machines; the path stays).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laas.daemon.store import sha256_of
from laas.exporters.deps import require
from laas.exporters.errors import ExportError

_QUANT_SUFFIX = re.compile(r"[.-](q\d\w*|f16|f32|bf16|fp16|fp32)$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Source:
    kind: str  # "gguf" | "hf"
    location: str  # a path, or a Hub id
    name: str  # a default base name for the packages
    sha256: str  # of the GGUF file, or of the folder's files (names and digests)

    @property
    def path(self) -> Path:
        return Path(self.location)


def describe_source(location: str | Path) -> Source:
    path = Path(location).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ExportError(f"{path.name}: a source file must be a .gguf file (or give a model folder)")
        return Source("gguf", str(path.resolve()), _base_name(path.stem), sha256_of(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"{path}: not a Hugging Face model folder (no config.json)")
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{f.relative_to(path)}:{sha256_of(f)}\n".encode())
        return Source("hf", str(path.resolve()), _base_name(path.name), digest.hexdigest())
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(location)):
        return Source("hf", str(location), _base_name(str(location).split("/")[1]),
                      hashlib.sha256(str(location).encode()).hexdigest())
    raise ExportError(f"{location}: no such file or folder")


def _base_name(stem: str) -> str:
    return _QUANT_SUFFIX.sub("", stem).lower().replace("_", "-").replace(" ", "-")


def load_model(source: Source) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 on the CPU, in eval mode."""
    torch = require("torch")
    transformers = require("transformers")
    kwargs: dict[str, Any] = {}
    location = source.location
    if source.kind == "gguf":
        require("gguf")
        kwargs["gguf_file"] = source.path.name
        location = str(source.path.parent)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"transformers cannot load {source.location}: {e}") from e
    model.eval()
    return model, tokenizer
