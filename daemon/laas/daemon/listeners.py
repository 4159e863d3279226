"""Binding the gRPC server to its listen addresses: host:port (TCP) and unix:/path (a Unix socket).

Layer: infrastructure. A Unix socket's file permissions are its access control: the socket is created
under a umask that already yields `socket_mode` (no moment where it is more open), then chmod-ed to
exactly that mode, so only the daemon's user and group (with 0660) may connect. The directory that
holds it (systemd's RuntimeDirectory=) should not be world-writable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


@dataclass
class Bound:
    port: int | None = None  # the first TCP port bound (the one tests and logs care about)
    sockets: list[Path] = field(default_factory=list)


def unix_path(address: str) -> Path | None:
    """The socket path of a `unix:` address (unix:/p, unix:///p or unix:relative), else None."""
    if not address.startswith("unix:"):
        return None
    path = address.removeprefix("unix:")
    return Path("/" + path.lstrip("/") if path.startswith("//") else path)


def bind_all(server: grpc.aio.Server, addresses: tuple[str, ...], socket_mode: str,
             tls: grpc.ServerCredentials | None = None) -> Bound:
    """Binds every address; TCP ones use TLS when `tls` is given (unix sockets rely on file permissions)."""
    bound = Bound()
    for address in addresses:
        path = unix_path(address)
        if path is None:
            port = _add(server, address, tls)
            log.info("listening on %s (port %d)%s", address, port, " with TLS" if tls else "")
            bound.port = port if bound.port is None else bound.port
        else:
            _bind_unix(server, path, int(socket_mode, 8))
            bound.sockets.append(path)
            log.info("listening on unix:%s (mode %s)", path, socket_mode)
    return bound


def _add(server: grpc.aio.Server, address: str, tls: grpc.ServerCredentials | None = None) -> int:
    try:
        port: int = server.add_secure_port(address, tls) if tls else server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address}: {e}") from e
    return port


def _bind_unix(server: grpc.aio.Server, path: Path, mode: int) -> None:
    if path.is_socket():  # left behind by a daemon that did not stop cleanly
        path.unlink()
    elif path.exists():
        raise OSError(f"cannot listen on unix:{path}: a file that is not a socket is there")
    old = os.umask(0o777 & ~mode)
    try:
        _add(server, f"unix:{path}")
    finally:
        os.umask(old)
    os.chmod(path, mode)


def remove_sockets(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
