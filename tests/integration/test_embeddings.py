"""Embeddings end to end: the real all-MiniLM-L6-v2 folder exported (fp32, int8) and served by a real laasd
over real gRPC; vectors checked against transformers on torch with the model's own pooling."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from laas.client import Client, InvalidArgument, OutOfRange
from laas.core.errors import ModelLoadError
from laas.daemon.onnx_package import read_manifest
from laas.exporters.encoder_eval import EmbeddingEvaluation, heldout_sentences
from tests.conftest import OnnxExport, copy_package
from tests.daemon_process import DaemonProcess

pytestmark = pytest.mark.timeout(600)

SENTENCES = ["A lighthouse keeper found a message in a bottle.", "The cat sat on the mat.",
             "Quantum computers use qubits.", "She walked to the market to buy bread and cheese for dinner.",
             "Il pleut à Paris."]


def reference(folder: Path, texts: list[str]) -> npt.NDArray[np.float64]:
    """sentence-transformers' pipeline by hand, in torch: BERT, mean pooling over the mask, L2 normalization."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))  # type: ignore[no-untyped-call]
    model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return np.asarray(torch.nn.functional.normalize(pooled, dim=1).numpy(), dtype=np.float64)


def cos(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.asarray((x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)))


@pytest.fixture(scope="module")
def embed_home(make_home: Callable[..., Path], embedding_export: OnnxExport) -> Path:
    home = make_home()
    for kind in ("fp32", "int8"):
        copy_package(embedding_export.package(kind), home / "models")
    return home


@pytest.fixture(scope="module")
def embed_daemon(embed_home: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(embed_home).start()
    yield proc
    assert proc.stop() == 0, proc.log


@pytest.fixture(scope="module")
def embed_client(embed_daemon: DaemonProcess) -> Iterator[Client]:
    with Client(embed_daemon.target) as c:
        yield c


def test_export_of_the_real_folder_makes_fp32_and_int8_embedding_packages(embedding_export: OnnxExport) -> None:
    fp32, int8 = (read_manifest(embedding_export.package(k)) for k in ("fp32", "int8"))
    for m in (fp32, int8):
        assert m.decoder is None and m.embedding is not None
        # read from the folder's sentence-transformers files, not assumed
        assert (m.embedding.pooling, m.embedding.normalize, m.embedding.max_tokens) == ("mean", True, 256)
        assert m.embedding.dimensions == 384 and m.architecture == "bert"
        assert {f.path for f in m.files} >= {"model.onnx", "tokenizer.json"}
    assert int8.reference == "minilm-fp32" and fp32.reference is None
    evaluation = embedding_export.results["int8"].evaluation
    assert isinstance(evaluation, EmbeddingEvaluation)
    assert evaluation.sentences == len(heldout_sentences()) > 40
    assert evaluation.mean_cosine is not None and evaluation.mean_cosine >= 0.99
    assert int8.evaluation is not None and int8.evaluation["mean_cosine"] == evaluation.mean_cosine
    assert evaluation.sentences_per_second > 0 and evaluation.size_bytes < fp32.size_bytes


def test_vectors_match_transformers(embed_client: Client, embedding_source: Path) -> None:
    ref = reference(embedding_source, SENTENCES)
    fp32 = embed_client.embed(SENTENCES, model="minilm-fp32", timeout=60)
    assert fp32.model == "minilm-fp32" and fp32.dimensions == 384
    assert fp32.route is not None and fp32.route.kind == "local"
    assert cos(fp32.vectors, ref).min() >= 0.9999
    assert np.allclose(np.linalg.norm(fp32.vectors, axis=1), 1.0, atol=1e-5)
    int8 = embed_client.embed(SENTENCES, model="minilm-int8", timeout=60)
    assert cos(int8.vectors, ref).min() >= 0.97 and cos(int8.vectors, ref).mean() >= 0.99
    # tokens counted as the model's tokenizer counts them, [CLS] and [SEP] included
    assert fp32.tokens[1] == len(embed_client.tokenize(SENTENCES[1], model="minilm-fp32", add_special=True))


def test_a_batch_gives_the_vectors_of_one_by_one_calls(embed_client: Client) -> None:
    texts = SENTENCES + heldout_sentences()[:40]  # several lengths, over one engine batch (32)
    batch = embed_client.embed(texts, model="minilm-fp32", timeout=60).vectors
    for i in (0, 3, 17, 44):
        alone = embed_client.embed(texts[i], model="minilm-fp32", timeout=60).vectors[0]
        assert np.allclose(batch[i], alone, atol=2e-5)


def test_token_ids_embed_as_their_text(embed_client: Client) -> None:
    ids = embed_client.tokenize(SENTENCES[0], model="minilm-fp32", add_special=True)
    both = embed_client.embed([ids, SENTENCES[0]], model="minilm-fp32", timeout=60)
    assert np.allclose(both.vectors[0], both.vectors[1], atol=1e-6)


def test_normalize_dimensions_and_truncate(embed_client: Client) -> None:
    raw = embed_client.embed(SENTENCES[:2], model="minilm-fp32", normalize=False, timeout=60)
    unit = embed_client.embed(SENTENCES[:2], model="minilm-fp32", timeout=60)
    assert not np.allclose(np.linalg.norm(raw.vectors, axis=1), 1.0, atol=1e-3)
    assert cos(raw.vectors, unit.vectors).min() > 0.99999
    # MiniLM was not trained to be cut (no Matryoshka sizes): refused, naming the field
    with pytest.raises(InvalidArgument) as e:
        embed_client.embed("hi", model="minilm-fp32", dimensions=128, timeout=60)
    assert e.value.field == "dimensions" and "not trained" in str(e.value)
    assert embed_client.embed("hi", model="minilm-fp32", dimensions=384, timeout=60).dimensions == 384
    long = "word " * 400
    with pytest.raises(OutOfRange) as oor:
        embed_client.embed(["short", long], model="minilm-fp32", timeout=60)
    assert oor.value.field == "inputs[1]" and "256" in str(oor.value)
    cut = embed_client.embed(["short", long], model="minilm-fp32", truncate=True, timeout=60)
    assert cut.tokens[1] == 256 and cut.truncated == [False, True]
    ref = embed_client.embed(" ".join(["word"] * 254), model="minilm-fp32", timeout=60)  # what the cut keeps
    assert cos(cut.vectors[1], ref.vectors[0]) > 0.9999


@pytest.mark.parametrize(("inputs", "field"), [
    ([], "inputs"), (["x"] * 10_000, "inputs"), (["ok", ""], "inputs[1].text"),
    ([[101, 10**7, 102]], "inputs[0].tokens"), ([[-1]], "inputs[0].tokens"), ([[]], "inputs[0].tokens"),
])
def test_bad_inputs_are_refused_and_the_daemon_keeps_serving(embed_client: Client, inputs: list[str | list[int]],
                                                             field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        embed_client.embed(inputs, model="minilm-fp32", timeout=60)
    assert e.value.field == field
    assert embed_client.health() == "SERVING"
    assert embed_client.embed("still here", model="minilm-fp32", timeout=60).dimensions == 384


def test_a_generative_model_cannot_embed_nor_an_encoder_generate(embed_client: Client) -> None:
    with pytest.raises(ModelLoadError) as e:  # FAILED_PRECONDITION
        embed_client.embed("hello", timeout=60)  # the default model: SmolLM2, generative
    assert "cannot embed" in str(e.value)
    with pytest.raises(ModelLoadError) as g:
        embed_client.complete("hello", model="minilm-fp32", max_tokens=4, timeout=60)
    assert "embedding model" in str(g.value)
    models = {m.name: m for m in embed_client.models()}
    assert models["minilm-int8"].embedding_dimensions == 384 and models["minilm-int8"].context_length == 256
    assert models["smollm2-135m-instruct"].embedding_dimensions == 0


def test_the_cli_prints_a_json_line_per_text(embed_daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    from laas.client.cli import main

    assert main(["--target", embed_daemon.target, "embed", "one text", "another", "-m", "minilm-int8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1] and {line["model"] for line in lines} == {"minilm-int8"}
    assert len(lines[0]["embedding"]) == 384 and lines[0]["tokens"] == 4
