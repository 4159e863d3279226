"""Serving the HTTP API: uvicorn's Server inside the daemon's own event loop, on the `http_listen` addresses.

Layer: edge (HTTP), infrastructure. The daemon binds the sockets itself (host:port, and unix:/path
with the file mode `socket_mode`, as listeners.py binds gRPC's), so that a bad address fails the start
before anything listens, and port 0 reports the port taken. TCP sockets get TLS from the daemon's files
(tls_cert, tls_key; client certificates required with tls_client_ca, whose subject names the caller
when no token file is in force); unix sockets rely on their permissions. One uvicorn Server per kind of
socket (TLS or not) runs `serve()` as a task of this loop; the daemon owns the signals (uvicorn's signal
capture is turned off) and stops it from its exit stack (close(): stop accepting, finish or cancel the
responses left within `grace_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from laas.daemon.http.auth import CLIENT_CERT_KEY
from laas.daemon.listeners import unix_path
from laas.daemon.metrics_http import split_address

log = logging.getLogger(__name__)
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # "Started server process": the daemon says it
Tls = tuple[str, str, str]  # cert, key, client CA ("" : none)
# How long an idle keep-alive connection stays open. uvicorn's default (5 s) equals httpx's pool expiry (the
# openai SDK's client): a client then reuses a connection just as the server closes it, and a POST fails with
# "Server disconnected without sending a response". Longer than the clients' pools keep theirs, as load
# balancers ask of their backends.
KEEP_ALIVE_S = 75


def _with_client_cert(protocol: type[Any]) -> type[Any]:
    """uvicorn's HTTP protocol, putting the client certificate's common name in each request's scope."""

    class WithClientCert(protocol):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            cert = transport.get_extra_info("peercert") or {}
            names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
            if names:
                app: Any = cast(Any, self).app
                name = names[0]

                async def with_cert(scope: Any, receive: Any, send: Any) -> None:
                    scope[CLIENT_CERT_KEY] = name
                    await app(scope, receive, send)

                cast(Any, self).app = with_cert

    return WithClientCert


class _InLoop(uvicorn.Server):
    """uvicorn's Server without its signal handlers (the daemon's own stop it), telling when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


def _tcp_socket(address: str) -> socket.socket:
    host, port = split_address(address)
    family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(where)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _unix_socket(path: Path, mode: int) -> socket.socket:
    if path.is_socket():  # left behind by a daemon that did not stop cleanly
        path.unlink()
    elif path.exists():
        raise OSError(f"a file that is not a socket is there: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class HttpServer:
    """The HTTP API's listeners and servers: bind() (raises OSError naming the address), start(), close()."""

    def __init__(self, app: Callable[..., Awaitable[None]], addresses: tuple[str, ...], socket_mode: str,
                 tls: Tls | None, grace_s: int = 1) -> None:
        self._app = app
        self._addresses = addresses
        self._mode = int(socket_mode, 8)
        self._tls = tls
        self._grace_s = grace_s
        self._tcp: list[socket.socket] = []
        self._unix: list[socket.socket] = []
        self.sockets: list[Path] = []  # unix socket files, removed at close
        self.ports: list[int] = []
        self._servers: list[tuple[_InLoop, asyncio.Task[None]]] = []

    def bind(self) -> None:
        for address in self._addresses:
            path = unix_path(address)
            try:
                if path is None:
                    sock = _tcp_socket(address)
                    self._tcp.append(sock)
                    self.ports.append(int(sock.getsockname()[1]))
                else:
                    self._unix.append(_unix_socket(path, self._mode))
                    self.sockets.append(path)
            except (OSError, ValueError) as e:
                raise OSError(f"http_listen {address!r}: cannot listen: {e}") from e

    def _config(self, tls: bool) -> uvicorn.Config:
        options: dict[str, Any] = {}
        if tls and self._tls is not None:
            cert, key, ca = self._tls
            options = {"ssl_certfile": cert, "ssl_keyfile": key}
            if ca:
                options |= {"ssl_ca_certs": ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        protocol = _with_client_cert(_http_protocol()) if tls and self._tls and self._tls[2] else _http_protocol()
        config = uvicorn.Config(self._app, lifespan="off", log_config=None, access_log=False, server_header=False,
                                timeout_graceful_shutdown=self._grace_s, timeout_keep_alive=KEEP_ALIVE_S,
                                http=protocol, **options)
        config.load()  # a bad certificate fails the start here
        return config

    async def start(self) -> None:
        groups = [(self._tcp, True), (self._unix, False)]
        for sockets, tls in groups:
            if not sockets:
                continue
            server = _InLoop(self._config(tls))
            task = asyncio.create_task(server.serve(sockets=sockets), name="http-api")
            self._servers.append((server, task))
            listening = asyncio.create_task(server.listening.wait())
            await asyncio.wait((task, listening), return_when=asyncio.FIRST_COMPLETED)
            listening.cancel()
            if task.done():
                task.result()  # raises what the start failed with
        for sock in self._tcp:
            host, port = sock.getsockname()[:2]
            log.info("HTTP API on %s://%s:%d/v1", "https" if self._tls else "http",
                     f"[{host}]" if ":" in host else host, port)
        for path in self.sockets:
            log.info("HTTP API on unix:%s (mode %o)", path, self._mode)

    async def close(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        for _, task in self._servers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in [*self._tcp, *self._unix]:
            sock.close()
        for path in self.sockets:
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()


def _http_protocol() -> type[Any]:
    """httptools when installed (uvicorn's fast parser), else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return H11Protocol
    return HttpToolsProtocol
