"""A request is admitted once: the chat template renders it and the tokenizer counts it once per request,
whether the model was loaded when the router planned it (exact admission) or not (provisional: once, in
its turn); the device checks the fit of what it counted itself."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import pytest

from laas.core.engine import Engine
from laas.core.errors import OutOfRange
from laas.core.types import (
    ChatMessage,
    Completion,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelFormat,
    ModelInfo,
    SamplingParams,
    TextDelta,
    Timings,
    Tool,
    Usage,
)
from laas.daemon.backends.backend import Described
from laas.daemon.local_target import LocalModels
from laas.daemon.model_entry import ModelState
from laas.daemon.registry import ModelRegistry
from laas.daemon.settings import ModelConfig, Settings
from laas.daemon.store import ModelStore
from laas.router.dispatch import Router
from laas.router.policy import Policy
from laas.router.targets import RoutedRequest

CONTEXT = 64


class CountingEngine(Engine):
    """Renders a chat as one word per message and a token per word; counts what it is asked to do."""

    def __init__(self) -> None:
        self.renders = self.tokenizations = 0
        self.generated: list[GenerationRequest] = []

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(ModelFormat.GGUF, "Q4_1", CONTEXT, CONTEXT, 1, "llama")

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        self.tokenizations += 1
        return list(range(len(text.split())))

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        self.renders += 1
        return GenerationRequest(prompt=" ".join(m.content for m in messages), template_stops=("<end>",),
                                 add_special=False)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.generated.append(request)
        yield TextDelta("ok")
        yield Completion(FinishReason.STOP, Usage(len(request.prompt_tokens or ()), 1), Timings())

    async def check_health(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def _router(tmp_path: Path, model_file: Path, preload: bool) -> tuple[Router, CountingEngine]:
    store = tmp_path / "models"
    store.mkdir()
    (store / "m.gguf").hardlink_to(model_file)
    engine = CountingEngine()

    async def load(path: Path, described: Described, config: ModelConfig, threads: int) -> Engine:
        return engine

    settings = Settings(home=tmp_path, models=(ModelConfig(name="m", path="m.gguf", context_length=CONTEXT),),
                        default_model="m", preload="default" if preload else "none")
    registry = ModelRegistry(settings, ModelStore(store), load)
    await registry.preload()
    assert (registry.default.state is ModelState.READY) is preload
    return Router(LocalModels(registry, time.monotonic), [], {}, {}, 16), engine


CHAT = RoutedRequest(SamplingParams(), messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi there")))


@pytest.mark.parametrize("loaded", [True, False])
async def test_a_chat_request_is_rendered_and_counted_once(tmp_path: Path, model_file: Path, loaded: bool) -> None:
    router, engine = await _router(tmp_path, model_file, preload=loaded)
    plan = await router.plan("", CHAT, Policy.AUTO, None)
    assert plan.admitted.bound is not None if loaded else plan.admitted.bound is None
    items = [item async for item in router.run(plan)]
    assert [i.text for i in items if isinstance(i, TextDelta)] == ["ok"]
    assert (engine.renders, engine.tokenizations) == (1, 1)
    (ran,) = engine.generated
    assert ran.prompt_tokens == (0, 1, 2, 3) and ran.template_stops == ("<end>",) and not ran.add_special
    assert ran.sampling.max_tokens == 16  # unset: the default, within the room the context leaves


async def test_a_request_counted_in_its_turn_is_checked_against_the_context_then(tmp_path: Path,
                                                                                model_file: Path) -> None:
    router, engine = await _router(tmp_path, model_file, preload=False)
    too_long = RoutedRequest(SamplingParams(max_tokens=8), prompt=" ".join(["w"] * 60))  # 60 + 8 > 64
    plan = await router.plan("", too_long, Policy.AUTO, None)  # estimated from the text: it seems to fit
    with pytest.raises(OutOfRange) as error:
        _ = [item async for item in router.run(plan)]
    assert error.value.field == "sampling.max_tokens"
    assert engine.tokenizations == 1 and not engine.generated
