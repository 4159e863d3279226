"""Constrained decoding and logprobs inside both engines, with the real default model: constrained and
unconstrained sequences in one batch, the compile cache, logprobs against the model's own scores, and the
ONNX engine doing the same."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import numpy as np
import numpy.typing as npt
import pytest

from laas.core.errors import InvalidArgument
from laas.core.types import (
    ChatMessage,
    Completion,
    Constraint,
    ConstraintKind,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from laas.daemon.backends.gguf import GgufEngine
from laas.daemon.backends.onnx import OnnxEngine
from laas.daemon.gguf_header import read_gguf_header
from tests.conftest import OnnxExport
from tests.structured_cases import SCHEMAS

PERSON = SCHEMAS[3][2]
CONSTRAINED = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(PERSON))
DIGITS = Constraint(ConstraintKind.REGEX, r"[0-9]{2}-[0-9]{2}")

Engine = GgufEngine | OnnxEngine


@pytest.fixture(scope="module")
async def gguf(model_file: Path) -> AsyncIterator[GgufEngine]:
    eng = await GgufEngine.load(model_file, read_gguf_header(model_file), context_length=2048, threads=2,
                                parallel=3, prefill_chunk=64)
    yield eng
    await eng.aclose()


async def _run(engine: Engine, request: GenerationRequest) -> tuple[str, list[TokenLogprob], Completion]:
    text: list[str] = []
    logprobs: list[TokenLogprob] = []
    done = None
    async for chunk in engine.generate(request):
        if isinstance(chunk, TextDelta):
            text.append(chunk.text)
            logprobs += chunk.logprobs
        elif isinstance(chunk, Completion):
            done = chunk
    assert done is not None
    return "".join(text), logprobs, done


async def _chat(engine: Engine, content: str, constraint: Constraint | None, n: int = 60,
                logprobs: bool = False) -> GenerationRequest:
    bound = await engine.render_chat([ChatMessage("user", content)])
    return GenerationRequest(prompt=bound.prompt, add_special=False, template_stops=bound.template_stops,
                             sampling=SamplingParams(max_tokens=n, temperature=0, constraint=constraint,
                                                     logprobs=logprobs, top_logprobs=3))


async def test_constrained_and_unconstrained_sequences_share_a_batch(gguf: GgufEngine) -> None:
    requests = [await _chat(gguf, "Describe a person as JSON.", CONSTRAINED),
                await _chat(gguf, "Tell me about cats.", None, n=40),
                await _chat(gguf, "Give a date.", DIGITS)]
    alone = [await _run(gguf, r) for r in requests]
    steps = gguf.stats().steps
    together = await asyncio.gather(*(_run(gguf, r) for r in requests))
    assert gguf.stats().steps - steps < sum(d.usage.completion_tokens for _, _, d in alone)  # they shared steps
    for (text, _, _), (alone_text, _, _) in zip(together, alone, strict=True):
        assert text == alone_text
    jsonschema.validate(json.loads(together[0][0]), PERSON)
    assert together[0][2].finish_reason is FinishReason.STOP
    assert together[1][2].finish_reason is FinishReason.LENGTH and "{" not in together[1][0][:1]
    assert len(together[2][0]) == 5 and together[2][0][2] == "-"


async def test_a_compiled_constraint_is_cached(gguf: GgufEngine) -> None:
    schema = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps({**PERSON, "title": "cache probe"}))
    hits, misses = gguf.constraints.hits, gguf.constraints.misses
    await asyncio.to_thread(gguf.constraints.matcher, schema)
    await asyncio.to_thread(gguf.constraints.matcher, schema)
    assert (gguf.constraints.hits - hits, gguf.constraints.misses - misses) == (1, 1)


async def test_the_engine_refuses_a_constraint_it_cannot_satisfy(gguf: GgufEngine) -> None:
    request = GenerationRequest(prompt="x", sampling=SamplingParams(
        max_tokens=4, constraint=Constraint(ConstraintKind.REGEX, r"[^\s\S]")))
    with pytest.raises(InvalidArgument) as info:
        await _run(gguf, request)
    assert info.value.field == "constraint.regex"


def _log_softmax(row: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    x = row.astype(np.float64)
    x -= x.max()
    result: npt.NDArray[np.float64] = x - np.log(np.exp(x).sum())
    return result


async def test_gguf_logprobs_match_the_models_own_scores(gguf: GgufEngine, model_file: Path) -> None:
    import llama_cpp

    request = GenerationRequest(prompt="The capital of France is", sampling=SamplingParams(
        max_tokens=10, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True))
    _, entries, _ = await _run(gguf, request)
    prompt = list(await gguf.tokenize(request.prompt))
    generated = [e.token_id for e in entries]

    def scores() -> npt.NDArray[np.float32]:
        llm = llama_cpp.Llama(str(model_file), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                              flash_attn=True)  # as the engine's default (auto: on, on a CPU)
        try:  # the prompt at once, then a token a step: the shapes of the engine's own decode
            llm.eval(prompt)
            for token in generated[:-1]:
                llm.eval([token])
            return np.array(llm.scores[len(prompt) - 1: len(prompt) - 1 + len(generated)])
        finally:
            llm.close()

    rows = await asyncio.to_thread(scores)
    for entry, row in zip(entries, rows, strict=True):
        expected = _log_softmax(row)
        assert entry.token_id == int(row.argmax())
        assert entry.logprob <= 0
        assert abs(entry.logprob - expected[entry.token_id]) < 1e-2
        assert [t.token_id for t in entry.top] == list(np.argsort(-expected)[:3])


async def test_constrained_logprobs_are_renormalised_over_what_is_allowed(gguf: GgufEngine) -> None:
    bound = await gguf.render_chat([ChatMessage("user", "Yes or no?")])
    request = GenerationRequest(prompt=bound.prompt, add_special=False, sampling=SamplingParams(
        max_tokens=4, temperature=0, logprobs=True, top_logprobs=20,
        constraint=Constraint(ConstraintKind.LARK, 'start: "yes" | "no"')))
    text, entries, _ = await _run(gguf, request)
    assert text in ("yes", "no")
    first = entries[0]
    assert all(t.text and ("yes".startswith(t.text) or "no".startswith(t.text)) for t in first.top)
    assert abs(sum(np.exp(t.logprob) for t in first.top) - 1) < 1e-6


# -- the ONNX engine ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def onnx(onnx_export: OnnxExport) -> AsyncIterator[OnnxEngine]:
    eng = await OnnxEngine.load(onnx_export.package("int8"), context_length=1024, threads=2)
    yield eng
    await eng.aclose()


ONNX_EXPORT_TIMEOUT = pytest.mark.timeout(1800)  # the first ONNX test exports the model (minutes on busy cores)


@ONNX_EXPORT_TIMEOUT
@pytest.mark.parametrize(("name", "prompt", "schema"), SCHEMAS[:8], ids=[s[0] for s in SCHEMAS[:8]])
async def test_onnx_schemas_validate(onnx: OnnxEngine, name: str, prompt: str, schema: dict[str, object]) -> None:
    text, _, done = await _run(onnx, await _chat(onnx, prompt, Constraint(ConstraintKind.JSON_SCHEMA,
                                                                          json.dumps(schema)), n=120))
    assert done.finish_reason is FinishReason.STOP, text
    jsonschema.validate(json.loads(text), schema)


@ONNX_EXPORT_TIMEOUT
async def test_onnx_regex_and_grammar(onnx: OnnxEngine) -> None:
    text, _, _ = await _run(onnx, await _chat(onnx, "Give a date.", DIGITS))
    assert len(text) == 5 and text[2] == "-" and text.replace("-", "").isdigit()
    text, _, _ = await _run(onnx, await _chat(onnx, "Pick.", Constraint(ConstraintKind.GBNF, 'root ::= "a" | "b"')))
    assert text in ("a", "b")


@ONNX_EXPORT_TIMEOUT
async def test_onnx_logprobs_match_the_decoders_scores(onnx_export: OnnxExport) -> None:
    # fp32: int8's dynamic quantization scales with the whole batch's activations, so its scores for a
    # sequence depend on how many tokens are evaluated at once; fp32's do not (beyond rounding).
    onnx = await OnnxEngine.load(onnx_export.package("fp32"), context_length=256, threads=2)
    try:
        await _onnx_logprobs(onnx)
    finally:
        await onnx.aclose()


async def _onnx_logprobs(onnx: OnnxEngine) -> None:
    request = GenerationRequest(prompt="The capital of France is", sampling=SamplingParams(
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True))
    _, entries, _ = await _run(onnx, request)
    prompt = list(await onnx.tokenize(request.prompt))
    rows = onnx.decoder_logits(prompt + [e.token_id for e in entries][:-1])[len(prompt) - 1:]
    for entry, row in zip(entries, rows, strict=True):
        expected = _log_softmax(row)
        assert entry.logprob <= 0
        assert abs(entry.logprob - expected[entry.token_id]) < 1e-3
        assert entry.top[0].token_id == entry.token_id
