"""Embed routing: only targets serving the very model are eligible, whatever their latency. Two real
OpenAI-compatible /v1/embeddings servers on loopback compute real vectors (tests/cloud_server.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from laas.client import Client, InvalidArgument
from tests.cloud_server import EmbeddingCloud
from tests.conftest import OnnxExport, copy_package
from tests.daemon_process import DaemonProcess

pytestmark = pytest.mark.timeout(600)
TEXTS = ["Where is the lighthouse?", "A keeper lived there for forty years."]


@pytest.fixture(scope="module")
def clouds(embedding_export: OnnxExport) -> Iterator[tuple[EmbeddingCloud, EmbeddingCloud]]:
    same = EmbeddingCloud(embedding_export.package("int8"), "cloud-minilm")
    other = EmbeddingCloud(embedding_export.package("fp32"), "other-embedder")
    yield same, other
    same.stop()
    other.stop()


@pytest.fixture(scope="module")
def routed(make_home: Callable[..., Path], embedding_export: OnnxExport, tmp_path_factory: pytest.TempPathFactory,
           clouds: tuple[EmbeddingCloud, EmbeddingCloud]) -> Iterator[Client]:
    same, other = clouds
    home = make_home()
    copy_package(embedding_export.package("int8"), home / "models")
    config = tmp_path_factory.mktemp("embed-routing") / "laasd.toml"
    config.write_text(f"""
[[remotes]]
name = "other-cloud"
url = "{other.url}"
model = "gpt-none"
embedding_models = {{ "other-embedder" = "other-embedder" }}

[[remotes]]
name = "same-cloud"
url = "{same.url}"
model = "gpt-none"
embedding_models = {{ "minilm-int8" = "cloud-minilm", "remote-minilm" = "cloud-minilm" }}
""")
    proc = DaemonProcess(home, config).start()
    try:
        with Client(proc.target) as c:
            yield c
    finally:
        assert proc.stop() == 0, proc.log


def test_the_device_first_then_only_the_endpoint_serving_the_same_model(
        routed: Client, clouds: tuple[EmbeddingCloud, EmbeddingCloud]) -> None:
    same, other = clouds
    local = routed.embed(TEXTS, model="minilm-int8", timeout=60)
    assert local.route is not None and local.route.kind == "local"
    before = same.calls
    cloud = routed.embed(TEXTS, model="minilm-int8", policy="cloud_only", timeout=60)
    assert cloud.route is not None and (cloud.route.target, cloud.route.kind) == ("same-cloud", "cloud")
    assert same.calls == before + 1 and other.calls == 0
    assert np.allclose(cloud.vectors, local.vectors, atol=1e-5)  # the same model: the same vectors
    # a model only the cloud serves goes there under the cloud's own name for it
    remote = routed.embed(TEXTS, model="remote-minilm", timeout=60)
    assert remote.route is not None and remote.route.target == "same-cloud"
    assert np.allclose(remote.vectors, local.vectors, atol=1e-5)
    assert other.calls == 0


def test_explain_route_says_why_a_target_is_not_eligible(routed: Client) -> None:
    e = routed.explain_embed(TEXTS, model="minilm-int8")
    assert e.chosen.target == "minilm-int8" and e.order == ("minilm-int8", "same-cloud")
    notes = {c.target: (c.eligible, c.note) for c in e.candidates}
    assert notes["same-cloud"] == (True, "serves it as 'cloud-minilm'")
    eligible, note = notes["other-cloud"]
    assert not eligible and "does not serve 'minilm-int8'" in note and "other-embedder" in note


def test_local_only_never_leaves_and_another_model_goes_to_its_own_endpoint(
        routed: Client, clouds: tuple[EmbeddingCloud, EmbeddingCloud]) -> None:
    with pytest.raises(InvalidArgument) as e:  # only a cloud serves it, and the request may not leave
        routed.embed(TEXTS, model="remote-minilm", policy="local_only", timeout=60)
    assert e.value.field == "routing.policy"
    assert clouds[1].calls == 0
    other = routed.embed(TEXTS, model="other-embedder", timeout=60)
    assert other.route is not None and other.route.target == "other-cloud" and clouds[1].calls == 1
