"""LAN discovery over real mDNS on loopback: real daemons advertise, find each other and serve as peers.

Every instance name carries this run's id, and each daemon only takes peers named with it, so test
runs in parallel on one host (all on the same multicast group) cannot use each other's daemons.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from laas.client import Chunk, Client, Unavailable, discovery
from laas.daemon.model_digest import package_digest
from tests.conftest import OnnxExport, copy_package
from tests.daemon_process import DaemonProcess
from tests.discover_watch import DiscoverWatch

RUN = f"t{uuid.uuid4().hex[:8]}"
LOCAL = "smollm2-135m-instruct"
TEXTS = ["Where is the lighthouse?", "A keeper lived there for forty years."]
LONG_PROMPT = "Notes on tides and moons. " * 120  # about 720 tokens


def _config(name: str, *, context_length: int = 4096, ttl_s: int = 120, extra: str = "") -> str:
    """One request at a time (`parallel = 1`): a stream makes a daemon busy, with a wait for the next."""
    return f"""
discovery = "on"
discovery_name = "{RUN}-{name}"
discovery_interfaces = ["127.0.0.1"]
discovery_peers = ["{RUN}-*"]
discovery_load_interval_s = 0.2
discovery_ttl_s = {ttl_s}
parallel = 1
{extra}

[[models]]
name = "{LOCAL}"
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
context_length = {context_length}
"""


@pytest.fixture
def watch() -> Iterator[DiscoverWatch]:
    w = DiscoverWatch()
    yield w
    w.stop()


def _up(name: str) -> Callable[[dict[str, object]], bool]:
    return lambda e: e["event"] in ("+", "~") and e["name"] == f"{RUN}-{name}"


def _wait_for_peers(daemon: DaemonProcess, *names: str, timeout: float = 30.0) -> None:
    """Until the daemon's router lists the peers as candidates (ExplainRoute)."""
    wanted = {f"{RUN}-{n}" for n in names}
    deadline = time.monotonic() + timeout
    with Client(daemon.target) as client:
        while time.monotonic() < deadline:
            if wanted <= {c.target for c in client.explain("hi", max_tokens=1).candidates if c.kind == "peer"}:
                return
            time.sleep(0.2)
    raise AssertionError(f"{daemon.target} did not find peers {wanted}:\n{daemon.log}")


def test_daemons_appear_report_load_and_go(start_daemon: Callable[..., DaemonProcess], watch: DiscoverWatch) -> None:
    a = start_daemon(_config("a"))
    b = start_daemon(_config("b", ttl_s=3))
    seen_a = watch.wait_for(_up("a"))
    assert seen_a["port"] == a.port and seen_a["addresses"] == ["127.0.0.1"]
    assert seen_a["models"] == [LOCAL] and seen_a["load"] == 0 and seen_a["auth"] is False
    watch.wait_for(_up("b"))
    assert discovery.find(f"{RUN}-a", interfaces=["127.0.0.1"]).target == a.target
    by_name = subprocess.run([sys.executable, "-m", "laas.client.cli", "--target", f"mdns:{RUN}-b", "health"],
                             capture_output=True, text=True, timeout=30)
    assert by_name.stdout.strip() == "SERVING", by_name.stderr

    # Load: a stream on a shows in its TXT record while it runs, and goes when it ends.
    mark = len(watch.events)
    with Client(a.target) as client:
        stream = client.generate("Once upon a time", max_tokens=2000, ignore_eos=True, policy="local_only")
        next(stream)
        watch.wait_for(lambda e: _up("a")(e) and e["load"] >= 1 and e["wait_ms"] > 0, after=mark)
        # b is idle, a is busy: the least loaded of this run's daemons is b; a connection to it works.
        with Client.discovered(model=LOCAL, wait_s=1.5, interfaces=["127.0.0.1"], match=f"{RUN}-*") as picked:
            assert picked.models()[0].name == LOCAL
        assert discovery.least_loaded(LOCAL, 1.5, ["127.0.0.1"], match=f"{RUN}-*").name == f"{RUN}-b"
        stream.close()  # cancels the request
    watch.wait_for(lambda e: _up("a")(e) and e["load"] == 0, after=mark)

    # A clean stop says goodbye: gone at once. A crash (no goodbye) is gone when its TTL runs out.
    mark = len(watch.events)
    assert a.stop() == 0, a.log
    watch.wait_for(lambda e: e == {"event": "-", "name": f"{RUN}-a"}, timeout=5, after=mark)
    b.kill()
    started = time.monotonic()
    watch.wait_for(lambda e: e == {"event": "-", "name": f"{RUN}-b"}, timeout=30, after=mark)
    assert time.monotonic() - started >= 1  # expired, not a goodbye


def test_a_request_too_slow_for_one_daemon_is_served_by_its_peer(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    busy = start_daemon(_config("busy"))
    start_daemon(_config("idle"))
    _wait_for_peers(busy, "idle")
    with Client(busy.target) as client:
        hog = client.generate("Once upon a time", max_tokens=400, ignore_eos=True, policy="local_only")
        next(hog)  # the device is now busy for a long while
        peer = next(c for c in client.explain("Hello", max_tokens=8).candidates if c.kind == "peer")
        budget = 2 * peer.predicted_ms + 500
        local = next(c for c in client.explain("Hello", max_tokens=8, latency_budget_ms=budget).candidates
                     if c.kind == "local")
        assert local.predicted_ms > budget  # the queue on the device is longer than the budget
        chunks = list(client.generate("Hello", max_tokens=8, latency_budget_ms=budget, ignore_eos=True))
        hog.close()
    route = chunks[0].route
    assert route is not None and (route.kind, route.target) == ("peer", f"{RUN}-idle"), chunks[0]
    assert chunks[-1].completion_tokens == 8


def test_a_peer_that_dies_mid_request_fails_over(start_daemon: Callable[..., DaemonProcess]) -> None:
    small = start_daemon(_config("small", context_length=512))  # the long prompt does not fit here
    peers = {f"{RUN}-{n}": start_daemon(_config(n)) for n in ("p1", "p2")}
    _wait_for_peers(small, "p1", "p2")
    chunks: list[Chunk] = []
    with Client(small.target) as client:
        stream = client.generate(LONG_PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
        for chunk in stream:
            chunks.append(chunk)
            if chunk.text and sum(1 for c in chunks if c.text) == 3:
                first = chunks[0].route
                assert first is not None and first.kind == "peer"
                peers[first.target].signal(signal.SIGKILL)  # dies mid-stream, no goodbye
    routes = [c.route for c in chunks if c.route is not None]
    assert len(routes) == 2, routes
    assert routes[1].failover and routes[1].kind == "peer" and routes[1].target != routes[0].target
    # One budget across both peers; tokens already delivered are counted by text pieces, and a piece
    # from a peer can hold two tokens (an incomplete UTF-8 sequence), so the sum may fall short by one.
    assert chunks[-1].finish_reason == "length" and 22 <= chunks[-1].completion_tokens <= 24
    assert len("".join(c.text for c in chunks)) > 24
    survivor = peers[routes[1].target]
    assert survivor.health() == "SERVING"


def test_an_open_daemon_on_the_lan_is_not_advertised_unless_allowed(
        start_daemon: Callable[..., DaemonProcess], make_home: Callable[..., Path], tmp_path: Path) -> None:
    # Listening openly needs the loudly named override first (issue 7); discovery then still refuses.
    dangerous = "dangerously_listen_without_tls_or_tokens = true"
    config = tmp_path / "open.toml"
    config.write_text(_config("open", extra=dangerous))
    refused = subprocess.run([sys.executable, "-m", "laas.daemon.cli", "--home", str(make_home()), "--config",
                              str(config), "serve", "--listen", "0.0.0.0:0"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "discovery_allow_unauthenticated" in refused.stderr, refused.stderr
    allowed = start_daemon(_config("open", extra=f"{dangerous}\ndiscovery_allow_unauthenticated = true"),
                           listen="0.0.0.0:0")
    record = discovery.find(f"{RUN}-open", wait_s=20, interfaces=["127.0.0.1"])
    assert record.port == allowed.port and record.addresses == ("127.0.0.1",)


def test_a_discovered_peer_embeds_only_a_model_with_the_devices_digest(
        start_daemon: Callable[..., DaemonProcess], make_home: Callable[..., Path],
        embedding_export: OnnxExport) -> None:
    """The device has no files for its embedding models (only their digests, configured): the peer that has
    the very package embeds for it; the peer's same-named model made from another package is refused."""
    int8, fp32 = embedding_export.package("int8"), embedding_export.package("fp32")
    digest = package_digest(int8)
    peer_home = make_home()
    copy_package(int8, peer_home / "models", "minilm-int8")
    copy_package(fp32, peer_home / "models", "minilm-fp32")
    tables = "".join(f'\n[[models]]\nname = "{n}"\npath = "{p}"\nformat = "onnx"\nsha256 = "{digest}"\n'
                     for n, p in (("minilm-int8", "absent-int8"), ("minilm-other", "absent-other"),
                                  ("minilm-nowhere", "absent-nowhere")))
    device = start_daemon(_config("emb-device") + tables)
    peer = start_daemon(_config("emb-peer") + '\n[[models]]\nname = "minilm-other"\npath = "minilm-fp32"\n'
                        'format = "onnx"\n', home=peer_home)
    name = f"{RUN}-emb-peer"
    with Client(device.target) as client, Client(peer.target) as direct:
        deadline = time.monotonic() + 30
        while True:  # until the peer and its digests are known (ExplainRoute refuses while nothing is eligible)
            try:
                candidates = {c.target: c for c in client.explain_embed("x", model="minilm-int8").candidates}
                break
            except Unavailable:
                assert time.monotonic() < deadline, device.log
                time.sleep(0.2)
        assert candidates[name].eligible and not candidates["minilm-int8"].eligible  # the device has no files
        out = client.embed(TEXTS, model="minilm-int8")
        assert out.route is not None and (out.route.kind, out.route.target) == ("peer", name)
        np.testing.assert_allclose(np.array(out.vectors), np.array(direct.embed(TEXTS, model="minilm-int8").vectors),
                                   atol=1e-6)

        # Nothing else may embed these, so both calls are refused, naming why the peer is not eligible.
        for model, why in (("minilm-other", "serves 'minilm-other' with another digest"),
                           ("minilm-nowhere", "does not serve 'minilm-nowhere'")):
            for call in (client.explain_embed, client.embed):
                with pytest.raises(Unavailable) as refused:
                    call(TEXTS, model=model)
                assert f"{name}: {why}" in str(refused.value)
        assert client.health() == "SERVING"
