"""This checkout against another one (the commit before a change): the same benchmark, turn about.

A restructuring must not make the daemon slower. This runs bench/stream_overhead.py and bench/batching.py
(--quick) from a baseline checkout and from this one, alternating which goes first in each round, and
prints the medians of laasd's own figures from both and their ratios (this / baseline). Each checkout runs
with its own code and its own .venv (a checkout without one uses this one's Python).

Usage: .venv/bin/python bench/against_baseline.py BASELINE_DIR [--rounds 2] [--tokens 128]
  e.g. git worktree add /tmp/base HEAD~1 && cp -a .venv /tmp/base/.venv  (then point its editable
  install at /tmp/base: the .pth file in site-packages names the source roots)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
Figures = dict[str, float]


def python_of(tree: Path) -> str:
    own = tree / ".venv/bin/python"
    return str(own) if own.exists() else sys.executable


def run(tree: Path, script: str, *args: str) -> str:
    done = subprocess.run([python_of(tree), str(tree / "bench" / script), *args], cwd=tree, capture_output=True,
                          text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {script} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def stream_overhead(tree: Path, tokens: int) -> Figures:
    out = run(tree, "stream_overhead.py", "--tokens", str(tokens), "--runs", "3")
    row = re.search(r"^laasd gRPC stream\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    ratio = re.search(r"^laasd vs llama-cpp-python generate\(\): decode ([\d.]+)x", out, re.M)
    if not row or not ratio:
        raise SystemExit(f"{tree}: unexpected stream_overhead output:\n{out}")
    return {"stream: first token ms": float(row[1]), "stream: decode tok/s": float(row[2]),
            "stream: decode / in-process": float(ratio[1])}


def batching(tree: Path) -> Figures:
    summary = json.loads(run(tree, "batching.py", "--quick").strip().splitlines()[-1])
    figures: Figures = {}
    for level in summary["laasd"]:
        n = level["streams"]
        figures[f"batching {n} streams: tok/s"] = level["tok_s"]
        figures[f"batching {n} streams: median TTFT s"] = level["ttft_median_s"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this": ROOT}
    samples: dict[str, dict[str, list[float]]] = {"baseline": {}, "this": {}}
    for r in range(args.rounds):
        order = ["baseline", "this"] if r % 2 == 0 else ["this", "baseline"]
        for name in order:
            figures = {**stream_overhead(trees[name], args.tokens), **batching(trees[name])}
            for key, value in figures.items():
                samples[name].setdefault(key, []).append(value)
            print(f"round {r + 1}, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    print(f"\n{'figure':40} {'baseline':>10} {'this':>10} {'this/base':>10}   (medians of {args.rounds} rounds)")
    for key in samples["baseline"]:
        base, this = statistics.median(samples["baseline"][key]), statistics.median(samples["this"].get(key, [0.0]))
        print(f"{key:40} {base:10.2f} {this:10.2f} {this / base if base else 0.0:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
