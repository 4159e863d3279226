"""Embeddings' pure rules: eligibility (only the same model), dimensions, pooling, validation, manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from laas.core.errors import InvalidArgument, NotFound, Unavailable
from laas.core.types import ModelFormat, ModelInfo
from laas.daemon import validation
from laas.daemon.backends.pooling import check_dimensions, finish, pool
from laas.daemon.onnx_package import EmbeddingSpec, Manifest, PackageFile
from laas.router.embedding import EmbedCandidate, choose_embedding
from laas.router.policy import Estimate, Policy, TargetKind


def _candidate(name: str, kind: TargetKind, serves: str | None, available: bool = True) -> EmbedCandidate:
    return EmbedCandidate(Estimate(name, kind, 512, available, 0.0, "" if available else "circuit open"), serves,
                          ("other-model",) if serves is None else ())


def test_only_targets_serving_the_model_are_eligible_the_device_first() -> None:
    d = choose_embedding("m", [_candidate("cloud-b", TargetKind.CLOUD, "their-m"),
                               _candidate("cloud-a", TargetKind.CLOUD, None), _candidate("m", TargetKind.LOCAL, "m")],
                         Policy.AUTO)
    assert [e.target for e in d.order] == ["m", "cloud-b"]
    judged = {j.estimate.target: j for j in d.judged}
    assert not judged["cloud-a"].eligible and "does not serve 'm'" in judged["cloud-a"].note
    assert "other-model" in judged["cloud-a"].note


def test_policies_filter_and_nothing_eligible_says_why() -> None:
    cands = [_candidate("m", TargetKind.LOCAL, "m"), _candidate("c", TargetKind.CLOUD, "x")]
    assert [e.target for e in choose_embedding("m", cands, Policy.CLOUD_ONLY).order] == ["c"]
    assert [e.target for e in choose_embedding("m", cands, Policy.LOCAL_ONLY).order] == ["m"]
    with pytest.raises(InvalidArgument) as e:
        choose_embedding("m", [cands[1], _candidate("o", TargetKind.CLOUD, None)], Policy.LOCAL_ONLY)
    assert e.value.field == "routing.policy"
    with pytest.raises(NotFound):
        choose_embedding("m", [_candidate("o", TargetKind.CLOUD, None)], Policy.AUTO)
    with pytest.raises(Unavailable):
        choose_embedding("m", [_candidate("c", TargetKind.CLOUD, "x", available=False)], Policy.AUTO)


def test_dimensions_only_as_trained() -> None:
    plain = ModelInfo(ModelFormat.ONNX, "fp32", 256, 512, 1, "bert", embedding_dimensions=384)
    check_dimensions(plain, None, "m")
    check_dimensions(plain, 384, "m")
    with pytest.raises(InvalidArgument, match="not trained"):
        check_dimensions(plain, 128, "m")
    matryoshka = ModelInfo(ModelFormat.ONNX, "fp32", 256, 512, 1, "nomic", embedding_dimensions=768,
                           matryoshka_dimensions=(512, 256))
    check_dimensions(matryoshka, 256, "m")
    with pytest.raises(InvalidArgument) as e:
        check_dimensions(matryoshka, 300, "m")
    assert e.value.field == "dimensions" and "512, 256" in str(e.value)


def test_pooling_ignores_padding_and_a_cut_is_renormalized() -> None:
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 4.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, "last").tolist() == [[3.0, 4.0]]
    v = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    assert finish(v, normalize=False, dimensions=None).tolist() == v.tolist()
    assert np.allclose(finish(v, normalize=False, dimensions=2), [[0.6, 0.8]])
    assert np.isclose(np.linalg.norm(finish(v, normalize=True, dimensions=None)), 1.0)


def test_validation_names_the_input() -> None:
    r = validation.embedding_request(["a", (1, 2)], None, None, False)
    assert r.inputs == ("a", (1, 2)) and r.normalize and not r.truncate
    for inputs, field in (([], "inputs"), (["a"] * 2049, "inputs"), (["a", ""], "inputs[1].text"),
                          ([()], "inputs[0].tokens")):
        with pytest.raises(InvalidArgument) as e:
            validation.embedding_request(inputs, None, None, False)
        assert e.value.field == field
    with pytest.raises(InvalidArgument):
        validation.embedding_request(["a"], 0, None, False)


def test_an_embedding_manifest_round_trips(tmp_path: Path) -> None:
    spec = EmbeddingSpec(384, "mean", True, 256, matryoshka_dimensions=(128,))
    m = Manifest(name="e", quantization="int8", context_length=512, architecture="bert", decoder=None,
                 bos_token_id=None, eos_token_ids=(), add_bos=False, source={}, files=(PackageFile("a", 1, "x"),),
                 chat_template=None, embedding=spec)
    assert Manifest.from_json(m.to_json()) == m
    bad = m.to_json().replace('"mean"', '"median"')
    with pytest.raises(Exception, match="pooling"):
        Manifest.from_json(bad)
