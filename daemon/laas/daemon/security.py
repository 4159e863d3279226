"""Security settings: systemd credentials, TLS server credentials and the refusal to listen openly.

Layer: composition. `credential_defaults` fills unset TLS and token paths from systemd's
$CREDENTIALS_DIRECTORY (LoadCredential= in the unit; settings.py calls it while loading, and
settings_models.py checks the values with the other settings); `listen_refusal` is the secure default:
a TCP address (gRPC's `listen` or the HTTP API's `http_listen`) other than loopback needs TLS and
tokens, unless the operator sets the loudly named
`dangerously_listen_without_tls_or_tokens`; `metrics_refusal` applies the same rule to `metrics_listen`.
Unix sockets are guarded by their file permissions. The checks read the settings through
`SecuritySettings`, the few fields they need, so that this module does not import settings.py (which
imports it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import grpc

# Credential names the unit loads (LoadCredential=), and the setting each one fills when unset.
CREDENTIALS = (("tls_cert", "laas.tls-cert"), ("tls_key", "laas.tls-key"), ("tls_client_ca", "laas.tls-client-ca"),
               ("tokens_file", "laas.tokens"))


def credential_defaults(environ: Mapping[str, str], values: Mapping[str, Any]) -> dict[str, str]:
    """Paths of the systemd credentials present, for the settings the operator left unset."""
    directory = environ.get("CREDENTIALS_DIRECTORY", "").split(":")[0]
    if not directory:
        return {}
    found = {key: Path(directory) / name for key, name in CREDENTIALS if not values.get(key)}
    return {key: str(path) for key, path in found.items() if path.is_file()}


class SecuritySettings(Protocol):
    """The settings the checks below read (laas.daemon.settings.Settings has them)."""

    @property
    def home(self) -> Path: ...
    @property
    def listen_addresses(self) -> tuple[str, ...]: ...
    @property
    def http_listen(self) -> tuple[str, ...]: ...
    @property
    def metrics_listen(self) -> str: ...
    @property
    def tls_cert(self) -> str: ...
    @property
    def tls_key(self) -> str: ...
    @property
    def tls_client_ca(self) -> str: ...
    @property
    def tokens_file(self) -> str: ...
    @property
    def dangerously_listen_without_tls_or_tokens(self) -> bool: ...


def tokens_path(s: SecuritySettings) -> Path | None:
    """The token file in force: `tokens_file`, else <home>/tokens when it exists; None: no token auth."""
    if s.tokens_file:
        return Path(s.tokens_file).expanduser()
    default = s.home / "tokens"
    return default if default.exists() else None


def is_loopback(address: str) -> bool:
    """Whether a host:port address binds only loopback (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or the empty host (every interface): assume it is reachable


def _missing_protection(s: SecuritySettings, tokens: bool) -> list[str]:
    """What a listener beyond loopback lacks of TLS and tokens."""
    return [what for what, ok in (("TLS (tls_cert, tls_key)", bool(s.tls_cert)), ("tokens (tokens_file)", tokens))
            if not ok]


def listen_refusal(s: SecuritySettings, tokens: bool) -> str | None:
    """Why the daemon must not listen as configured, or None."""
    if s.dangerously_listen_without_tls_or_tokens:
        return None
    open_tcp = [a for a in (*s.listen_addresses, *s.http_listen) if not a.startswith("unix:") and not is_loopback(a)]
    missing = _missing_protection(s, tokens)
    if open_tcp and missing:
        return (f"refusing to listen on {', '.join(open_tcp)} without {' and '.join(missing)}: anyone on the network "
                "could read and send prompts. Configure them, listen on loopback or a unix socket, or set "
                "dangerously_listen_without_tls_or_tokens = true")
    return None


def metrics_refusal(s: SecuritySettings, tokens: bool) -> str | None:
    """Why the metrics endpoint must not listen as configured (the gRPC listener's rule), or None."""
    if not s.metrics_listen or s.dangerously_listen_without_tls_or_tokens:
        return None
    host = s.metrics_listen.rpartition(":")[0] or "127.0.0.1"  # as metrics_http binds it
    if is_loopback(f"{host}:0"):
        return None
    missing = _missing_protection(s, tokens)
    if missing:
        return (f"refusing to serve metrics on {s.metrics_listen} without {' and '.join(missing)}: anyone on the "
                "network could read them. Configure them, use a loopback address, or set "
                "dangerously_listen_without_tls_or_tokens = true")
    return None


def server_credentials(s: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the TCP listeners (mutual TLS when tls_client_ca is set), or None."""
    import grpc

    if not s.tls_cert:
        return None
    cert, key = Path(s.tls_cert).read_bytes(), Path(s.tls_key).read_bytes()
    ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
