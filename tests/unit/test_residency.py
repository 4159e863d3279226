"""Model residency in the registry: load on first use, keep-alive, LRU eviction within the memory budget.

The model files are the real default GGUF (hard-linked under several names), so the memory estimates
are the real ones; the engines are stand-ins (this is the registry's bookkeeping, not inference: the
integration suite runs the same behaviour through the real daemon).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import pytest

from laas.core.engine import Engine
from laas.core.errors import MemoryBudgetExceeded
from laas.core.types import (
    ChatMessage,
    Completion,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelFormat,
    ModelInfo,
    TextDelta,
    Timings,
    Tool,
    Usage,
)
from laas.daemon.backends.backend import Described
from laas.daemon.backends.gguf_format import gguf_memory
from laas.daemon.gguf_header import read_gguf_header
from laas.daemon.memory import MiB
from laas.daemon.registry import ModelRegistry, ModelState
from laas.daemon.settings import ModelConfig, Settings
from laas.daemon.store import ModelStore

CTX = 512


class StandIn(Engine):
    """Streams one delta; waits for `release` first when given."""

    def __init__(self, name: str, release: asyncio.Event | None) -> None:
        self.name, self.release, self.closed = name, release, False

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(ModelFormat.GGUF, "Q4_1", CTX, 8192, 1, "llama")

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        return [1, 2]

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        return GenerationRequest(prompt="x")

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if self.release is not None:
            await self.release.wait()
        yield TextDelta("hi")
        yield Completion(FinishReason.STOP, Usage(2, 1), Timings())

    async def check_health(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


class Loader:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.configs: list[ModelConfig] = []
        self.engines: list[StandIn] = []
        self.release: asyncio.Event | None = None
        self.delay = 0.0

    async def __call__(self, path: Path, described: Described, config: ModelConfig, threads: int) -> Engine:
        self.calls.append(config.name)
        self.configs.append(config)
        await asyncio.sleep(self.delay)
        engine = StandIn(config.name, self.release)
        self.engines.append(engine)
        return engine


@pytest.fixture
def need(model_file: Path) -> int:
    return gguf_memory(read_gguf_header(model_file), CTX)


def registry(tmp_path: Path, model_file: Path, names: Sequence[str], budget_mb: int, **settings: object
             ) -> tuple[ModelRegistry, Loader]:
    store = tmp_path / "models"
    store.mkdir(parents=True, exist_ok=True)
    models = []
    for name in names:
        os.link(model_file, store / f"{name}.gguf")
        models.append(ModelConfig(name=name, path=f"{name}.gguf", context_length=CTX))
    loader = Loader()
    values = {"home": tmp_path, "models": tuple(models), "default_model": names[0], "memory_budget_mb": budget_mb,
              "parallel": 1, **settings}  # one sequence each: need() is the figure; automatic is tested below
    return ModelRegistry(Settings(**values), ModelStore(store), loader), loader  # type: ignore[arg-type]


async def use(reg: ModelRegistry, name: str, keep_alive_s: float | None = None) -> list[GenerationChunk]:
    return [c async for c in reg.run(reg.get(name), GenerationRequest(prompt="x"), keep_alive_s)]


async def test_only_the_default_model_preloads_the_others_load_on_first_use(
        tmp_path: Path, model_file: Path, need: int) -> None:
    reg, loader = registry(tmp_path, model_file, ["a", "b"], 4 * need // MiB)
    await reg.preload()
    a, b = reg.get("a"), reg.get("b")
    assert (a.state, b.state) == (ModelState.READY, ModelState.NOT_LOADED)
    assert b.info is not None and b.info.context_length == CTX  # described from the header, not loaded
    assert a.memory_bytes == need and b.memory_bytes == 0
    chunks = await use(reg, "b")
    assert isinstance(chunks[-1], Completion) and chunks[-1].timings.load_ms > 0
    assert b.state is ModelState.READY and loader.calls == ["a", "b"] and reg.loads == {"a": 1, "b": 1}
    again = await use(reg, "b")
    assert isinstance(again[-1], Completion) and again[-1].timings.load_ms < 1.0
    await reg.aclose()


async def test_preload_none_loads_nothing_and_all_loads_everything(tmp_path: Path, model_file: Path, need: int) -> None:
    none, loader = registry(tmp_path / "n", model_file, ["a", "b"], 4 * need // MiB, preload="none")
    await none.preload()
    assert loader.calls == [] and none.resident_bytes == 0
    every, loader = registry(tmp_path / "e", model_file, ["a", "b"], 4 * need // MiB, preload="all")
    await every.preload()
    assert sorted(loader.calls) == ["a", "b"] and every.resident_bytes == 2 * need
    await every.aclose()


async def test_an_idle_model_unloads_after_its_keep_alive(tmp_path: Path, model_file: Path, need: int) -> None:
    reg, loader = registry(tmp_path, model_file, ["a", "b"], 4 * need // MiB, keep_alive_s=60.0)
    await reg.preload()
    await use(reg, "b", keep_alive_s=0.05)  # the request's keep-alive wins over the daemon's
    b = reg.get("b")
    assert b.state is ModelState.READY and b.keep_alive_s == 0.05 and b.expires_at is not None
    await asyncio.sleep(0.3)
    assert reg.get("b").state is ModelState.NOT_LOADED and b.memory_bytes == 0 and loader.engines[1].closed
    assert reg.unloads == {("b", "idle"): 1}
    assert reg.get("a").state is ModelState.READY  # its own keep-alive (60 s) has not passed
    await use(reg, "b", keep_alive_s=-1)  # loads again; never unloads
    await asyncio.sleep(0.2)
    assert b.state is ModelState.READY and b.expires_at is None and reg.loads["b"] == 2
    await reg.aclose()


async def test_keep_alive_zero_unloads_when_the_last_stream_ends(tmp_path: Path, model_file: Path, need: int) -> None:
    reg, loader = registry(tmp_path, model_file, ["a"], 4 * need // MiB, keep_alive_s=0.0)
    release = loader.release = asyncio.Event()
    await reg.preload()
    first = asyncio.create_task(use(reg, "a"))
    second = asyncio.create_task(use(reg, "a"))
    await asyncio.sleep(0.05)
    a = reg.get("a")
    assert a.busy and a.state is ModelState.READY
    release.set()
    await asyncio.gather(first, second)
    await asyncio.sleep(0.05)
    assert reg.get("a").state is ModelState.NOT_LOADED and reg.unloads == {("a", "idle"): 1}


async def test_the_least_recently_used_idle_model_makes_room(tmp_path: Path, model_file: Path, need: int) -> None:
    reg, _loader = registry(tmp_path, model_file, ["a", "b", "c"], (2 * need + need // 2) // MiB)
    await reg.preload()
    await use(reg, "b")
    await use(reg, "a")  # now b is the least recently used
    await use(reg, "c")
    states = {e.name: e.state for e in reg.entries()}
    assert states == {"a": ModelState.READY, "b": ModelState.NOT_LOADED, "c": ModelState.READY}
    assert reg.unloads == {("b", "evicted"): 1} and reg.resident_bytes == 2 * need <= reg.budget_bytes
    await reg.aclose()


async def test_a_busy_model_is_never_unloaded_to_make_room(tmp_path: Path, model_file: Path, need: int) -> None:
    reg, loader = registry(tmp_path, model_file, ["a", "b"], (need + need // 2) // MiB)
    await reg.preload()
    release = asyncio.Event()
    loader.engines[0].release = release  # a's stream stays open
    streaming = asyncio.create_task(use(reg, "a"))
    await asyncio.sleep(0.05)
    with pytest.raises(MemoryBudgetExceeded) as info:
        await use(reg, "b")
    assert "busy models hold the rest ('a')" in str(info.value) and info.value.field == "model"
    assert reg.get("a").state is ModelState.READY and reg.get("b").state is ModelState.NOT_LOADED
    release.set()
    assert isinstance((await streaming)[-1], Completion)  # the running stream finished whole
    await use(reg, "b")  # a is idle now: evicted
    assert reg.get("a").state is ModelState.NOT_LOADED and reg.get("b").state is ModelState.READY
    await reg.aclose()


async def test_a_model_larger_than_the_budget_is_refused_not_failed(tmp_path: Path, model_file: Path,
                                                                   need: int) -> None:
    reg, loader = registry(tmp_path, model_file, ["a"], need // MiB // 2)
    await reg.preload()  # does not raise: the model stays NOT_LOADED, loadable if the budget grows
    a = reg.get("a")
    assert a.state is ModelState.NOT_LOADED and not a.error and loader.calls == []
    with pytest.raises(MemoryBudgetExceeded, match="more than the memory budget"):
        await use(reg, "a")


async def test_concurrent_requests_share_one_load_that_outlives_a_cancelled_caller(
        tmp_path: Path, model_file: Path, need: int) -> None:
    reg, loader = registry(tmp_path, model_file, ["a", "b"], 4 * need // MiB, parallel=4)
    await reg.preload()
    loader.delay = 0.2
    cancelled = asyncio.create_task(use(reg, "b"))
    waiting = [asyncio.create_task(use(reg, "b")) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert reg.get("b").state is ModelState.LOADING
    cancelled.cancel()
    results = await asyncio.gather(*waiting)
    assert all(isinstance(r[-1], Completion) for r in results)
    assert loader.calls == ["a", "b"] and reg.get("b").state is ModelState.READY
    await reg.aclose()


async def test_unload_now_when_idle_and_when_the_streams_end_when_busy(tmp_path: Path, model_file: Path,
                                                                       need: int) -> None:
    reg, loader = registry(tmp_path, model_file, ["a"], 4 * need // MiB)
    await reg.preload()
    a = reg.get("a")
    assert await reg.unload(a) is True
    assert a.state is ModelState.NOT_LOADED and loader.engines[0].closed
    release = loader.release = asyncio.Event()
    streaming = asyncio.create_task(use(reg, "a"))
    while reg.get("a").state is not ModelState.READY:  # loading again for the stream
        await asyncio.sleep(0.01)
    assert await reg.unload(a) is False and a.unload_when_idle
    assert reg.get("a").state is ModelState.READY
    release.set()
    await streaming
    await asyncio.sleep(0.05)
    assert reg.get("a").state is ModelState.NOT_LOADED and reg.unloads == {("a", "admin"): 2}


@pytest.mark.parametrize(("budget_mb", "parallel"), [(2000, 4), (170, 2)])
async def test_automatic_parallel_is_resolved_from_the_kv_cache_and_the_budget(
        tmp_path: Path, model_file: Path, budget_mb: int, parallel: int) -> None:
    """`parallel = 0`: 4 when four contexts' KV cache fit in a quarter of the budget, else fewer (170 MiB: a
    quarter would allow 3 of these 12 MB caches, but only 2 fit beside the weights); the memory
    the model is counted for (and the queue's places) follow the value resolved."""
    reg, loader = registry(tmp_path, model_file, ["a"], budget_mb, parallel=0)
    header = read_gguf_header(model_file)
    await reg.preload()
    a = reg.get("a")
    assert a.parallel == a.queue.parallel == parallel
    assert a.memory_bytes == gguf_memory(header, CTX * parallel) and loader.configs[-1].parallel == parallel
    await reg.aclose()
