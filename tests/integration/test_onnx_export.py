"""`laas export` end to end on the default model: packages, manifests, evaluation, and fidelity.

The export runs once per session (the `onnx_export` fixture): SmolLM2 GGUF -> transformers -> optimum
ONNX -> GroupQueryAttention fp32 -> dynamic int8 and int4 packages, evaluated on the held-out text.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import onnx

from laas.core.types import GenerationRequest, SamplingParams, TextDelta
from laas.daemon.backends.gguf import GgufEngine
from laas.daemon.backends.onnx import OnnxEngine
from laas.daemon.gguf_header import read_gguf_header
from laas.daemon.onnx_package import read_manifest, verify_files
from laas.daemon.store import DEFAULT_MODEL, sha256_of
from laas.exporters.evaluate import Evaluation
from tests.conftest import OnnxExport

PROMPT = "The three primary colors are"


def test_export_registers_three_evaluated_packages(onnx_export: OnnxExport) -> None:
    assert sorted(p.name for p in onnx_export.store.iterdir() if not p.name.startswith(".")) == [
        "smollm2-135m-instruct-fp32", "smollm2-135m-instruct-int4", "smollm2-135m-instruct-int8"]
    sizes = {}
    for kind in ("fp32", "int8", "int4"):
        folder = onnx_export.package(kind)
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        assert manifest.format == "onnx"
        assert manifest.quantization == {"fp32": "fp32", "int8": "int8", "int4": "int4-b32"}[kind]
        assert manifest.context_length == 8192 and manifest.architecture == "llama"
        assert manifest.source["kind"] == "gguf" and manifest.source["sha256"] == DEFAULT_MODEL.sha256
        assert {f.path for f in manifest.files} >= {"model.onnx", "model.onnx.data", "tokenizer.json",
                                                     "chat_template.jinja", "generation_config.json"}
        for entry in manifest.files:
            assert sha256_of(folder / entry.path) == entry.sha256
        assert manifest.eos_token_ids == (2,) and not manifest.add_bos
        evaluation = manifest.evaluation
        assert evaluation is not None and evaluation["tokens"] == 512
        assert 5 < evaluation["perplexity"] < 100
        sizes[kind] = manifest.size_bytes
        if kind != "fp32":
            assert manifest.reference == "smollm2-135m-instruct-fp32"
            assert evaluation["perplexity_increase"] <= 0.10  # the gate let it through
            assert evaluation["top1_agreement"] > 0.75
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"] / 2


def test_int4_keeps_the_ggufs_grid_and_stays_close_to_fp32(onnx_export: OnnxExport) -> None:
    evaluation = onnx_export.results["int4"].evaluation
    assert isinstance(evaluation, Evaluation)
    assert evaluation.perplexity_increase is not None and evaluation.perplexity_increase < 0.05
    graph = onnx.load(str(onnx_export.package("int4") / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    # q/k/v as one node and gate/up as one (siblings.py), o and down, and the head (8-bit)
    assert ops.count("MatMulNBits") == 30 * 4 + 1 and ops.count("Split") == 30 * 2
    assert "MatMul" in ops  # the small float MatMuls that add the Q4_1 block offsets back


def test_fused_graph_keeps_the_kv_cache_in_place(onnx_export: OnnxExport) -> None:
    graph = onnx.load(str(onnx_export.package("fp32") / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == 30
    inputs = {i.name for i in graph.input}
    assert {"input_ids", "seqlens_k", "total_sequence_length"} <= inputs
    assert "attention_mask" not in inputs and "position_ids" not in inputs
    # No layer concatenates past and new keys any more: the cache is written in place.
    assert not any(n.op_type == "Concat" and any(i.startswith("past_key_values") for i in n.input)
                   for n in graph.node)


def test_fp32_greedy_matches_the_hugging_face_reference(onnx_export: OnnxExport, model_file: Path) -> None:
    import torch

    from laas.exporters.source import describe_source, load_model

    model, _ = load_model(describe_source(model_file))
    engine = asyncio.run(OnnxEngine.load(onnx_export.package("fp32"), context_length=512, threads=2))
    try:
        prompt_ids = engine.text_tokens(PROMPT)
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
        hf_ids = out[0, len(prompt_ids):].tolist()
        ours = engine.decoder_logits(prompt_ids)[-1].argmax()
        assert int(ours) == hf_ids[0]
        text = asyncio.run(_greedy(engine, PROMPT, 12))
    finally:
        asyncio.run(engine.aclose())
    reference = engine._tokenizer.decode(hf_ids, skip_special_tokens=True)
    assert text == reference, (text, reference)


async def _greedy(engine: OnnxEngine | GgufEngine, prompt: str, n: int) -> str:
    request = GenerationRequest(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return "".join([c.text async for c in engine.generate(request) if isinstance(c, TextDelta)])


def test_tokens_and_greedy_text_agree_with_llama_cpp(onnx_export: OnnxExport, model_file: Path) -> None:
    path = model_file
    gguf = asyncio.run(GgufEngine.load(path, read_gguf_header(path), context_length=512, threads=2))
    onnx_engine = asyncio.run(OnnxEngine.load(onnx_export.package("fp32"), context_length=512, threads=2))
    try:
        for text in ("Hello world", "  leading spaces, tabs\tand\nnewlines", "naïve café — 東京 🚀",
                     "<|im_start|>user\nHi<|im_end|>"):
            for special in (True, False):
                theirs = list(asyncio.run(gguf.tokenize(text, add_special=special)))
                ours = list(asyncio.run(onnx_engine.tokenize(text, add_special=special)))
                assert ours == theirs, text
        # Same weights (fp32 is the GGUF dequantized): the first greedy words agree.
        a = asyncio.run(_greedy(gguf, PROMPT, 6))
        b = asyncio.run(_greedy(onnx_engine, PROMPT, 6))
        assert a.split()[:3] == b.split()[:3], (a, b)
    finally:
        asyncio.run(gguf.aclose())
        asyncio.run(onnx_engine.aclose())


def test_chat_template_and_generation_config_ship_in_the_package(onnx_export: OnnxExport) -> None:
    folder = onnx_export.package("int4")
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
    config = json.loads((folder / "generation_config.json").read_text())
    assert config["eos_token_id"] == 2
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    assert tokenizer["post_processor"] is None  # the GGUF says: no BOS


def test_decode_steps_write_the_preallocated_cache_in_place(onnx_export: OnnxExport) -> None:
    from laas.daemon.backends.onnx_decoder import OnnxDecoder

    manifest = read_manifest(onnx_export.package("fp32"))  # fp32: step and batch logits agree closely
    assert manifest.decoder is not None
    decoder = OnnxDecoder.open(onnx_export.package("fp32") / manifest.graph, manifest.decoder, 64, threads=2,
                               rows=2)
    buffers = [int(c.ctypes.data) for c in decoder._cache]  # allocated once, at load
    assert len(buffers) == 2 * manifest.decoder.num_layers
    full = decoder.all_logits([1, 2, 3, 4, 5, 6])
    decoder.forward([1, 2, 3, 4], 0)
    for position, token in ((4, 5), (5, 6)):
        step = decoder.forward([token], position)
        assert abs(step[0] - full[position]).max() < 1e-2  # token by token == all at once (float sums)
        assert step[0].argmax() == full[position].argmax()
        presents = decoder._row(0)[0].get_outputs()[1:]
        # onnxruntime wrote each layer's new position into the bound buffer: no new cache tensor.
        assert [v.data_ptr() for v in presents] == buffers
    # Row 1 holds another sequence; one batched step decodes both rows in place, each at its own length.
    decoder.forward([1, 2, 3, 4, 5, 6], 0)  # row 0 again: positions 0..5
    decoder.forward([1, 2, 3], 0, row=1)
    both = decoder.decode([7, 4], [6, 3])
    assert both[1].argmax() == full[3].argmax() and abs(both[1] - full[3]).max() < 1e-2
    alone = OnnxDecoder.open(onnx_export.package("fp32") / manifest.graph, manifest.decoder, 64, threads=2)
    expected = alone.all_logits([1, 2, 3, 4, 5, 6, 7])[6]
    assert both[0].argmax() == expected.argmax() and abs(both[0] - expected).max() < 1e-2
    presents = decoder._batch_bindings[2][0].get_outputs()[1:]
    assert [v.data_ptr() for v in presents] == buffers
