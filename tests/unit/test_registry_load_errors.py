"""A load that fails with an unexpected exception marks the model FAILED with the reason (issue 13, item 4a):
before, it stayed NOT_LOADED with no error and every request retried the load (and leaked what it made)."""

from __future__ import annotations

from pathlib import Path

from laas.core.engine import Engine
from laas.daemon.backends.backend import Described
from laas.daemon.registry import ModelRegistry, ModelState
from laas.daemon.settings import ModelConfig, Settings
from laas.daemon.store import ModelStore
from tests.unit.test_gguf_header import craft


async def test_an_unexpected_load_error_fails_the_model_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(craft())
    calls = 0

    async def broken(path: Path, described: Described, config: ModelConfig, threads: int) -> Engine:
        nonlocal calls
        calls += 1
        raise RuntimeError("the loader broke")

    settings = Settings(home=tmp_path, models=(ModelConfig(name="m", path="m.gguf"),), threads=1)
    registry = ModelRegistry(settings, ModelStore(tmp_path / "models"), broken)
    entry = registry.get("m")
    await registry.load(entry)
    assert entry.state is ModelState.FAILED
    assert "the loader broke" in entry.error
    await registry.load(entry)  # not retried: the model stays FAILED until a reload
    assert calls == 1 and entry.engine is None
