"""What the daemon has done and is doing, as Prometheus metrics: one registry, two readers.

Layer: application. The servicer records each request (by model, route and status), its time to
first token and the gaps between its tokens; the rest (queue depth, active sequences, KV use, prefix
cache hits, model state, circuit states) is read from the registry and router when scraped, so it can
never drift from the truth. A model label is a name the daemon knows (a configured model, an alias, a
remote's model); any other requested name counts under the one label "unknown", so clients cannot
grow the metrics (and GetStats' reply) without bound. The optional HTTP endpoint (`metrics_listen`,
metrics_http.py) serves the text format; the GetStats RPC serves the same samples to gRPC clients.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from laas.core.errors import NotFound
from laas.daemon.registry import ModelRegistry, ModelState
from laas.router.dispatch import Router

_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
UNKNOWN_MODEL = "unknown"


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


class Metrics:
    def __init__(self, registry: ModelRegistry, router: Router) -> None:
        self._registry = registry
        self._router = router
        self.prometheus = CollectorRegistry()
        self.requests = Counter("laas_requests", "Generate, Chat and Embed requests, by model, route and status",
                                ["model", "route", "status"], registry=self.prometheus)
        self.tokens = Counter("laas_streamed_tokens", "Text deltas streamed to clients", ["model", "route"],
                              registry=self.prometheus)
        self.ttft = Histogram("laas_time_to_first_token_seconds", "From arrival to the first text delta",
                              ["model"], buckets=_TTFT_BUCKETS, registry=self.prometheus)
        self.inter_token = Histogram("laas_inter_token_seconds", "Gaps between text deltas of one stream",
                                     ["model"], buckets=_GAP_BUCKETS, registry=self.prometheus)
        self.embedded_inputs = Counter("laas_embedded_inputs", "Inputs embedded (Embed), by model and route",
                                       ["model", "route"], registry=self.prometheus)
        self.prometheus.register(_LiveState(registry, router))

    def embedded(self, model: str, route: str, inputs: int) -> None:
        """An Embed call's inputs, counted once it answered (`model` from model_label)."""
        self.embedded_inputs.labels(model, route).inc(inputs)

    def model_label(self, requested: str) -> str:
        """The requested model name (empty: the default model's) when the daemon knows it, else "unknown"."""
        name = requested or self._registry.default.name
        try:
            self._router.targets_for(name)
        except NotFound:
            return UNKNOWN_MODEL
        return name

    def stream(self, requested_model: str) -> StreamRecorder:
        """A recorder for one request, labelled by model_label (never by an arbitrary client string)."""
        return StreamRecorder(self, self.model_label(requested_model))

    def text(self) -> bytes:
        return generate_latest(self.prometheus)

    def samples(self) -> list[Sample]:
        return [Sample(s.name, tuple(sorted(s.labels.items())), float(s.value))
                for family in self.prometheus.collect() for s in family.samples]


class StreamRecorder:
    """One request's figures; `finish` records them once, with the status the call ended with."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._m = metrics
        self.model = model
        self.route = ""
        self._arrived = time.perf_counter()
        self._last = 0.0
        self._done = False
        self._inter_token = metrics.inter_token.labels(model)
        self._tokens: tuple[str, Any] = ("", None)  # the counter of the route the tokens go by (set late)

    def on_delta(self) -> None:
        now = time.perf_counter()
        if self._last:
            self._inter_token.observe(now - self._last)
        else:
            self._m.ttft.labels(self.model).observe(now - self._arrived)
        self._last = now
        route, counter = self._tokens
        if counter is None or route != self.route:  # labels() costs a lookup under a lock: once per stream
            counter = self._m.tokens.labels(self.model, self.route)
            self._tokens = (self.route, counter)
        counter.inc()

    def finish(self, status: str) -> None:
        if not self._done:
            self._done = True
            self._m.requests.labels(self.model, self.route or "none", status).inc()


class _LiveState(Collector):
    def __init__(self, registry: ModelRegistry, router: Router) -> None:
        self._registry = registry
        self._router = router

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily("laas_queue_depth", "Requests waiting for a model", labels=["model"])
        active = GaugeMetricFamily("laas_active_requests", "Requests a model is running", labels=["model"])
        ready = GaugeMetricFamily("laas_model_ready", "1 when the model is loaded and serving", labels=["model"])
        slots = GaugeMetricFamily("laas_parallel_slots", "Requests the model decodes at once", labels=["model"])
        kv_used = GaugeMetricFamily("laas_kv_cells_used", "KV cache cells in use (running and cached)",
                                    labels=["model"])
        kv_total = GaugeMetricFamily("laas_kv_cells", "KV cache cells of the model's context", labels=["model"])
        hits = CounterMetricFamily("laas_prefix_cache_hits", "Requests that reused a cached prompt prefix",
                                   labels=["model"])
        cached = CounterMetricFamily("laas_prefix_cached_tokens", "Prompt tokens not evaluated again",
                                     labels=["model"])
        drafted = CounterMetricFamily("laas_draft_tokens", "Tokens drafted by speculation and verified",
                                      labels=["model"])
        kept = CounterMetricFamily("laas_draft_accepted_tokens", "Drafted tokens the model produced itself (kept)",
                                   labels=["model"])
        for entry in self._registry.entries():
            name = entry.name
            queued.add_metric([name], entry.queue.waiting)
            active.add_metric([name], entry.queue.active)
            ready.add_metric([name], 1.0 if entry.state is ModelState.READY else 0.0)
            slots.add_metric([name], entry.queue.parallel)
            stats = getattr(entry.engine, "stats", None)
            if callable(stats):
                s = stats()
                kv_used.add_metric([name], s.kv_used)
                kv_total.add_metric([name], s.kv_cells)
                hits.add_metric([name], s.prefix_hits)
                cached.add_metric([name], s.prefix_cached_tokens)
                drafted.add_metric([name], s.draft_tokens)
                kept.add_metric([name], s.draft_accepted)
        memory = GaugeMetricFamily("laas_model_memory_bytes", "Estimated memory of a loaded model", labels=["model"])
        loads = CounterMetricFamily("laas_model_loads", "Model loads", labels=["model"])
        unloads = CounterMetricFamily("laas_model_unloads", "Model unloads, by reason (idle, evicted, admin, "
                                      "replaced)", labels=["model", "reason"])
        for entry in self._registry.entries():
            memory.add_metric([entry.name], entry.memory_bytes)
        for name, count in sorted(self._registry.loads.items()):
            loads.add_metric([name], count)
        for (name, reason), count in sorted(self._registry.unloads.items()):
            unloads.add_metric([name, reason], count)
        budget = GaugeMetricFamily("laas_memory_budget_bytes", "Memory the loaded models may take")
        budget.add_metric([], self._registry.budget_bytes)
        resident = GaugeMetricFamily("laas_models_memory_bytes", "Estimated memory of every loaded model")
        resident.add_metric([], self._registry.resident_bytes)
        yield from (memory, loads, unloads, budget, resident)
        circuit = GaugeMetricFamily("laas_circuit_open", "1 while a remote target's circuit is open",
                                    labels=["target", "kind"])
        failures = GaugeMetricFamily("laas_remote_consecutive_failures", "Failures in a row of a remote target",
                                     labels=["target", "kind"])
        now = time.monotonic()
        for remote in self._router.remote.values():
            labels = [remote.name, remote.kind.value]
            circuit.add_metric(labels, 0.0 if remote.breaker.state(now) == "closed" else 1.0)
            failures.add_metric(labels, remote.breaker.failures)
        yield from (queued, active, ready, slots, kv_used, kv_total, hits, cached, drafted, kept, circuit, failures)
