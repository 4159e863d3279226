"""Speculative decoding on an input-grounded workload: laasd's prompt lookup against plain decoding and
against llama.cpp's own server, with and without its n-gram speculation.

The workload is what edge apps mostly ask: rewrite, correct, quote from or extract from a passage given
in the prompt (TASKS x PASSAGES below), through /v1/chat/completions, greedy, each stream ending where
the model ends it or at --tokens. The same model file (the default GGUF model), threads and context per
slot for every contender:
  - llama-server -np 4 (plain), and with --spec-type ngram-simple at its defaults (a 12-token lookup,
    48-token drafts) and with a 3-token lookup and 16-token drafts (laasd's lookup size);
  - laasd with speculation = "off" (parallel automatic: plain decoding), and at its defaults (parallel
    automatic, speculation = "ngram");
  - llama-bench's tg figure for --tokens tokens (plain decoding, no server), as a reference line.
Rounds alternate (the order rotates each round); a level starts its streams at once, each on its own
task and passage and with a distinct first line (no response cache helps; the shared system prompt is
cached by both servers alike). Per level and contender, the medians over --rounds rounds of: aggregate
tokens/s (all completion tokens / wall time, prompt evaluation included), decode tokens/s (a stream's
tokens after its first / the time after its first, the median stream: what speculation changes; the
prompts are long and some answers short, so prefill weighs heavily in the aggregate), the median time to
first token and the mean answer length. Printed: the ratios of decode tokens/s (one stream) and of
aggregate tokens/s (every level) against laasd with speculation off and against llama-server, paired per
round too; and how many of laasd's greedy outputs with speculation are identical to its outputs without.

The issue's targets at one stream: laasd with speculation >= 1.4x its plain decode's tokens/s, and ahead
of llama-server's n-gram speculation.

With --weights f16 (or q8_0) every contender serves a copy of the default model's weights in that type,
written by llama.cpp's own quantizer (llama_model_quantize, requantizing the Q4_1 file): where a step's
matmuls batch (F16), a drafted token costs far less than a one-token step and speculation pays more.
With --draft as well, the default Q4_1 model drafts for that copy: laasd with speculation_draft (its plan
decides how far to draft, from each sequence's acceptance and the two models' step costs timed at load)
against llama-server -md --spec-type draft-simple (its defaults), both compared with plain decoding.

Usage: .venv/bin/python bench/speculation.py [--tokens 192] [--rounds 3] [--threads 2] [--ctx 2048]
                                             [--levels 1,2,4,8] [--weights q4_1|q8_0|f16] [--draft]
                                             [--llama-server PATH] [--no-llama-bench]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from http_vs_llama_server import (  # type: ignore[import-not-found]  # noqa: E402  (a script beside this one)
    SLOTS,
    LlamaServer,
    default_llama_server,
    default_model,
    llama_server_binary,
    write_home,
)

from tests.daemon_process import DaemonProcess  # noqa: E402
from tests.gguf_convert import requantize  # noqa: E402

TARGET_SPEEDUP = 1.4  # laasd with speculation / laasd plain, one stream
DRAFT_OURS, DRAFT_THEIRS = "laasd speculation_draft=q4_1", "llama-server -md q4_1"
PASSAGES = (
    "The lighthouse stood on a rock at the edge of the bay. Every night the keeper climbed the ninety steps, "
    "wound the clockwork, trimmed the wick and lit the lamp. Ships passing in the dark saw the beam turn once "
    "every twelve seconds, and knew where the rocks were. In winter the storms came from the north, and the "
    "keeper wrote each one in the log: the date, the wind, the height of the waves and the ships that passed.",
    "To reset the router, unplug it from the wall and wait thirty seconds. Plug it back in and wait until the "
    "power light turns solid green, which takes about two minutes. If the light blinks orange, hold the reset "
    "button on the back for ten seconds with a paper clip. The router then restarts with its factory settings: "
    "the network name and password printed on the label underneath work again.",
    "Meeting notes, Tuesday. Present: Ana, Ben, Chloe and David. Ana reported that the new website goes live on "
    "the first of March. Ben said the budget for the spring campaign is eight thousand euros. Chloe will send "
    "the design files to the printer by Friday. David asked who answers customer emails during the holidays; "
    "Ana will write a rota and share it next week.",
    "Our bakery opens at seven in the morning from Monday to Saturday and at eight on Sunday. We bake sourdough "
    "bread, rye bread and baguettes every day, and croissants on weekends only. Orders for birthday cakes must "
    "be placed three days in advance. We accept cash and cards, and a loyalty card gives you every tenth loaf "
    "for free.",
)
TASKS = (
    "Repeat the following text exactly, word for word:\n\n{p}",
    "Correct any mistakes in the following text and return the whole text:\n\n{p}",
    "Rewrite the following text, replacing every full stop with an exclamation mark:\n\n{p}",
    "Quote every sentence of the following text that contains a number, one per line:\n\n{p}",
)
Stream = Callable[[str], tuple[float, int, float, str]]  # prompt -> (s to first content, tokens, s in all, text)


def prompt_of(salt: str, i: int) -> str:
    task, passage = TASKS[i % len(TASKS)], PASSAGES[(i // len(TASKS) + i) % len(PASSAGES)]
    return f"(request {salt})\n" + task.format(p=passage)


def chat_stream(http: httpx.Client, url: str, tokens: int) -> Stream:
    def stream(prompt: str) -> tuple[float, int, float, str]:
        body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first, usage, text = 0.0, 0, []
        with http.stream("POST", f"{url}/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                reply.read()
                raise RuntimeError(f"{url}: HTTP {reply.status_code}: {reply.text[:500]}")
            for line in reply.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                choices = event.get("choices") or []
                content = (choices[0].get("delta") or {}).get("content") if choices else None
                if content:
                    text.append(content)
                    first = first or time.perf_counter() - start
                if event.get("usage"):
                    usage = event["usage"].get("completion_tokens") or usage
        if not usage:
            raise RuntimeError(f"{url}: no usage in the stream")
        return first, usage, time.perf_counter() - start, "".join(text)

    return stream


def level(stream: Stream, n: int, salt: str) -> dict[str, Any]:
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: stream(prompt_of(f"{salt}.{i}", i)), range(n)))
    wall = time.perf_counter() - start
    return {"tok_s": sum(r[1] for r in results) / wall, "ttft_s": statistics.median(r[0] for r in results),
            "decode_tok_s": statistics.median((r[1] - 1) / max(r[2] - r[0], 1e-9) for r in results),
            "tokens": statistics.mean(r[1] for r in results), "texts": [r[3] for r in results]}


def llama_bench_tg(model: Path, threads: int, tokens: int) -> float | None:
    binary = default_llama_server().with_name("llama-bench")
    if not binary.is_file():
        print(f"(no llama-bench at {binary}: `bench/build_llama_bench.sh` builds it; its line is left out)")
        return None
    out = subprocess.run([str(binary), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens),
                          "-r", "3", "-o", "json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=2048, help="context a slot, both servers (default 2048)")
    parser.add_argument("--levels", default="1,2,4,8", help="concurrent streams, comma-separated (default 1,2,4,8)")
    parser.add_argument("--llama-server", type=Path, default=None, metavar="PATH")
    parser.add_argument("--no-llama-bench", action="store_true")
    parser.add_argument("--weights", default="q4_1", choices=["q4_1", "q8_0", "f16"],
                        help="the default model as it is (q4_1), or its weights requantized")
    parser.add_argument("--draft", action="store_true",
                        help="with --weights q8_0 or f16: also the default Q4_1 model drafting for them (laasd's "
                             "speculation_draft, llama-server's -md)")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    binary = llama_server_binary(args.llama_server)
    if binary is None:
        return 2
    model = draft = default_model()
    if args.draft and args.weights == "q4_1":
        parser.error("--draft needs --weights q8_0 or f16 (the Q4_1 model drafts for them)")
    scratch = tempfile.TemporaryDirectory(prefix="laas-bench-weights-")
    if args.weights != "q4_1":
        model = requantize(model, args.weights, Path(scratch.name) / f"{model.stem}-{args.weights}.gguf")
    print(f"model {model.name}, {args.threads} threads, up to {args.tokens} tokens a stream, context {args.ctx} "
          f"a slot, {SLOTS} slots, levels {','.join(map(str, levels))}, {args.rounds} alternating rounds")
    tg = None if args.no_llama_bench else llama_bench_tg(model, args.threads, args.tokens)

    servers = {"llama-server": [],
               "llama-server ngram-simple": ["--spec-type", "ngram-simple"],
               "llama-server ngram-simple n3 m16": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                                                    "--spec-ngram-simple-size-m", "16"]}
    if args.draft:
        servers[DRAFT_THEIRS] = ["-md", str(draft), "--spec-type", "draft-simple"]
    with tempfile.TemporaryDirectory(prefix="laas-bench-") as tmp:
        root = Path(tmp)
        running: list[LlamaServer] = []
        daemons: dict[str, DaemonProcess] = {}
        try:
            urls: dict[str, str] = {}
            for name, extra in servers.items():
                server = LlamaServer(binary, model, args.threads, args.ctx, root / f"{len(running)}.log", extra)
                running.append(server)
                urls[name] = server.wait_ready().url
            laasds = [("laasd speculation=off", 'speculation = "off"\n', None), ("laasd defaults (ngram)", "", None)]
            if args.draft:
                laasds.append((DRAFT_OURS, "", draft))
            for name, setting, drafter in laasds:
                home = root / re.sub(r"\W+", "-", name)
                daemons[name] = DaemonProcess(home, write_home(home, model, args.threads, args.ctx, None,
                                                               setting, drafter)).start()
                urls[name] = daemons[name].http_url
            # A connection per stream: a kept-alive one may be closed by its server while other contenders run
            # (uvicorn's keep-alive is 5 s), and reusing it then fails the stream.
            limits = httpx.Limits(max_connections=2 * max(levels), max_keepalive_connections=0)
            with httpx.Client(timeout=600, limits=limits) as http:
                streams = {name: chat_stream(http, url, args.tokens) for name, url in urls.items()}
                names = list(streams)
                for name in names:  # warm-up
                    level(streams[name], 1, f"warm-{name}")
                    level(streams[name], SLOTS, f"warm{SLOTS}-{name}")
                runs: dict[tuple[str, int], list[dict[str, Any]]] = {(m, n): [] for m in names for n in levels}
                for r in range(args.rounds):
                    order = names[r % len(names):] + names[:r % len(names)]
                    for n in levels:
                        for name in order:
                            runs[name, n].append(level(streams[name], n, f"{r}.{n}"))
        finally:
            for daemon in daemons.values():
                daemon.stop()
            for server in running:
                server.stop()

    plain, spec, theirs = "laasd speculation=off", "laasd defaults (ngram)", "llama-server"
    print(f"\n{'contender':34} {'streams':>7} {'agg tok/s':>10} {'decode tok/s':>12} {'TTFT p50 ms':>11} "
          f"{'tokens':>6}   agg tok/s per round")
    if tg is not None:
        print(f"{'llama-bench tg' + str(args.tokens):34} {1:7d} {'':>10} {tg:12.1f}")
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for n in levels:
        for name in names:
            samples = runs[name, n]
            medians[name, n] = {key: statistics.median(s[key] for s in samples)
                                for key in ("tok_s", "decode_tok_s", "ttft_s", "tokens")}
            m = medians[name, n]
            print(f"{name:34} {n:7d} {m['tok_s']:10.1f} {m['decode_tok_s']:12.1f} {m['ttft_s'] * 1000:11.0f} "
                  f"{m['tokens']:6.0f}   " + " ".join(f"{s['tok_s']:.1f}" for s in samples))
    print()
    summary: dict[str, Any] = {"model": model.name, "threads": args.threads, "tokens": args.tokens, "ctx": args.ctx,
                               "rounds": args.rounds, "llama_bench_tg": tg,
                               "medians": {f"{m} x{n}": v for (m, n), v in medians.items()}}

    def ratio(a: str, b: str, n: int, key: str) -> tuple[float, float]:
        paired = statistics.median(x[key] / y[key] for x, y in zip(runs[a, n], runs[b, n], strict=True))
        return medians[a, n][key] / medians[b, n][key], paired

    for n in levels:
        pairs = [(spec, plain), (plain, theirs), (spec, theirs), (spec, "llama-server ngram-simple"),
                 (spec, "llama-server ngram-simple n3 m16"), ("llama-server ngram-simple", theirs)]
        if args.draft:
            pairs += [(DRAFT_OURS, plain), (DRAFT_OURS, DRAFT_THEIRS), (DRAFT_THEIRS, theirs)]
        for a, b in pairs:
            for key in ("decode_tok_s", "tok_s") if n == 1 else ("tok_s",):
                got, paired = ratio(a, b, n, key)
                verdict = ""
                if n == 1 and key == "decode_tok_s" and a == spec and b == plain:
                    verdict = f"  target >= {TARGET_SPEEDUP:.1f}x: {'PASS' if got >= TARGET_SPEEDUP else 'FAIL'}"
                elif n == 1 and key == "decode_tok_s" and a == spec and b.startswith("llama-server ngram"):
                    verdict = f"  target > 1.0x: {'PASS' if got > 1.0 else 'FAIL'}"
                what = "decode tok/s" if key == "decode_tok_s" else "aggregate tok/s"
                print(f"{a} / {b}, {n} stream{'s' if n > 1 else ''}: {got:.2f}x {what} ({paired:.2f}x paired){verdict}")
                summary[f"{a} / {b} x{n} {key}"] = {"ratio": got, "paired": paired}
    for drafting in (spec, DRAFT_OURS) if args.draft else (spec,):
        same, total = 0, 0
        for n in levels:
            for x, y in zip(runs[drafting, n], runs[plain, n], strict=True):
                same += sum(a == b for a, b in zip(x["texts"], y["texts"], strict=True))
                total += len(x["texts"])
        print(f"greedy outputs of {drafting} identical to laasd's without speculation: {same}/{total}")
        summary[f"identical_outputs {drafting}"] = [same, total]
    print("\n" + json.dumps(summary))
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
