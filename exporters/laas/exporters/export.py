"""optimum's ONNX export of a decoder (`text-generation-with-past`), and the fp32 package built from it.

Layer: exporters. The export itself (torch tracing, about a minute for SmolLM2 on 2 cores) is cached per
source digest under the cache folder, so exporting more quantizations of one model, or re-running after
a failed gate, does not trace again; the benchmark runs optimum's own ORTModelForCausalLM on it too.
Everything the daemon needs that is not in the graph is recorded in `laas-export.json` beside it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from laas.exporters.deps import require
from laas.exporters.errors import ExportError
from laas.exporters.source import Source, load_model

EXPORT_META = "laas-export.json"
TASK = "text-generation-with-past"
GRAPH, GRAPH_DATA = "model.onnx", "model.onnx.data"
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
             "config.json", "special_tokens_map.json")

Progress = Callable[[str], None]


def optimum_export(source: Source, cache: Path, progress: Progress = print) -> Path:
    """The folder of optimum's fp32 export of `source` (exported once, then reused)."""
    target = cache / source.sha256[:24]
    if (target / EXPORT_META).is_file() and (target / GRAPH).is_file():
        progress(f"reusing the ONNX export of {source.name} in {target}")
        return target
    require("onnx")
    exporters_onnx = require("optimum.exporters.onnx")
    torch = require("torch")
    progress(f"loading {source.location} in transformers (float32)")
    model, tokenizer = load_model(source)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=cache))
    try:
        progress(f"exporting with optimum ({TASK})")
        with torch.inference_mode():
            exporters_onnx.onnx_export_from_model(model, work, task=TASK, do_validation=False)
        tokenizer.save_pretrained(work)
        model.generation_config.save_pretrained(work)
        if not (work / "chat_template.jinja").is_file() and getattr(tokenizer, "chat_template", None):
            (work / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        meta = _describe(model, tokenizer, source)
        cos, sin = _rotary_caches(model, meta["context_length"], meta["head_dim"])
        np.save(work / "rope_cos.npy", cos)
        np.save(work / "rope_sin.npy", sin)
        _fix_tokenizer(work, meta)
        (work / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def read_meta(export_dir: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((export_dir / EXPORT_META).read_text(encoding="utf-8"))
    return meta


def _describe(model: Any, tokenizer: Any, source: Source) -> dict[str, Any]:
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = config.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    return {
        "architecture": str(config.model_type),
        "num_layers": int(config.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": head_dim,
        "vocab_size": int(config.vocab_size),
        "context_length": int(getattr(config, "max_position_embeddings", 2048)),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_ids": eos_ids,
        "add_bos": _adds_bos(tokenizer, source, bos),
        "source": {"kind": source.kind, "location": source.location, "name": source.name, "sha256": source.sha256},
    }


def _adds_bos(tokenizer: Any, source: Source, bos: int | None) -> bool:
    """Whether prompts start with BOS: the GGUF file's own flag (what llama.cpp does), else the tokenizer's."""
    if source.kind == "gguf":
        from laas.daemon.gguf_header import read_gguf_header

        flag = read_gguf_header(source.path).metadata.get("tokenizer.ggml.add_bos_token")
        if isinstance(flag, bool):
            return flag
    ids = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return bos is not None and bool(ids) and ids[0] == bos and plain[:1] != [bos]


def _fix_tokenizer(folder: Path, meta: dict[str, Any]) -> None:
    """Makes the saved tokenizer agree with the manifest: transformers' GGUF conversion may add a BOS the
    model never had, and name the wrong end-of-sequence token."""
    tok_file = folder / "tokenizer.json"
    if tok_file.is_file() and not meta["add_bos"]:
        data = json.loads(tok_file.read_text(encoding="utf-8"))
        data["post_processor"] = None
        tok_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["add_bos_token"] = bool(meta["add_bos"])
        vocab = {int(k): v.get("content") for k, v in config.get("added_tokens_decoder", {}).items()}
        if meta["eos_token_ids"] and meta["eos_token_ids"][0] in vocab:
            config["eos_token"] = vocab[meta["eos_token_ids"][0]]
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    special = folder / "special_tokens_map.json"
    if special.is_file() and config_file.is_file():
        data = json.loads(special.read_text(encoding="utf-8"))
        data["eos_token"] = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token", data.get("eos_token"))
        special.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _rotary_caches(model: Any, length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [length, rotary_dim / 2] from the model's own rotary embedding (any rope scaling it has)."""
    torch = require("torch")
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        raise ExportError(f"{model.config.model_type}: no rotary embedding found; only rotary decoders are supported")
    with torch.inference_mode():
        positions = torch.arange(length).unsqueeze(0)
        cos, sin = rotary(torch.zeros(1, 1, head_dim), positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def build_fp32(export_dir: Path, dest: Path, progress: Progress = print) -> Path:
    """The fp32 package files (graph fused to GroupQueryAttention, weights as external data) in `dest`."""
    onnx = require("onnx")
    from laas.exporters.fuse import FuseError, fuse_group_query_attention

    meta = read_meta(export_dir)
    progress("fusing attention into GroupQueryAttention (in-place KV cache)")
    model = onnx.load(str(export_dir / GRAPH))
    try:
        fuse_group_query_attention(
            model, num_heads=meta["num_heads"], kv_num_heads=meta["num_kv_heads"], head_dim=meta["head_dim"],
            cos_cache=np.load(export_dir / "rope_cos.npy"), sin_cache=np.load(export_dir / "rope_sin.npy"))
    except FuseError as e:
        raise ExportError(f"{meta['architecture']} export cannot be served fast: {e}") from e
    dest.mkdir(parents=True, exist_ok=True)
    save_graph(model, dest)
    copy_aux(export_dir, dest)
    return dest


def save_graph(model: Any, dest: Path) -> None:
    onnx = require("onnx")
    for name in (GRAPH, GRAPH_DATA):
        (dest / name).unlink(missing_ok=True)  # onnx appends external data to an existing file
    onnx.save_model(model, str(dest / GRAPH), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=GRAPH_DATA, size_threshold=1024)


def copy_aux(src: Path, dest: Path) -> None:
    for name in (*AUX_FILES, EXPORT_META):
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
