"""Advertising the daemon on the LAN (mDNS/DNS-SD, `_laas._tcp.local.`): when, under which name, and what.

Layer: infrastructure. The rules, in one place:

- `discovery = "auto"` advertises only when the daemon listens beyond loopback (reachable from the
  LAN); "on" advertises anyway (on loopback: for tests and one-host setups); "off" never does.
- A daemon reachable from the LAN without authentication is not advertised unless the operator sets
  `discovery_allow_unauthenticated` (an open LLM announced on a LAN is how servers end up exposed):
  with "auto" it logs why and goes on unadvertised; with "on" it refuses to start.
  `auth_required` is the single predicate the TLS/token settings plug into.
- The instance name is stable (`discovery_name`, else "laasd on <hostname>"); so is the node id (a
  file in the daemon's home). Load figures in TXT change at most once per `discovery_load_interval_s`.
- The token id in TXT is a digest of the daemon's token file (`token_id`): daemons that share their
  tokens find each other under the "same-token" peer policy.
- On shutdown the service is unregistered first (goodbye packets), before the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import ifaddr
from zeroconf import NonUniqueNameException
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from laas.daemon.listeners import unix_path
from laas.daemon.settings import Settings, SettingsError
from laas.daemon.tokens import TokenFileError, listed

log = logging.getLogger(__name__)

LoadFigures = Callable[[], dict[str, str]]  # the TXT record as it is now


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def lan_reachable(settings: Settings) -> bool:
    """Whether any TCP listen address accepts connections from beyond this host."""
    for address in settings.listen_addresses:
        if unix_path(address) is not None:
            continue
        host = _host(address)
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return True
        except ValueError:  # a host name: assume it resolves to a LAN address
            return True
    return False


def auth_required(settings: Settings) -> bool:
    """Whether every TCP connection must authenticate (TLS client certificates or a token)."""
    from laas.daemon.security import tokens_path  # security settings decide it (issue 7)

    return tokens_path(settings) is not None or bool(settings.tls_client_ca)


def tls_required(settings: Settings) -> bool:
    """Whether TCP connections must use TLS (advertised in TXT)."""
    return bool(settings.tls_cert)


def token_id(settings: Settings) -> str:
    """A short digest of the tokens this daemon accepts (its token file), for the "same-token" peer policy;
    "" without tokens. Daemons given the same token file advertise the same id, so each finds the other
    with discovery_peers = ["same-token"]. It is computed from the digests the file keeps, so it tells
    nothing that lets anyone in; it follows the file (a token created or revoked changes it)."""
    from laas.daemon.security import tokens_path  # security settings decide which file is in force

    path = tokens_path(settings)
    if path is None:
        return ""
    try:
        digests = sorted(entry.digest for entry in listed(path))
    except (OSError, UnicodeDecodeError, TokenFileError):  # the access check reports a broken file
        return ""
    if not digests:
        return ""
    return hashlib.sha256(b"laas-token-id\0" + "\n".join(digests).encode()).hexdigest()[:16]


def should_advertise(settings: Settings) -> bool:
    """Applies the rules above; raises SettingsError when "on" would expose an open daemon."""
    if settings.discovery == "off":
        return False
    reachable = lan_reachable(settings)
    if settings.discovery == "auto" and not reachable:
        return False
    if reachable and not auth_required(settings) and not settings.discovery_allow_unauthenticated:
        message = ("not advertising on the LAN: the daemon listens beyond loopback without authentication; "
                   "set discovery_allow_unauthenticated = true to advertise it anyway")
        if settings.discovery == "on":
            raise SettingsError(message, field="discovery_allow_unauthenticated")
        log.warning("%s", message)
        return False
    return True


def instance_name(settings: Settings) -> str:
    return settings.discovery_name or f"laasd on {socket.gethostname()}"[:63]


def node_id(home: Path) -> str:
    """The daemon's stable id: made once, kept in <home>/node-id."""
    path = home / "node-id"
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if text:
            return text
    new = uuid.uuid4().hex
    with contextlib.suppress(OSError):
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(new + "\n")
    return new


def advertised_addresses(settings: Settings) -> list[str]:
    """The addresses put in the A/AAAA records: the listen hosts, or for a wildcard the chosen interfaces."""
    hosts: list[str] = []
    for address in settings.listen_addresses:
        if unix_path(address) is not None:
            continue
        host = _host(address)
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host)
            if ip.is_unspecified:
                hosts += list(settings.discovery_interfaces) or _interface_addresses()
            else:
                hosts.append(str(ip))
    version = {"v4": (4,), "v6": (6,), "all": (4, 6)}[settings.discovery_ip_version]
    return [h for h in dict.fromkeys(hosts) if ipaddress.ip_address(h).version in version]


def _interface_addresses() -> list[str]:
    """This host's non-loopback addresses (for a wildcard listen address and no discovery_interfaces)."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            parsed = ipaddress.ip_address(address)
            if not (parsed.is_loopback or parsed.is_link_local):
                found.append(str(parsed))
    return found


class Advertiser:
    """Registers the service, refreshes its load figures, and says goodbye on close."""

    def __init__(self, azc: AsyncZeroconf, settings: Settings, port: int, figures: LoadFigures) -> None:
        self._azc = azc
        self._settings = settings
        self._port = port
        self._figures = figures
        self._info: AsyncServiceInfo | None = None
        self._task: asyncio.Task[None] | None = None
        self.name = instance_name(settings)

    def _service_info(self, txt: dict[str, str]) -> AsyncServiceInfo:
        from laas.client.mdns import SERVICE_TYPE, packed

        addresses = advertised_addresses(self._settings)
        return AsyncServiceInfo(SERVICE_TYPE, f"{self.name}.{SERVICE_TYPE}", port=self._port, properties=txt,
                                addresses=[packed(a) for a in addresses] or None,
                                server=f"{socket.gethostname()}-{self._port}.local.",
                                host_ttl=self._settings.discovery_ttl_s, other_ttl=self._settings.discovery_ttl_s)

    async def start(self) -> None:
        txt = self._figures()
        info = self._service_info(txt)
        try:
            await (await self._azc.async_register_service(info, allow_name_change=True))  # probed, announced
        except NonUniqueNameException:
            log.error("mDNS: the name %r is taken on the LAN; not advertising", self.name)
            return
        self._info, self.name = info, info.name.removesuffix("." + info.type)
        log.info("advertising %r on mDNS (%s, port %d)", self.name, info.type, self._port)
        self._task = asyncio.create_task(self._refresh(txt), name="mdns-refresh")

    async def _refresh(self, sent: dict[str, str]) -> None:
        seq = 0
        while True:
            await asyncio.sleep(self._settings.discovery_load_interval_s)
            txt = self._figures()
            if txt != sent and self._info is not None:
                seq += 1  # a TXT record seen before is still cached by browsers: each update must be new
                self._info = self._service_info(txt | {"seq": str(seq)})
                try:
                    await (await self._azc.async_update_service(self._info))
                except Exception:  # the next change tries again
                    log.exception("mDNS: the load update failed")
                    continue
                sent = txt

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._info is not None:
            await (await self._azc.async_unregister_service(self._info))  # goodbyes (TTL 0) sent
            self._info = None
            log.info("mDNS: %r unregistered", self.name)
