"""Continuous batching (GgufEngine and OnnxEngine with parallel > 1) with the real model, in-process: streams
that share decode steps produce what each produces alone, leave and join between steps, and reuse cached
prefixes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from laas.client import Client, ResourceExhausted
from laas.core.types import ChatMessage, Completion, FinishReason, GenerationRequest, SamplingParams, TextDelta
from laas.daemon.backends.gguf import GgufEngine
from laas.daemon.backends.onnx import OnnxEngine
from laas.daemon.gguf_header import read_gguf_header
from tests.conftest import OnnxExport
from tests.daemon_process import DaemonProcess

pytestmark = pytest.mark.timeout(240)

PROMPTS = ("Once upon a time", "1, 2, 3,", "The capital of France is", "def fib(n):")


Batching = GgufEngine | OnnxEngine


@pytest.fixture(scope="module", params=["gguf-flash-on", "gguf-flash-off", "onnx-fp32"])
async def engine(model_file: Path, request: pytest.FixtureRequest) -> AsyncIterator[Batching]:
    """GGUF with flash attention (the default: llama.cpp's auto is on, on a CPU) and without it: either way a
    stream in company decodes what it decodes alone. The ONNX engine on the fp32 package, whose numbers do
    not depend on the company (int4: test_onnx_int4_streams_say_the_same_in_any_company)."""
    eng: Batching
    if request.param == "onnx-fp32":
        export: OnnxExport = request.getfixturevalue("onnx_export")
        eng = await OnnxEngine.load(export.package("fp32"), context_length=2048, threads=2, parallel=4)
    else:
        eng = await GgufEngine.load(model_file, read_gguf_header(model_file), context_length=2048, threads=2,
                                    parallel=4, prefill_chunk=64, flash_attn=request.param.removeprefix("gguf-flash-"))
    yield eng
    await eng.aclose()


def _greedy(prompt: str, n: int = 16) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


async def _collect(engine: Batching, request: GenerationRequest) -> tuple[str, Completion]:
    text, done = [], None
    async for chunk in engine.generate(request):
        if isinstance(chunk, TextDelta):
            text.append(chunk.text)
        else:
            done = chunk
    assert isinstance(done, Completion)
    return "".join(text), done


async def test_concurrent_greedy_streams_produce_what_each_produces_alone(engine: Batching) -> None:
    alone = [(await _collect(engine, _greedy(p)))[0] for p in PROMPTS]
    steps = engine.stats().steps
    together = await asyncio.gather(*(_collect(engine, _greedy(p)) for p in PROMPTS))
    assert [t for t, _ in together] == alone
    assert all(d.usage.completion_tokens == 16 for _, d in together)
    # They shared steps: 4 x 16 tokens took far fewer than 64 decodes.
    assert engine.stats().steps - steps < 30


async def test_streams_joining_at_different_steps_are_unaffected(engine: Batching) -> None:
    alone = {p: (await _collect(engine, _greedy(p, 12)))[0] for p in PROMPTS}

    async def late(p: str, delay: float) -> str:
        await asyncio.sleep(delay)
        return (await _collect(engine, _greedy(p, 12)))[0]

    got = await asyncio.gather(*(late(p, 0.05 * i) for i, p in enumerate(PROMPTS)))
    assert dict(zip(PROMPTS, got, strict=True)) == alone


async def test_a_cancelled_stream_frees_its_sequence(engine: Batching) -> None:
    long = GenerationRequest(prompt="Once upon a time", sampling=SamplingParams(max_tokens=400, ignore_eos=True))
    streams = [engine.generate(long) for _ in range(4)]
    for s in streams:
        await anext(s)
    assert engine.stats().active == 4
    await streams[0].aclose()
    assert engine.stats().active == 3, "the closed stream still holds a sequence"
    # The freed slot serves a new request at once, while the other three go on.
    _, done = await asyncio.wait_for(_collect(engine, _greedy("Hi", 4)), 30)
    assert done.usage.completion_tokens == 4
    for s in streams[1:]:
        await s.aclose()
    assert engine.stats().active == 0


async def test_a_long_prompt_joining_does_not_stall_the_running_streams(engine: Batching) -> None:
    arrivals: list[float] = []
    first_of_long: list[float] = []

    async def running() -> None:
        req = GenerationRequest(prompt="Once upon a time", sampling=SamplingParams(max_tokens=400, ignore_eos=True,
                                                                                  temperature=0.0))
        async for chunk in engine.generate(req):
            if isinstance(chunk, TextDelta):
                arrivals.append(time.perf_counter())
            if first_of_long:
                break

    task = asyncio.create_task(running())
    while len(arrivals) < 3:
        await asyncio.sleep(0.01)
    joined = time.perf_counter()
    prompt = " ".join(f"item {i}," for i in range(120))  # about 700 tokens: 11 chunks
    async for chunk in engine.generate(GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=1))):
        if isinstance(chunk, TextDelta | Completion) and not first_of_long:
            first_of_long.append(time.perf_counter())
            usage = chunk.usage if isinstance(chunk, Completion) else None
            assert usage is None or usage.prompt_tokens > 600
    await task
    during = [t for t in arrivals if joined < t < first_of_long[0]]
    assert len(during) >= 4, f"the running stream got {len(during)} tokens while the long prompt was prefilled"


async def test_a_follow_up_chat_turn_reuses_the_cached_prefix(engine: Batching) -> None:
    history = [ChatMessage("system", "You are a helpful assistant. " * 20), ChatMessage("user", "Name a colour.")]
    first = await engine.render_chat(history)
    first_tokens = await engine.tokenize(first.prompt, add_special=first.add_special)
    sampling = SamplingParams(max_tokens=8, temperature=0.0)
    reply, _ = await _collect(engine, GenerationRequest(prompt=first.prompt, template_stops=first.template_stops,
                                                            add_special=first.add_special, sampling=sampling))
    hits = engine.stats().prefix_hits
    follow = await engine.render_chat([*history, ChatMessage("assistant", reply), ChatMessage("user", "Another.")])
    _, done2 = await _collect(engine, GenerationRequest(prompt=follow.prompt, template_stops=follow.template_stops,
                                                        add_special=follow.add_special, sampling=sampling))
    assert done2.usage.cached_prompt_tokens >= len(first_tokens) - 1
    assert done2.usage.cached_prompt_tokens < done2.usage.prompt_tokens
    assert engine.stats().prefix_hits == hits + 1
    assert engine.stats().prefix_cached_tokens >= done2.usage.cached_prompt_tokens


async def test_the_kv_budget_is_split_among_the_sequences(model_file: Path) -> None:
    eng = await GgufEngine.load(model_file, read_gguf_header(model_file), context_length=2048, threads=2,
                                       parallel=2, kv_tokens=512)
    try:
        assert eng.info.context_length == 256 and eng.stats().kv_cells == 512
        _, done = await _collect(eng, _greedy("1, 2, 3,", 400))
        assert done.finish_reason is FinishReason.LENGTH and done.usage.completion_tokens < 256
        assert eng.stats().kv_used <= 256
    finally:
        await eng.aclose()


async def _together(engine: OnnxEngine, requests: list[GenerationRequest]) -> list[tuple[str, Completion]]:
    """Runs the requests as one company from their first step: the scheduler thread waits on the decode
    loop's lock (an RLock, held here on the event loop's thread) until every one is queued, then admits
    them all at once. Started one by one, the first could decode a step alone while the others prefill."""
    scheduler = engine._scheduler
    with scheduler._cond:
        tasks = [asyncio.ensure_future(_collect(engine, r)) for r in requests]
        while scheduler.waiting < len(requests) and not any(t.done() for t in tasks):
            await asyncio.sleep(0)  # lets each request tokenize and submit itself
    return list(await asyncio.gather(*tasks))


async def test_onnx_int4_streams_say_the_same_in_any_company(onnx_export: OnnxExport) -> None:
    """int4 (onnxruntime's MatMulNBits) rounds one row differently from several, so an int4 stream alone may
    part from itself in company (onnx_batching.py); in any company of two or more, started together, it
    says the same, and the company shares steps."""
    async def fresh() -> OnnxEngine:  # no prefix cached: every prompt is prefilled whole
        return await OnnxEngine.load(onnx_export.package("int4"), context_length=1024, threads=2, parallel=4)

    in_pairs, in_four = await fresh(), await fresh()
    try:
        pairs = [await _together(in_pairs, [_greedy(p, 24) for p in PROMPTS[i:i + 2]]) for i in (0, 2)]
        four = await _together(in_four, [_greedy(p, 24) for p in PROMPTS])
        assert [t for t, _ in four] == [t for pair in pairs for t, _ in pair]
        assert in_four.stats().steps < 40  # 4 prefills and 4 x 24 tokens in about 24 batched steps
    finally:
        await in_pairs.aclose()
        await in_four.aclose()


def test_the_daemon_runs_parallel_requests_together(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon("parallel = 2\nmax_queue = 0\n")
    with Client(daemon.target) as client:
        alone = client.complete("1, 2, 3,", max_tokens=12, temperature=0, ignore_eos=True).text
        first = client.generate("Once upon a time", max_tokens=300, ignore_eos=True, temperature=0)
        next(first)
        # The second runs beside the first (no queue wait), and says what it says alone.
        second = client.complete("1, 2, 3,", max_tokens=12, temperature=0, ignore_eos=True)
        assert second.text == alone
        assert second.timings["queue_ms"] < 500
        assert client.model().active_requests == 1
        third = client.generate("Hello", max_tokens=300, ignore_eos=True)
        next(third)
        with pytest.raises(ResourceExhausted):  # two run, max_queue = 0: a third is refused
            client.complete("Hi", max_tokens=2)
        first.close()
        third.close()


def test_the_default_model_batches_four_requests_by_default(client: Client) -> None:
    """`parallel = 0` (the default) resolves from the default model's KV cache and the memory budget: 4 here,
    as GetModel says; four requests then run at once, none waiting for another to end."""
    assert client.model().parallel == 4
    streams = [client.generate(f"{i} Once upon a time", max_tokens=400, ignore_eos=True) for i in range(4)]
    try:
        for s in streams:
            next(s)  # each one's first token arrives while the others still run (with 1: after 400 tokens)
        model = client.model()
        assert (model.active_requests, model.queued_requests) == (4, 0)
    finally:
        for s in streams:
            s.close()
