"""An Embed call takes a place in its model's queue, the bounded one generation waits in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import pytest

from laas.core.engine import Engine
from laas.core.errors import ResourceExhausted
from laas.core.types import (
    ChatMessage,
    Embedding,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ModelFormat,
    ModelInfo,
    Tool,
)
from laas.daemon.backends.backend import Described
from laas.daemon.local_target import LocalModels
from laas.daemon.registry import ModelRegistry
from laas.daemon.settings import ModelConfig, Settings
from laas.daemon.store import ModelStore
from laas.router.dispatch import Router
from laas.router.policy import Policy


class HeldEmbedder(Engine):
    """Embeds once `release` is set; counts the calls running."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(ModelFormat.ONNX, "fp32", 16, 16, 1, "bert", embedding_dimensions=2)

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        return [1]

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        raise NotImplementedError

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        self.started.set()
        await self.release.wait()
        return EmbeddingResult(tuple(Embedding((1.0, 0.0), 1) for _ in request.inputs))

    async def check_health(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_embed_calls_share_the_models_bounded_queue(tmp_path: Path, model_file: Path) -> None:
    store = tmp_path / "models"
    store.mkdir()
    (store / "m.gguf").hardlink_to(model_file)
    engine = HeldEmbedder()

    async def load(path: Path, described: Described, config: ModelConfig, threads: int) -> Engine:
        return engine

    settings = Settings(home=tmp_path, models=(ModelConfig(name="m", path="m.gguf", max_queue=1, parallel=1),),
                        default_model="m")
    registry = ModelRegistry(settings, ModelStore(store), load)
    await registry.preload()
    router = Router(LocalModels(registry, time.monotonic), [], {}, {}, 16)
    plan = router.embed_plan("m", Policy.AUTO)
    request = EmbeddingRequest(("a", "b"))
    first = asyncio.create_task(router.embed(plan, request, None))
    await engine.started.wait()
    second = asyncio.create_task(router.embed(plan, request, None))  # waits: the one place in the queue
    entry = registry.get("m")
    while entry.queue.waiting < 1:
        await asyncio.sleep(0)
    assert entry.queue.active == 1
    with pytest.raises(ResourceExhausted):  # one running, one waiting, max_queue = 1: the third is refused
        await router.embed(plan, request, None)
    engine.release.set()
    (result, route), (again, _) = await first, await second
    assert route.target == "m" and len(result.embeddings) == 2 and len(again.embeddings) == 2
    assert entry.queue.active == 0 and entry.queue.waiting == 0
    await registry.aclose()
