"""The registry serves ONNX packages found in the store, without config, and loads them by format."""

from __future__ import annotations

from pathlib import Path

from laas.core.engine import Engine
from laas.daemon.backends import onnx_format
from laas.daemon.backends.backend import Described, Shared
from laas.daemon.registry import ModelRegistry, ModelState
from laas.daemon.settings import ModelConfig, Settings
from laas.daemon.store import ModelStore


async def _refuse(path: Path, described: Described, config: ModelConfig, threads: int) -> Engine:
    raise AssertionError("not loaded in this test")


def _store(home: Path, *packages: str) -> ModelStore:
    for name in packages:
        (home / "models" / name).mkdir(parents=True)
        (home / "models" / name / "manifest.json").write_text("{}")
    (home / "models").mkdir(parents=True, exist_ok=True)
    (home / "models" / "not-a-package").mkdir()
    return ModelStore(home / "models")


def test_packages_in_the_store_are_served_by_folder_name(tmp_path: Path) -> None:
    store = _store(tmp_path, "tiny-int4", "tiny-fp32")
    registry = ModelRegistry(Settings(home=tmp_path), store, _refuse)
    entries = {e.name: e for e in registry.entries()}
    assert set(entries) == {"smollm2-135m-instruct", "tiny-fp32", "tiny-int4"}
    assert entries["tiny-int4"].config == ModelConfig(name="tiny-int4", path="tiny-int4", format="onnx")
    assert registry.default.name == "smollm2-135m-instruct"


def test_a_configured_model_wins_over_discovery(tmp_path: Path) -> None:
    store = _store(tmp_path, "tiny-int4")
    configured = ModelConfig(name="tiny", path="tiny-int4", format="onnx", threads=1)
    registry = ModelRegistry(Settings(home=tmp_path, models=(configured,)), store, _refuse)
    assert {e.name for e in registry.entries()} == {"smollm2-135m-instruct", "tiny"}


async def test_a_broken_package_fails_to_load_with_the_reason(tmp_path: Path) -> None:
    store = _store(tmp_path, "tiny-int4")

    async def onnx_only(path: Path, described: Described, config: ModelConfig, threads: int) -> Engine:
        assert config.format == "onnx" and path == (store.root / "tiny-int4").resolve()
        return await onnx_format.load(path, described, config, threads, Shared())

    registry = ModelRegistry(Settings(home=tmp_path, threads=1), store, onnx_only)
    entry = registry.get("tiny-int4")
    await registry.load(entry)
    assert entry.state is ModelState.FAILED
    assert "tiny-int4/manifest.json is not a valid laas ONNX manifest" in entry.error
