"""Constrained vs unconstrained decoding on the default model, in one run: decode tok/s and compile cost.

The GGUF engine in-process (the same scheduler the daemon runs), greedy decoding. Rounds alternate which
goes first; each round runs an unconstrained generation (ignore_eos, --tokens tokens) and a constrained one
(a JSON schema whose output is a long array of bounded integers, so it runs about as long). Printed: the
medians of both decode rates and their ratio (the issue's bar: >= 0.85), the one-off cost of llguidance's
tokenizer for the model, a new schema's compile time, and the same schema's second time (the cache).

Usage: .venv/bin/python bench/constrained.py [--rounds 5] [--tokens 128] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from laas.core.types import (
    ChatMessage,
    Completion,
    Constraint,
    ConstraintKind,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from laas.daemon.backends.gguf import GgufEngine
from laas.daemon.gguf_header import read_gguf_header
from laas.daemon.settings_models import default_home

SCHEMA = {"type": "object", "properties": {"readings": {
    "type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999}, "minItems": 40, "maxItems": 40}},
    "required": ["readings"], "additionalProperties": False}


async def _decode_rate(engine: GgufEngine, request: GenerationRequest) -> tuple[float, int]:
    done: Completion | None = None
    async for chunk in engine.generate(request):
        if isinstance(chunk, Completion):
            done = chunk
        assert isinstance(chunk, TextDelta | Completion)
    assert done is not None
    n = done.usage.completion_tokens
    return (n - 1) * 1000 / done.timings.decode_ms, n


async def main(args: argparse.Namespace) -> None:
    path = Path(args.model) if args.model else default_home(os.environ) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    engine = await GgufEngine.load(path, read_gguf_header(path), context_length=2048, threads=args.threads)
    try:
        bound = await engine.render_chat([ChatMessage("user", "List forty sensor readings as JSON.")])

        def request(constraint: Constraint | None) -> GenerationRequest:
            return GenerationRequest(prompt=bound.prompt, add_special=False, template_stops=bound.template_stops,
                                     sampling=SamplingParams(max_tokens=args.tokens if constraint is None else 400,
                                                             temperature=0, ignore_eos=constraint is None,
                                                             constraint=constraint))

        schema = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
        start = time.perf_counter()
        await asyncio.to_thread(engine.constraints.matcher, Constraint(ConstraintKind.JSON_OBJECT))
        tokenizer_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        await asyncio.to_thread(engine.constraints.matcher, schema)
        compile_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        await asyncio.to_thread(engine.constraints.matcher, schema)
        cached_ms = (time.perf_counter() - start) * 1000

        free: list[float] = []
        constrained: list[float] = []
        tokens = 0
        for i in range(args.rounds):
            order = [(None, free), (schema, constrained)]
            for constraint, rates in order if i % 2 == 0 else order[::-1]:
                rate, n = await _decode_rate(engine, request(constraint))
                rates.append(rate)
                if constraint is not None:
                    tokens = n
        f, c = statistics.median(free), statistics.median(constrained)
        print(f"unconstrained decode tok/s (median of {args.rounds}, {args.tokens} tokens)  {f:.1f}")
        print(f"constrained decode tok/s (median of {args.rounds}, {tokens} tokens, JSON schema)  {c:.1f}")
        print(f"constrained / unconstrained  {c / f:.3f}")
        print(f"llguidance tokenizer for the model (once per load) ms  {tokenizer_ms:.1f}")
        print(f"schema compile, first request ms  {compile_ms:.2f}")
        print(f"schema compile, second request (cache hit) ms  {cached_ms:.3f}")
    finally:
        await engine.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="")
    asyncio.run(main(parser.parse_args()))
