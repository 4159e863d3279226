"""Native calls on a model hold a claim until the native work is done, not until their caller gives up:
the registry never unloads a model, nor an engine free its model, under a running tokenization."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from laas.core.engine import Engine
from laas.core.errors import Unavailable
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
from laas.daemon.backends.worker import NativeClaims
from laas.daemon.local_target import LocalModels
from laas.daemon.model_entry import ModelEntry, ModelState
from laas.daemon.registry import ModelRegistry
from laas.daemon.settings import ModelConfig, Settings
from laas.daemon.store import ModelStore
from laas.router.dispatch import Router
from laas.router.policy import Policy
from laas.router.targets import Admitted, RoutedRequest, Streamed

BOUND = 10.0  # seconds any wait in these tests may take at most


async def _spin(turns: int = 20) -> None:
    """Lets the event loop run a few turns (a cancelled plain thread hop would complete within one)."""
    for _ in range(turns):
        await asyncio.sleep(0)


class Gate:
    """A native call stand-in: blocks its thread until opened. Make it on the event loop."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self._loop, self._entered = asyncio.get_running_loop(), asyncio.Event()

    @property
    def entered(self) -> bool:
        return self._entered.is_set()

    def work(self) -> list[int]:
        self._loop.call_soon_threadsafe(self._entered.set)
        assert self.opened.wait(BOUND)
        return [1, 2, 3]

    async def wait_entered(self) -> None:
        await asyncio.wait_for(self._entered.wait(), BOUND)


async def test_a_cancelled_caller_returns_only_once_the_native_call_has() -> None:
    claims, gate = NativeClaims(), Gate()
    task = asyncio.create_task(claims.run(gate.work))
    await gate.wait_entered()
    task.cancel()
    await _spin()
    assert not task.done() and claims.held == 1
    gate.opened.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, BOUND)
    assert claims.held == 0


async def test_a_call_cancelled_before_it_starts_never_runs() -> None:
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))  # one worker: the second call queues
    claims, running, queued = NativeClaims(), Gate(), Gate()
    first = asyncio.create_task(claims.run(running.work))
    await running.wait_entered()
    second = asyncio.create_task(claims.run(queued.work))
    await _spin()
    assert claims.held == 2
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(second, BOUND)  # at once: nothing native to wait for
    assert claims.held == 1
    running.opened.set()
    assert await first == [1, 2, 3]
    assert claims.close(timeout=BOUND) and not queued.entered


async def test_close_waits_for_the_claims_held_and_refuses_new_ones() -> None:
    claims, gate = NativeClaims(), Gate()
    task = asyncio.create_task(claims.run(gate.work))
    await gate.wait_entered()
    assert claims.close(timeout=0) is False  # still held: the caller of close must not free the model
    with pytest.raises(Unavailable):
        await claims.run(gate.work)
    with pytest.raises(Unavailable):
        claims.call(gate.work)
    gate.opened.set()
    assert await asyncio.to_thread(claims.close, BOUND) is True
    assert await task == [1, 2, 3]


class GatedEngine(Engine):
    """Tokenizes through a gate, under native claims, as the real engines do; records a close under it."""

    def __init__(self) -> None:
        self.gate, self.claims = Gate(), NativeClaims()
        self.closed = self.closed_under_native_call = False

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(ModelFormat.GGUF, "Q4_1", 512, 8192, 1, "llama")

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        return await self.claims.run(self.gate.work)

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        return GenerationRequest(prompt="x")

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        yield TextDelta("hi")
        yield Completion(FinishReason.STOP, Usage(3, 1), Timings())

    async def check_health(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed_under_native_call = self.claims.held > 0
        self.closed = True


async def _registry(tmp_path: Path, model_file: Path) -> tuple[ModelRegistry, GatedEngine]:
    store = tmp_path / "models"
    store.mkdir()
    (store / "m.gguf").hardlink_to(model_file)
    engine = GatedEngine()

    async def load(path: Path, described: Described, config: ModelConfig, threads: int) -> Engine:
        return engine

    settings = Settings(home=tmp_path, models=(ModelConfig(name="m", path="m.gguf", context_length=512),),
                        default_model="m")
    reg = ModelRegistry(settings, ModelStore(store), load)
    await reg.preload()
    assert reg.default.state is ModelState.READY
    return reg, engine


async def test_a_cancelled_tokenize_keeps_its_model_loaded_until_the_native_call_ends(
        tmp_path: Path, model_file: Path) -> None:
    reg, engine = await _registry(tmp_path, model_file)
    entry = reg.default

    async def tokenize_rpc() -> None:
        async with reg.using(entry) as e:
            await e.tokenize("long text")

    task = asyncio.create_task(tokenize_rpc())
    await engine.gate.wait_entered()
    task.cancel()  # the client's deadline passed
    await _spin()
    assert entry.busy
    assert await reg.unload(entry) is False  # deferred: it unloads once the native call is over
    assert not engine.closed
    engine.gate.opened.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, BOUND)
    await asyncio.wait_for(_unloaded(entry), BOUND)
    assert engine.closed and not engine.closed_under_native_call
    await reg.aclose()


async def _unloaded(entry: ModelEntry) -> None:
    while entry.engine is not None:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("step", ["plan", "bind"])
async def test_the_router_holds_the_model_while_it_counts_a_prompt(tmp_path: Path, model_file: Path,
                                                                    step: str) -> None:
    reg, engine = await _registry(tmp_path, model_file)
    device = LocalModels(reg, time.monotonic)
    router = Router(device, [], {}, {}, 16)
    request = RoutedRequest(SamplingParams(max_tokens=1), prompt="long text")
    if step == "plan":
        task: asyncio.Task[object] = asyncio.create_task(router.plan("", request, Policy.AUTO, None))
    else:
        target = device.targets()["m"]
        task = asyncio.create_task(_drain(target.stream(Admitted(request, 3, 16))))
    await engine.gate.wait_entered()
    assert reg.default.busy
    assert await reg.unload(reg.default) is False
    assert not engine.closed
    engine.gate.opened.set()
    await asyncio.wait_for(task, BOUND)
    await reg.aclose()


async def _drain(stream: AsyncIterator[Streamed]) -> list[Streamed]:
    return [chunk async for chunk in stream]
