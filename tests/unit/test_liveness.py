"""The liveness check: an engine that holds a stream but decodes nothing for stall_s is stuck."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import pytest

from laas.core.engine import Engine
from laas.core.errors import ModelLoadError
from laas.core.types import ChatMessage, GenerationChunk, GenerationRequest, ModelFormat, ModelInfo, Tool
from laas.daemon.liveness import EngineStuck, LivenessCheck
from laas.daemon.model_entry import ModelEntry
from laas.daemon.registry import ModelRegistry
from laas.daemon.settings import ModelConfig, Settings
from laas.daemon.store import ModelStore


class StubEngine(Engine):
    def __init__(self) -> None:
        self.healthy = True

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(ModelFormat.GGUF, "Q4_1", 512, 512, 1, "llama")

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        raise NotImplementedError

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        raise NotImplementedError

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        raise NotImplementedError

    async def check_health(self) -> None:
        if not self.healthy:
            raise ModelLoadError("engine is closed")

    async def aclose(self) -> None:
        return None


async def _no_loader(*args: Any) -> Engine:
    raise NotImplementedError


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    settings = Settings(home=tmp_path, default_model="m", models=(ModelConfig(name="m", path="m.gguf"),))
    return ModelRegistry(settings, ModelStore(tmp_path / "models"), _no_loader)


def _loaded(entry: ModelEntry, engine: Engine) -> None:
    """The entry as the registry leaves it once `engine` has loaded (through the residency's transitions)."""
    entry.residency.start_loading()
    entry.residency.loaded(engine, load_ms=1.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_busy_without_progress_for_stall_s_is_stuck(registry: ModelRegistry) -> None:
    engine, clock = StubEngine(), Clock()
    entry = registry.default
    _loaded(entry, engine)
    check = LivenessCheck(registry, stall_s=10, clock=clock)
    await check()
    async with entry.queue.slot():
        clock.now += 9
        await check()  # prompt evaluation: no token yet, still within stall_s
        engine.decoded_tokens += 1
        clock.now += 9
        await check()  # progress resets the clock
        clock.now += 9
        await check()
        clock.now += 2
        with pytest.raises(EngineStuck, match="decoded no token for 11s"):
            await check()
        engine.decoded_tokens += 1
        await check()  # it recovers once tokens flow again


async def test_an_idle_model_is_never_stuck_and_engine_health_counts(registry: ModelRegistry) -> None:
    engine, clock = StubEngine(), Clock()
    entry = registry.default
    _loaded(entry, engine)
    check = LivenessCheck(registry, stall_s=1, clock=clock)
    for _ in range(3):
        clock.now += 100
        await check()
    engine.healthy = False
    with pytest.raises(ModelLoadError):
        await check()
