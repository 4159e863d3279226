"""LAN peers found by mDNS as router targets, and the load figures this daemon advertises to them.

Layer: daemon, the composition root's side (zeroconf records in, router targets out). A discovered
daemon becomes a peer target, named by its instance name, when the policy (`discovery_peers`) allows
it: an instance name or glob from the list, or "same-token" (it advertises the token id ours has:
discovery.token_id, a digest of the token file). Its latency
prediction is the same as a configured peer's, seeded from what it advertises (its prefill and
decode rates, the work queued on it) plus the round trip measured when it appears; then learned
from every request sent there. Its load is the wait it advertises plus the work this daemon has sent
it since (router/load.py). It serves Embed only for the embedding models whose digest it advertises
(model_digest.py) and the device's own digest of that model equals.
The requests go LOCAL_ONLY (PeerEngine), so a peer never forwards one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import logging
import time
from collections.abc import Coroutine

from zeroconf.asyncio import AsyncZeroconf

from laas.client.api import AsyncClient
from laas.client.mdns import Browser, DaemonRecord, encode_txt, zeroconf
from laas.daemon.discovery import (
    Advertiser,
    auth_required,
    node_id,
    should_advertise,
    tls_required,
    token_id,
)
from laas.daemon.local_target import LocalModels
from laas.daemon.registry import ModelRegistry
from laas.daemon.settings import Settings
from laas.router.dispatch import Router
from laas.router.latency import CircuitBreaker, RemoteEstimator
from laas.router.load import HostLoad, InFlight
from laas.router.peer import PeerEngine
from laas.router.policy import TargetKind
from laas.router.remote import RemoteTarget

log = logging.getLogger(__name__)

PEER_CONTEXT_LENGTH = 4096  # TXT does not carry context windows; a peer refuses what does not fit


def load_figures(settings: Settings, registry: ModelRegistry, device: LocalModels, node: str) -> dict[str, str]:
    """This daemon's TXT record now: models, queue depth, free places, predicted wait, measured rates."""
    entries = registry.entries()
    load = sum(e.queue.active + e.queue.waiting for e in entries)
    free = sum(max(e.queue.max_waiting + 1 - e.queue.active - e.queue.waiting, 0) for e in entries)
    default = device.targets().get(registry.default.name)
    est = default.estimator if default is not None else None
    models = [e.name for e in sorted(entries, key=lambda e: not e.is_default)]
    digests = {e.name: d for e in entries if e.described is not None and e.described.embedding_dimensions
               and (d := registry.digest(e))}
    return encode_txt(node, models, tls=tls_required(settings), auth=auth_required(settings),
                      token_id=token_id(settings), load=load, free=free,
                      wait_ms=est.queue_ms(time.monotonic()) if est else 0.0,
                      prefill_tps=(est.prefill_tps or 0.0) if est else 0.0,
                      decode_tps=(est.decode_tps or 0.0) if est else 0.0, embedding_digests=digests)


def allowed(settings: Settings, record: DaemonRecord) -> bool:
    """The peer policy: an instance name (or glob) in discovery_peers, or "same-token" (the record
    advertises this daemon's own token id; never without tokens)."""
    for rule in settings.discovery_peers:
        if rule == "same-token":
            mine = token_id(settings)
            if mine and record.token_id == mine:
                return True
        elif fnmatch.fnmatchcase(record.name, rule):
            return True
    return False


class DiscoveredPeers:
    """Adds allowed peers to the router as they appear, updates them as their TXT changes, drops them as they go."""

    def __init__(self, settings: Settings, router: Router, node: str, host: HostLoad | None = None) -> None:
        self._host = host or HostLoad()  # the device's: what is in flight on every target
        self._settings = settings
        self._router = router
        self._node = node
        self._engines: dict[str, PeerEngine] = {}  # kept after a peer goes: streams on it may still run
        self._records: dict[str, DaemonRecord] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_change(self, name: str, record: DaemonRecord | None) -> None:
        if record is None or record.node_id == self._node or not allowed(self._settings, record):
            if name in self._records:
                del self._records[name]
                self._router.remove_remote(name)
                log.info("peer %r left", name)
            return
        if name in self._router.local or (name in self._router.remote and name not in self._records):
            log.warning("discovered peer %r has the name of a local model or configured remote; ignored", name)
            return
        known = self._records.get(name)
        self._records[name] = record
        target = self._router.remote.get(name)
        if known is None or target is None or (known.addresses, known.port) != (record.addresses, record.port):
            target = self._add(name, record)
            log.info("peer %r at %s serves %s", name, record.target, ", ".join(record.models) or "?")
            self._spawn(self._measure(target, record))
        elif known.embedding_digests != record.embedding_digests:
            self._router.add_remote(target, record.models[:1], dict(record.embedding_digests))
        target.estimator.advertise(record.wait_ms, time.monotonic())  # + what this daemon sends it from now

    def _add(self, name: str, record: DaemonRecord) -> RemoteTarget:
        engine = self._engines.get(record.target + "|" + name)
        if engine is None:
            engine = PeerEngine(name, record.target, record.models[0] if record.models else "", PEER_CONTEXT_LENGTH)
            self._engines[record.target + "|" + name] = engine
        # A laasd queues its requests (one at a time unless it batches): what this daemon sends it waits
        # behind what it already sent (the estimator's first guess), until answers under load say otherwise.
        estimator = RemoteEstimator(ttft_ms=100.0, inter_token_ms=50.0, in_flight=InFlight(self._host))
        if record.prefill_tps:
            estimator.prefill_ms_per_token = 1000 / record.prefill_tps
        if record.decode_tps:
            estimator.inter_token_ms = 1000 / record.decode_tps
        target = RemoteTarget(name, TargetKind.PEER, engine, estimator, CircuitBreaker(threshold=2, cooldown_s=10.0),
                              clock=time.monotonic, embedder=engine)
        # It answers for its default model (listed first), the one PeerEngine asks for; Embed for the
        # embedding models whose digest it advertises, when the device's is the same (router/embedding.py).
        self._router.add_remote(target, record.models[:1], dict(record.embedding_digests))
        return target

    async def _measure(self, target: RemoteTarget, record: DaemonRecord) -> None:
        """Seeds the time to first token with the measured round trip (a health check) until real requests teach it."""
        client = AsyncClient(record.target)
        try:
            started = time.perf_counter()
            await client.health(timeout=3.0)
            rtt_ms = (time.perf_counter() - started) * 1000
            if not target.estimator.observed:
                target.estimator.ttft_ms = rtt_ms + 20.0  # + the peer's own overhead before prefill
        except Exception as e:  # an unreachable peer keeps its guess; its breaker learns the rest
            log.info("peer %r did not answer a health check: %s", target.name, e)
        finally:
            await client.close()

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for name in list(self._records):
            self._router.remove_remote(name)
        for engine in self._engines.values():
            with contextlib.suppress(Exception):  # a peer's goodbye is not ours to fail on
                await engine.aclose()


class LanDiscovery:
    """The daemon's presence on the LAN: advertising itself (after SERVING) and following allowed peers."""

    def __init__(self, settings: Settings, registry: ModelRegistry, router: Router, device: LocalModels) -> None:
        self._settings = settings
        self._registry = registry
        self._router = router
        self._device = device
        self._advertise = should_advertise(settings)  # SettingsError when "on" would expose an open daemon
        self._browse = bool(settings.discovery_peers) and settings.discovery != "off"
        self._node = node_id(settings.home) if self._advertise or self._browse else ""
        self._azc: AsyncZeroconf | None = None
        self._advertiser: Advertiser | None = None
        self._browser: Browser | None = None
        self._peers: DiscoveredPeers | None = None

    @property
    def advertised_name(self) -> str | None:
        return self._advertiser.name if self._advertiser is not None else None

    def _zeroconf(self) -> AsyncZeroconf:
        if self._azc is None:
            self._azc = zeroconf(self._settings.discovery_interfaces, self._settings.discovery_ip_version)
        return self._azc

    # mDNS is a convenience: when the network refuses it (no multicast route, an interface gone), the
    # daemon logs why and goes on serving its own clients rather than failing.

    async def browse(self) -> None:
        if self._browse and self._browser is None:
            try:
                self._peers = DiscoveredPeers(self._settings, self._router, self._node, self._device.host)
                self._browser = Browser(self._zeroconf(), self._peers.on_change)
                self._browser.start()
            except Exception:
                log.exception("mDNS: cannot look for peers on the LAN")

    async def advertise(self, port: int) -> None:
        if not self._advertise or self._advertiser is not None:
            return
        figures = functools.partial(load_figures, self._settings, self._registry, self._device, self._node)
        try:
            self._advertiser = Advertiser(self._zeroconf(), self._settings, port, figures)
            await self._advertiser.start()
        except Exception:
            log.exception("mDNS: cannot advertise the daemon on the LAN")

    async def aclose(self) -> None:
        """Goodbye first (peers stop sending here), then stop following the others."""
        if self._advertiser is not None:
            await self._advertiser.aclose()
        if self._browser is not None:
            await self._browser.aclose()
        if self._peers is not None:
            await self._peers.aclose()
        if self._azc is not None:
            await self._azc.async_close()
            self._azc = None
