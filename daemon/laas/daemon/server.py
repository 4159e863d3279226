"""The daemon's server: gRPC listener, health, reflection, model loading, signals and the drain.

Layer: composition. Lifecycle, after uvicorn's serve() -> startup() -> main_loop() -> shutdown():
listen at once with health NOT_SERVING; read every model's metadata, fetch and load the models
`preload` names in the background; SERVING once the default model is ready (or, with preload = "none",
loadable on first use; registry.py keeps models resident within the memory budget). On SIGTERM or
SIGINT: NOT_SERVING, refuse new calls (UNAVAILABLE), let streams in flight finish within the grace
period, cancel what is left, close the engines, exit 0.

Under systemd (systemd.py): STATUS= says what the daemon does, READY=1 follows SERVING, STOPPING=1
starts the drain, the watchdog pings while the liveness check passes. SIGHUP rereads the model list
(reload_settings) and applies it without dropping streams in flight (ModelRegistry.reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import shlex
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from laas.core.engine import Engine
from laas.core.errors import LaasError, ModelLoadError
from laas.daemon.access import AccessInterceptor
from laas.daemon.app.calls import Lifecycle
from laas.daemon.app.runtime import Runtime
from laas.daemon.audit import AuditLog
from laas.daemon.backends.gguf import GgufEngine
from laas.daemon.backends.llama_lib import build_key, cpu_backend_in_use
from laas.daemon.gguf_header import GgufHeader
from laas.daemon.listeners import bind_all, remove_sockets
from laas.daemon.liveness import LivenessCheck
from laas.daemon.metrics import Metrics
from laas.daemon.metrics_http import serve_metrics
from laas.daemon.native_probe import WRAPPER_ENV, NativeGate
from laas.daemon.privacy import privacy_rules
from laas.daemon.registry import EngineLoader, ModelEntry, ModelRegistry
from laas.daemon.request_log import RequestLogInterceptor
from laas.daemon.security import listen_refusal, metrics_refusal, server_credentials, tokens_path
from laas.daemon.service import RuntimeService
from laas.daemon.settings import ModelConfig, Settings, SettingsError
from laas.daemon.store import ModelStore
from laas.daemon.systemd import Notifier, Watchdog
from laas.daemon.tokens import TokenStore
from laas.router.discovered import LanDiscovery
from laas.router.setup import build_router, calibrate
from laas.v1 import runtime_pb2, runtime_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = runtime_pb2.DESCRIPTOR.services_by_name["Runtime"].full_name
MAX_MESSAGE_BYTES = 4 << 20
# Settings a SIGHUP reload cannot apply to a running daemon (it applies models and default_model).
_RESTART_ONLY = ("listen", "home", "threads", "max_queue", "socket_mode", "log_format", "log_level", "remotes",
                 "aliases", *(f for f in Settings.__dataclass_fields__ if f.startswith("discovery")),
                 "tls_cert", "tls_key", "tls_client_ca", "tokens_file", "dangerously_listen_without_tls_or_tokens",
                 "audit_log", "audit_prompts", "local_only", "local_only_models", "redact_cloud", "redact_peers",
                 "redact_patterns", "max_tokens_limit", "max_streams_per_token", "parallel", "metrics_listen",
                 "keep_alive_s", "memory_budget_mb", "preload", "flash_attn")


async def load_gguf(path: Path, header: GgufHeader, config: ModelConfig, threads: int) -> Engine:
    return await GgufEngine.load(path, header, context_length=config.context_length, threads=threads,
                                 parallel=config.parallel or 1, kv_tokens=config.kv_tokens,
                                 flash_attn=config.flash_attn == "on" or (config.flash_attn in (None, "auto")
                                                                          and (config.parallel or 1) == 1))


def engine_loader(gate: NativeGate) -> EngineLoader:
    """The registry's loader: dispatches on the model's format. GGUF models load in this process only once
    the native check (a decode in a child process, once per llama.cpp build) says llama.cpp runs here;
    the first one logs which llama.cpp build and CPU backend this process runs."""
    first_gguf = True

    async def load_engine(path: Path, header: GgufHeader | None, config: ModelConfig, threads: int) -> Engine:
        if config.format == "onnx":
            from laas.daemon.backends.onnx import OnnxEngine  # deferred: onnxruntime loads only to serve ONNX

            return await OnnxEngine.load(path, context_length=config.context_length, threads=threads)
        if header is None:
            raise ModelLoadError(f"{path.name}: no GGUF header was read")
        await gate.check(path)
        engine = await load_gguf(path, header, config, threads)
        nonlocal first_gguf
        if first_gguf:
            first_gguf = False
            log.info("llama.cpp: llama-cpp-python %s, build %s, CPU backend %s, %d threads",
                     importlib.metadata.version("llama-cpp-python"), build_key(), cpu_backend_in_use(), threads)
        return engine

    return load_engine


class Server:
    def __init__(self, settings: Settings, *, notifier: Notifier | None = None, watchdog_s: float | None = None,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier(None)
        self._watchdog_s = watchdog_s
        self._reload_settings = reload_settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._sockets: list[Path] = []
        self.lifecycle = Lifecycle()
        self.native_gate = NativeGate(threads=min(settings.threads, 2),
                                      wrapper=shlex.split(os.environ.get(WRAPPER_ENV, "")))
        self.registry = ModelRegistry(settings, ModelStore(settings.store), engine_loader(self.native_gate))
        self.router = build_router(settings, self.registry)
        self.discovery = LanDiscovery(settings, self.registry, self.router)  # mDNS: advertise, find peers
        self.metrics = Metrics(self.registry, self.router)
        self.metrics_port: int | None = None
        self._metrics_http: Any = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._loading: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._audit: AuditLog | None = None
        self._tokens: TokenStore | None = None

    async def startup(self) -> int:
        """Binds the listener and starts loading models; returns the bound port."""
        access = self._access()  # raises before binding when the listen addresses would be open
        server = grpc.aio.server(interceptors=[RequestLogInterceptor(), access], options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        runtime_pb2_grpc.add_RuntimeServicer_to_server(
            RuntimeService(Runtime(self.registry, self.router, self.lifecycle, privacy_rules(self.settings),
                                   self.metrics, self.settings.keep_alive_s)), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        bound = bind_all(server, self.settings.listen_addresses, self.settings.socket_mode,
                         server_credentials(self.settings))
        self.port, self._sockets = bound.port, bound.sockets
        await server.start()
        self._grpc = server
        if self.settings.metrics_listen:
            self._start_metrics_http(self.settings.metrics_listen)
        log.info("models in %s", self.settings.store)
        self._loading = asyncio.create_task(self._load_models(), name="load-models")
        await self.discovery.browse()
        if self._watchdog_s:
            check = LivenessCheck(self.registry, self.settings.watchdog_stall_s)
            self._spawn(Watchdog(self.notifier, self._watchdog_s, check).run(), "watchdog")
        return self.port or 0

    def _access(self) -> AccessInterceptor:
        """Tokens, the audit log and the refusal to listen openly (security.py, access.py)."""
        path = tokens_path(self.settings)
        refusal = listen_refusal(self.settings, path is not None)
        if refusal:
            raise SettingsError(refusal, field="listen")
        refusal = metrics_refusal(self.settings, path is not None)
        if refusal:
            raise SettingsError(refusal, field="metrics_listen")
        # Without a token file now, <home>/tokens turns token checks on when `laasd token create` makes it.
        tokens = TokenStore(path) if path is not None else TokenStore(self.settings.home / "tokens", optional=True)
        audit_path = self.settings.home / self.settings.audit_log if self.settings.audit_log else None
        self._audit = AuditLog(audit_path, self.settings.audit_prompts)
        self._tokens = tokens
        log.info("tokens: %s; audit log: %s", path or f"off until {tokens.path} is created (loopback or unix socket "
                 "only)", audit_path or "off")
        return AccessInterceptor(tokens, self._audit, self.settings.max_streams_per_token)

    def _start_metrics_http(self, address: str) -> None:
        """Serves /metrics over HTTP (HTTPS with TLS set) in its own threads, behind the tokens (metrics_http.py)."""
        s = self.settings
        tls = (s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
        try:
            self._metrics_http = serve_metrics(address, self.metrics.prometheus, self._tokens, tls)
        except (OSError, ValueError) as e:
            raise SettingsError(f"metrics_listen {address!r}: {e}", field="metrics_listen") from e
        self.metrics_port = int(self._metrics_http.server_port)
        host = address.rpartition(":")[0] or "127.0.0.1"
        log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", host, self.metrics_port)

    def _spawn(self, coro: Coroutine[None, None, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_loading(self, entry: ModelEntry) -> None:
        self.notifier.status(f"loading model {entry.name}")

    def _serving_status(self) -> str:
        return f"serving {len(self.registry.entries())} model(s); default {self.registry.default.name}"

    async def _load_models(self) -> None:
        try:
            await self.registry.preload(self._on_loading)
        except Exception as e:  # a bug or a broken install (an ImportError in a thread): say so, do not hang
            log.exception("loading the models failed")
            self.notifier.status(f"loading the models failed: {e}")
            return
        await calibrate(self.router)
        if self.lifecycle.accepting and self.registry.default.servable:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("%s", self._serving_status())
            self.notifier.ready(self._serving_status())
            await self.discovery.advertise(self.port or 0)
        else:
            log.error("the default model %s is not available: %s", self.registry.default.name,
                      self.registry.default.error)
            self.notifier.status(f"default model {self.registry.default.name} failed: {self.registry.default.error}")

    def request_reload(self) -> None:
        """SIGHUP: reread the model list in the background (reloads run one after another)."""
        self._spawn(self._reload(), "reload")

    async def _reload(self) -> None:
        async with self._reload_lock:
            if self._loading is not None:
                await asyncio.shield(self._loading)  # the first load finishes before a reload
            if self._reload_settings is None or not self.lifecycle.accepting:
                return
            self.notifier.reloading("reloading the model list")
            try:
                new = self._reload_settings()
                unapplied = [f for f in _RESTART_ONLY if getattr(new, f) != getattr(self.settings, f)]
                if unapplied:
                    log.warning("reload: %s changed; a restart applies that", ", ".join(unapplied))
                changes = await self.registry.reload(new, self._on_loading)
            except LaasError as e:
                log.error("reload failed, the model list is unchanged: %s", e)
                self.notifier.ready(f"reload failed: {e}; {self._serving_status()}")
                return
            log.info("reloaded: added %s, changed %s, removed %s", changes["added"] or "none",
                     changes["changed"] or "none", changes["removed"] or "none")
            ready = self.registry.default.servable and self.lifecycle.accepting
            await self._set_health(health_pb2.HealthCheckResponse.SERVING if ready
                                   else health_pb2.HealthCheckResponse.NOT_SERVING)
            self.notifier.ready(self._serving_status())

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def request_stop(self) -> None:
        self._stop.set()

    async def main_loop(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Drains: refuse new calls, wait up to the grace period for streams in flight, then stop."""
        await self.discovery.aclose()  # goodbye on mDNS first: peers and clients stop choosing this daemon
        self.notifier.stopping(f"draining {self.lifecycle.in_flight} stream(s)")
        log.info("shutting down: draining %d stream(s), grace %.1fs", self.lifecycle.in_flight,
                 self.settings.drain_grace_s)
        self.lifecycle.accepting = False
        await self.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self.lifecycle.idle.wait(), self.settings.drain_grace_s)
        except TimeoutError:
            log.warning("grace period over: cancelling %d stream(s)", self.lifecycle.in_flight)
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        remove_sockets(self._sockets)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        await self.registry.aclose()
        if self._audit is not None:
            self._audit.close()
        for remote in self.router.remote.values():
            await remote.engine.aclose()
        log.info("stopped")

    async def serve(self) -> None:
        restore = _capture_signals(self.request_stop)
        restore_hup = _capture_signals(self.request_reload, (signal.SIGHUP,))
        try:
            await self.startup()
            await self.main_loop()
        finally:
            try:
                await self.shutdown()
            finally:
                restore_hup()
                restore()


def _capture_signals(on_signal: Callable[[], None],
                     signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> Callable[[], None]:
    """Routes `signals` to `on_signal`; returns a function that restores the previous handlers."""
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)

    def restore() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)

    return restore
