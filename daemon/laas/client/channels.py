"""Opening a channel to laasd: plaintext (loopback, unix socket) or TLS (optionally mutual), with a token.

Layer: edge (client). The token travels as `authorization: Bearer <token>` metadata on every call,
added by a client interceptor so that no call can forget it. gRPC refuses call credentials on a
plaintext channel to a non-local address, so the token is sent as plain metadata either way;
over a network, use TLS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True, slots=True)
class Tls:
    """TLS settings of a client: the CA that signed the daemon's certificate (None: the system's roots),
    and a client certificate and key for mutual TLS. Values are PEM bytes or paths to PEM files."""

    ca: bytes | str | Path | None = None
    cert: bytes | str | Path | None = None
    key: bytes | str | Path | None = None
    server_name: str | None = None  # the name to check in the daemon's certificate, when not the target's host

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(_pem(self.ca), _pem(self.key), _pem(self.cert))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


def _with_token(token: str, metadata: Any) -> list[tuple[str, str]]:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


class _Sync(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: Any) -> Any:
        return _Details(details.method, details.timeout, _with_token(self._token, details.metadata),
                        details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, method: str, timeout: float | None, metadata: Any, credentials: Any,
                 wait_for_ready: Any, compression: Any) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def _aio_details(token: str, details: Any) -> Any:
    metadata = grpc.aio.Metadata(*_with_token(token, details.metadata))  # aio wants Metadata, not a list
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


# grpc.aio files each interceptor under one kind only (the first it is an instance of): one class per kind.
class _AsyncUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_aio_details(self._token, details), request)


class _AsyncStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_aio_details(self._token, details), request)


def open_channel(target: str, tls: Tls | None = None, token: str | None = None) -> grpc.Channel:
    channel = grpc.secure_channel(target, tls.credentials(), tls.options()) if tls is not None \
        else grpc.insecure_channel(target)
    return grpc.intercept_channel(channel, _Sync(token)) if token else channel


def open_aio_channel(target: str, tls: Tls | None = None, token: str | None = None) -> grpc.aio.Channel:
    interceptors = [_AsyncUnary(token), _AsyncStream(token)] if token else None
    if tls is not None:
        return grpc.aio.secure_channel(target, tls.credentials(), tls.options(), interceptors=interceptors)
    return grpc.aio.insecure_channel(target, interceptors=interceptors)
