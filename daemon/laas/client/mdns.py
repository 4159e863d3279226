"""DNS-SD over mDNS for laas: the service type, the TXT record a daemon advertises, and a browser.

Layer: client. The wire format of discovery, so it lives with the client (`laas discover`, `mdns:`
targets); the daemon's advertiser and the router's peer finder stand on it from above.
A TXT record is small (RFC 6763 advises well under 1300 bytes, each string under 255), so the
model list is cut to MODELS_MAX_BYTES and `nmodels` says how many there are. Keys:

    v       protocol version (the laas.v1 API: "1")
    id      the daemon's node id (stable across restarts)
    tls     "1" when the daemon requires TLS, else "0"
    auth    "1" when it requires a token, else "0"
    tid     a short digest of its token, for the "same-token" peer policy (absent without a token)
    models  served model names, comma-separated, cut to fit; nmodels: how many there are
    load    requests running or waiting, all models; free: how many more it admits before refusing
    wait    predicted ms until its default model is free
    pps/tps its default model's prefill and decode rates, tokens/s (0: not measured yet)
    emb     its embedding models' digests, "name=digest" comma-separated (16 hex digits, cut to fit like models)
    seq     counts the updates (browsers cache old TXT records for a while: a repeated one is no news)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_laas._tcp.local."
PROTOCOL_VERSION = "1"
MODELS_MAX_BYTES = 200
_IP_VERSIONS = {"v4": IPVersion.V4Only, "v6": IPVersion.V6Only, "all": IPVersion.All}


@dataclass(frozen=True, slots=True)
class DaemonRecord:
    """A daemon seen on the LAN, as its DNS-SD record says."""

    name: str  # the instance name, e.g. "laasd on kitchen"
    addresses: tuple[str, ...]
    port: int
    node_id: str = ""
    protocol: str = PROTOCOL_VERSION
    tls: bool = False
    auth: bool = False
    token_id: str = ""
    models: tuple[str, ...] = ()
    model_count: int = 0
    load: int = 0
    free: int = 0
    wait_ms: float = 0.0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    embedding_digests: tuple[tuple[str, str], ...] = ()  # (model, digest) for its embedding models

    @property
    def target(self) -> str:
        """host:port for a gRPC channel (IPv6 in brackets)."""
        host = self.addresses[0] if self.addresses else "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def serves(self, model: str) -> bool:
        """Whether it serves `model` ("" is any daemon's default), as far as the cut TXT list tells."""
        return not model or model in self.models


def _cut(items: Sequence[str]) -> list[str]:
    listed: list[str] = []
    for item in items:
        if len(",".join([*listed, item]).encode()) > MODELS_MAX_BYTES:
            break
        listed.append(item)
    return listed


def encode_txt(node_id: str, models: Sequence[str], *, tls: bool, auth: bool, token_id: str = "",
               load: int = 0, free: int = 0, wait_ms: float = 0.0, prefill_tps: float = 0.0,
               decode_tps: float = 0.0, embedding_digests: Mapping[str, str] | None = None) -> dict[str, str]:
    # The wait keeps 2 significant digits: a busy daemon's TXT does not change with every ms of progress.
    listed = _cut(models)
    txt = {"v": PROTOCOL_VERSION, "id": node_id[:32], "tls": str(int(tls)), "auth": str(int(auth)),
           "models": ",".join(listed), "nmodels": str(len(models)), "load": str(load), "free": str(free),
           "wait": f"{float(f'{wait_ms:.2g}'):.0f}", "pps": f"{prefill_tps:.0f}", "tps": f"{decode_tps:.1f}"}
    if token_id:
        txt["tid"] = token_id[:16]
    if embedding_digests:
        txt["emb"] = ",".join(_cut([f"{m}={d[:16]}" for m, d in embedding_digests.items()]))
    return txt


def _number(txt: Mapping[str, str], key: str) -> float:
    try:
        return max(float(txt.get(key, "0")), 0.0)
    except ValueError:
        return 0.0


def decode(info: AsyncServiceInfo) -> DaemonRecord | None:
    """The record of a resolved service, or None when it is not a laas daemon we can speak to."""
    txt = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
    if txt.get("v") != PROTOCOL_VERSION or not info.port:
        return None
    addresses = tuple(sorted(info.parsed_scoped_addresses(), key=lambda a: ipaddress.ip_address(
        a.split("%")[0]).version))  # IPv4 first
    return DaemonRecord(
        name=info.name.removesuffix("." + SERVICE_TYPE), addresses=addresses, port=info.port,
        node_id=txt.get("id", ""), protocol=txt["v"], tls=txt.get("tls") == "1", auth=txt.get("auth") == "1",
        token_id=txt.get("tid", ""), models=tuple(m for m in txt.get("models", "").split(",") if m),
        model_count=int(_number(txt, "nmodels")), load=int(_number(txt, "load")), free=int(_number(txt, "free")),
        wait_ms=_number(txt, "wait"), prefill_tps=_number(txt, "pps"), decode_tps=_number(txt, "tps"),
        embedding_digests=tuple((m, d) for m, _, d in (e.rpartition("=") for e in txt.get("emb", "").split(","))
                                if m and d))


def zeroconf(interfaces: Sequence[str] = (), ip_version: str = "v4") -> AsyncZeroconf:
    """An AsyncZeroconf on the given interface addresses (all when empty)."""
    choice: InterfaceChoice | list[str] = list(interfaces) if interfaces else InterfaceChoice.All
    return AsyncZeroconf(interfaces=choice, ip_version=_IP_VERSIONS[ip_version])


def packed(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    return socket.inet_pton(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))


Listener = Callable[[str, DaemonRecord | None], None]  # (name, record); None: it went away


class Browser:
    """Follows the laas daemons on the LAN: `records` by instance name, `listener` told of each change.

    A daemon that sends goodbye packets (a clean stop) goes at once; one that vanishes goes when its
    address records' TTL (the daemon's discovery_ttl_s) runs out and a fresh query gets no answer.
    zeroconf keeps the service's pointer record for at least 1125 s whatever its TTL, so the browser
    sweeps: every `sweep_s` it checks that each known daemon's records are still in the cache.
    """

    def __init__(self, azc: AsyncZeroconf, listener: Listener | None = None, resolve_timeout_ms: int = 3000,
                 sweep_s: float = 2.0) -> None:
        self._azc = azc
        self._listener = listener
        self._timeout_ms = resolve_timeout_ms
        self._sweep_s = sweep_s
        self.records: dict[str, DaemonRecord] = {}
        self._removals: dict[str, int] = {}  # goodbyes seen per name
        self._tasks: set[asyncio.Task[None]] = set()
        self._browser: AsyncServiceBrowser | None = None

    def start(self) -> None:
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        self._spawn(self._sweep())

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_s)
            for name in list(self.records):
                info = AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}")
                if not info.load_from_cache(self._azc.zeroconf):  # expired: ask once more before giving up
                    await self._apply(f"{name}.{SERVICE_TYPE}", ServiceStateChange.Updated)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        self._spawn(self._apply(name, state_change))

    async def _apply(self, name: str, state_change: ServiceStateChange) -> None:
        short = name.removesuffix("." + SERVICE_TYPE)
        record: DaemonRecord | None = None
        if state_change is ServiceStateChange.Removed:
            self._removals[short] = self._removals.get(short, 0) + 1
        else:
            removals = self._removals.get(short, 0)
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if await info.async_request(self._azc.zeroconf, self._timeout_ms):
                record = decode(info)
            if self._removals.get(short, 0) != removals:  # a goodbye came while resolving: it wins
                return
        if record == self.records.get(short):  # nothing new (or an unknown service that did not resolve)
            return
        if record is None:
            del self.records[short]
        else:
            self.records[short] = record
        if self._listener is not None:
            try:
                self._listener(short, record)
            except Exception:  # a listener's bug must not stop the browser
                log.exception("discovery listener failed")

    async def aclose(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
