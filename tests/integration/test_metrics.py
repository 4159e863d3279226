"""Metrics reflect what happened: the Prometheus endpoint and GetStats give the same figures."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import httpx
import pytest

from laas.client import Client, InvalidArgument, Result
from laas.v1 import runtime_pb2 as pb
from laas.v1 import runtime_pb2_grpc as pb_grpc
from tests.cloud_server import free_port
from tests.daemon_process import DaemonProcess

MODEL = "smollm2-135m-instruct"


def _stats(target: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.RuntimeStub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in reply.samples}


def test_metrics_count_requests_latencies_and_cache_hits(start_daemon: Callable[..., DaemonProcess]) -> None:
    port = free_port()
    daemon = start_daemon(f'parallel = 2\nmetrics_listen = "127.0.0.1:{port}"\n')
    with Client(daemon.target) as client:
        for _ in range(2):  # the second reuses the first's cached prompt
            done = client.complete("The capital of France is", max_tokens=6, temperature=0, ignore_eos=True)
            assert done.completion_tokens == 6
        with pytest.raises(InvalidArgument):
            client.complete("Hi", max_tokens=2, top_p=2.0)
    stats = _stats(daemon.target)
    ok = (("model", MODEL), ("route", MODEL), ("status", "OK"))
    assert stats[("laas_requests_total", ok)] == 2
    assert stats[("laas_requests_total", (("model", MODEL), ("route", "none"), ("status", "INVALID_ARGUMENT")))] == 1
    assert stats[("laas_time_to_first_token_seconds_count", (("model", MODEL),))] == 2
    deltas = stats[("laas_streamed_tokens_total", (("model", MODEL), ("route", MODEL)))]
    assert stats[("laas_inter_token_seconds_count", (("model", MODEL),))] == deltas - 2
    assert stats[("laas_parallel_slots", (("model", MODEL),))] == 2
    assert stats[("laas_active_requests", (("model", MODEL),))] == 0
    assert stats[("laas_model_ready", (("model", MODEL),))] == 1
    assert stats[("laas_prefix_cache_hits_total", (("model", MODEL),))] >= 1
    assert 0 < stats[("laas_kv_cells_used", (("model", MODEL),))] <= stats[("laas_kv_cells", (("model", MODEL),))]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert f'laas_requests_total{{model="{MODEL}",route="{MODEL}",status="OK"}} 2.0' in text
    assert "laas_queue_depth" in text and "laas_time_to_first_token_seconds_bucket" in text


def test_drafts_kept_by_speculation_show_in_the_metrics(start_daemon: Callable[..., DaemonProcess]) -> None:
    """speculation = "ngram" drafts by prompt lookup (in the runner): a greedy answer that repeats its prompt
    says what it says without speculation (tests/integration/test_speculation.py checks that token for
    token), and the drafts kept show in the metrics."""
    daemon = start_daemon('speculation = "ngram"\nspeculation_draft_min = 4\n')  # drafts whatever the timed cost
    passage = "Ships passing in the dark saw the beam turn once every twelve seconds, and knew where the rocks were."
    before = _stats(daemon.target)
    key = (("model", MODEL),)
    with Client(daemon.target) as client:
        reply = Result.join(client.chat([{"role": "user", "content": f"Repeat this text exactly:\n\n{passage}"}],
                                        max_tokens=48, temperature=0))
    assert "twelve seconds" in reply.text
    after = _stats(daemon.target)
    drafted = after[("laas_draft_tokens_total", key)] - before.get(("laas_draft_tokens_total", key), 0)
    kept = after[("laas_draft_accepted_tokens_total", key)] - before.get(("laas_draft_accepted_tokens_total", key), 0)
    assert 0 < kept <= drafted, (kept, drafted)


def test_client_chosen_model_names_do_not_become_labels(start_daemon: Callable[..., DaemonProcess]) -> None:
    """50 distinct 100 KiB names (INVALID_ARGUMENT) and 10 unknown short ones (NOT_FOUND) count under one
    "unknown" label, and GetStats keeps answering (red-team item 2: it failed once the labels passed 4 MiB)."""
    daemon = start_daemon()
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.RuntimeStub(channel)
        names = [f"{i:02d}" + "n" * (100 << 10) for i in range(50)] + [f"no-such-model-{i}" for i in range(10)]
        for name in names:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(pb.GenerateRequest(model=name, prompt="Hi"), timeout=10))
            assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    stats = _stats(daemon.target)
    models = {dict(labels).get("model") for _, labels in stats}
    assert models <= {MODEL, "unknown", None}, sorted(str(m)[:40] for m in models)
    counted = {dict(labels)["status"]: value for (name, labels), value in stats.items()
               if name == "laas_requests_total" and dict(labels)["model"] == "unknown"}
    assert counted == {"INVALID_ARGUMENT": 50, "NOT_FOUND": 10}
    audit = (daemon.home / "audit.log").stat().st_size
    assert audit < 60 * 2 * 1024, audit  # two bounded lines a call, not 5 MB of names
