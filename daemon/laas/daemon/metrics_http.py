"""The /metrics HTTP endpoint (`metrics_listen`): Prometheus' text format, under the daemon's security rules.

Layer: edge. Where it may bind follows the gRPC listener's rule (security.metrics_refusal): beyond
loopback it needs TLS and tokens, unless `dangerously_listen_without_tls_or_tokens`. With TLS set, it
serves HTTPS with the daemon's certificate (and asks for client certificates under mutual TLS). While
token checks are in force, a scrape needs `Authorization: Bearer <token>` with the models:read scope,
as GetStats does: 401 without a valid token, 403 without the scope, 503 when tokens cannot be checked.
It runs in its own threads (wsgiref), so a scrape never waits for the event loop.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from laas.core.errors import LaasError
from laas.daemon.tokens import TokenStore

log = logging.getLogger(__name__)

SCOPE = "models:read"
StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are frequent: no line per request
        pass


def split_address(address: str) -> tuple[str, int]:
    """host:port ([v6]:port); an empty host is 127.0.0.1. Raises ValueError for a bad port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _reply(start_response: StartResponse, status: str, text: str, *headers: tuple[str, str]) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), *headers])
    return [text.encode() + b"\n"]


def guarded(app: WsgiApp, tokens: TokenStore | None) -> WsgiApp:
    """The app behind the token check (none while no token file is in force)."""

    def run(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if tokens is not None and tokens.in_force():
            header = str(environ.get("HTTP_AUTHORIZATION", ""))
            presented = header[7:].strip() if header[:7].lower() == "bearer " else ""
            try:
                principal = tokens.authenticate(presented) if presented else None
            except LaasError as e:
                log.error("%s", e)
                return _reply(start_response, "503 Service Unavailable", "tokens cannot be checked now")
            if principal is None:
                return _reply(start_response, "401 Unauthorized", "a valid token is required: send the header "
                              "`Authorization: Bearer <token>`", ("WWW-Authenticate", "Bearer"))
            if SCOPE not in principal.scopes:
                return _reply(start_response, "403 Forbidden", f"this token lacks the scope {SCOPE!r}")
        return app(environ, start_response)

    return run


class MetricsServer(ThreadingMixIn, WSGIServer):
    """The endpoint, serving in a thread of its own; close() stops it and joins that thread."""

    daemon_threads = True
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Blocks until the serving thread has ended (up to its poll interval, 0.5 s): call it off the loop."""
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()


def serve_metrics(address: str, registry: CollectorRegistry, tokens: TokenStore | None,
                  tls: tuple[str, str, str] | None = None) -> MetricsServer:
    """Serves /metrics on `address` in a daemon thread; `tls` is (cert, key, client CA or "")."""
    host, port = split_address(address)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(MetricsServer):
        address_family = family

    httpd = make_server(host, port, guarded(make_wsgi_app(registry), tokens), Server, handler_class=_Quiet)
    if tls is not None:
        cert, key, client_ca = tls
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        # the handshake runs in the request's thread, so a slow client cannot hold up accept()
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    httpd.start()
    return httpd
