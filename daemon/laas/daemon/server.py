"""The daemon's server: gRPC listener, health, reflection, model loading, signals and the drain.

Layer: composition. Lifecycle, after uvicorn's serve() -> startup() -> main_loop() -> shutdown():
listen at once with health NOT_SERVING; read every model's metadata, fetch and load the models
`preload` names in the background; SERVING once the default model is ready (or, with preload = "none",
loadable on first use; registry.py keeps models resident within the memory budget). On SIGTERM or
SIGINT: NOT_SERVING, refuse new calls (UNAVAILABLE), let streams in flight finish within the grace
period, cancel what is left, close the engines, exit 0.

Teardown is an exit stack: every resource goes on it as it is acquired (the decode thread, the remote
targets, the registry, the audit log, background tasks, the metrics endpoint, the HTTP API, sockets, the
gRPC server, the drain, mDNS) and shutdown() closes them in reverse: goodbye on mDNS, refuse new calls and
drain within `drain_grace_s` (gRPC and HTTP streams alike), stop gRPC and HTTP, then the rest. A step that
fails is logged and the steps after it still run.

Under systemd (systemd.py): STATUS= says what the daemon does, READY=1 follows SERVING, STOPPING=1
starts the drain, the watchdog pings while the liveness check passes. SIGHUP rereads the model list
(reload_settings) and applies it without dropping streams in flight (ModelRegistry.reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable, Coroutine

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from laas.core.errors import LaasError
from laas.daemon.access import AccessInterceptor, StreamSlots
from laas.daemon.app.calls import Lifecycle
from laas.daemon.app.runtime import Runtime
from laas.daemon.audit import AuditLog
from laas.daemon.backends.backend import Shared
from laas.daemon.backends.compute_gate import FILE as COMPUTE_LOCK
from laas.daemon.backends.decode_loop import DecodeLoop
from laas.daemon.backends.loader import engine_loader
from laas.daemon.lan_peers import LanDiscovery
from laas.daemon.listeners import bind_all, remove_sockets
from laas.daemon.liveness import LivenessCheck
from laas.daemon.local_target import LocalModels
from laas.daemon.metrics import Metrics
from laas.daemon.metrics_http import MetricsServer, serve_metrics
from laas.daemon.native_probe import WRAPPER_ENV, NativeGate
from laas.daemon.privacy import privacy_rules
from laas.daemon.registry import ModelEntry, ModelRegistry
from laas.daemon.request_log import RequestLogInterceptor
from laas.daemon.routing import build_router, calibrate
from laas.daemon.security import listen_refusal, metrics_refusal, server_credentials, tokens_path
from laas.daemon.service import RuntimeService
from laas.daemon.settings import Settings, SettingsError, reloaded
from laas.daemon.store import ModelStore
from laas.daemon.systemd import Notifier, Watchdog
from laas.daemon.tokens import TokenStore
from laas.v1 import runtime_pb2, runtime_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = runtime_pb2.DESCRIPTOR.services_by_name["Runtime"].full_name
MAX_MESSAGE_BYTES = 4 << 20


class Server:
    def __init__(self, settings: Settings, *, notifier: Notifier | None = None, watchdog_s: float | None = None,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier(None)
        self._watchdog_s = watchdog_s
        self._liveness: LivenessCheck | None = None  # with the watchdog on
        self._reload_settings = reload_settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._exit = contextlib.AsyncExitStack()  # what the server holds; shutdown() closes it in reverse
        self.lifecycle = Lifecycle()
        self.native_gate = NativeGate(threads=min(settings.threads, 2),
                                      wrapper=shlex.split(os.environ.get(WRAPPER_ENV, "")))
        gate = settings.home / COMPUTE_LOCK  # models in runners of their own compute in turns (compute_gate.py)
        self.decode_loop = DecodeLoop(gate)  # the one llama.cpp decode thread of every GGUF engine (batching.py)
        self._on_exit("the decode thread", lambda: asyncio.to_thread(self.decode_loop.stop))
        # engine_isolation = "runner": each model in a process of its own (runners/), with its own decode thread.
        shared = Shared(self.decode_loop, cache=settings.home / "cache", gate=gate)  # what engines measured: cache
        self.registry = ModelRegistry(settings, ModelStore(settings.store),
                                      engine_loader(self.native_gate, shared,
                                                    runners=settings.engine_isolation == "runner"))
        self.local_models = LocalModels(self.registry, time.monotonic)
        self.router = build_router(settings, self.registry, self.local_models)
        self._on_exit("the remote targets", self._close_remotes)
        self._on_exit("the models", self.registry.aclose)
        self.discovery = LanDiscovery(settings, self.registry, self.router, self.local_models)  # mDNS
        self.metrics = Metrics(self.registry, self.router)
        self.metrics_port: int | None = None
        self.http_ports: list[int] = []
        self._slots = StreamSlots(settings.max_streams_per_token)
        self._metrics_http: MetricsServer | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._loading: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._audit: AuditLog | None = None
        self._tokens: TokenStore | None = None

    async def startup(self) -> int:
        """Binds the listener and starts loading models; returns the bound port. What it acquires goes on
        the exit stack at once, so shutdown() also closes what a start-up that failed half way holds."""
        access = self._access()  # raises before binding when the listen addresses would be open
        self._on_exit("the background tasks", self._cancel_tasks)  # loading, watchdog, reloads
        if self.settings.metrics_listen:  # before gRPC: a bad address fails the start before it listens
            self._start_metrics_http(self.settings.metrics_listen)
        runtime = Runtime(self.registry, self.router, self.lifecycle, privacy_rules(self.settings), self.metrics,
                          self.settings.keep_alive_s)
        if self.settings.http_listen:  # before gRPC too: a bad address fails the start before it listens
            await self._start_http(runtime)
        server = grpc.aio.server(interceptors=[RequestLogInterceptor(), access], options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        runtime_pb2_grpc.add_RuntimeServicer_to_server(RuntimeService(runtime), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        bound = bind_all(server, self.settings.listen_addresses, self.settings.socket_mode,
                         server_credentials(self.settings))
        self.port = bound.port
        self._on_exit("the unix sockets", lambda: remove_sockets(bound.sockets))
        await server.start()
        self._grpc = server
        self._on_exit("the gRPC server", lambda: server.stop(grace=0.5))  # cancels the streams left
        self._on_exit("the drain", self._drain)
        log.info("models in %s", self.settings.store)
        self._loading = asyncio.create_task(self._load_models(), name="load-models")
        self._on_exit("mDNS", self.discovery.aclose)  # first down: the goodbye, before the drain
        await self.discovery.browse()
        if self._watchdog_s:
            self._liveness = LivenessCheck(self.registry, self.settings.watchdog_stall_s)
            self._spawn(Watchdog(self.notifier, self._watchdog_s, self._liveness).run(), "watchdog")
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
        self._on_exit("the audit log", self._audit.close)
        self._tokens = tokens
        self._slots = StreamSlots(self.settings.max_streams_per_token)  # one per token, whichever the edge
        log.info("tokens: %s; audit log: %s", path or f"off until {tokens.path} is created (loopback or unix socket "
                 "only)", audit_path or "off")
        return AccessInterceptor(tokens, self._audit, self.settings.max_streams_per_token, self._slots)

    async def _start_http(self, runtime: Runtime) -> None:
        """The OpenAI-compatible HTTP API (http/): the same use cases, tokens, stream slots and audit log."""
        from laas.daemon.http.app import create_app  # deferred: FastAPI loads only when HTTP is on
        from laas.daemon.http.auth import Gate
        from laas.daemon.http.serving import HttpServer

        s = self.settings
        assert self._audit is not None
        app = create_app(runtime, Gate(self._tokens, self._audit, self._slots))
        tls = (s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
        http = HttpServer(app, s.http_listen, s.socket_mode, tls)
        self._on_exit("the HTTP API", http.close)  # after the drain: cancels the responses left
        try:
            http.bind()
        except OSError as e:
            raise SettingsError(str(e), field="http_listen") from e
        await http.start()
        self.http_ports = http.ports

    def _start_metrics_http(self, address: str) -> None:
        """Serves /metrics over HTTP (HTTPS with TLS set) in its own threads, behind the tokens (metrics_http.py)."""
        s = self.settings
        tls = (s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
        try:
            httpd = self._metrics_http = serve_metrics(address, self.metrics.prometheus, self._tokens, tls)
        except (OSError, ValueError) as e:
            raise SettingsError(f"metrics_listen {address!r}: {e}", field="metrics_listen") from e
        self._on_exit("the metrics endpoint", lambda: asyncio.to_thread(httpd.close))
        self.metrics_port = int(httpd.server_port)
        host = address.rpartition(":")[0] or "127.0.0.1"
        log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", host, self.metrics_port)

    def _on_exit(self, what: str, close: Callable[[], object]) -> None:
        """Puts `close` (a function; what it returns is awaited when awaitable) on the exit stack. When it
        raises, shutdown() logs that and goes on with the next step: one broken resource does not keep the
        others (the engines, the sockets) open."""

        async def step() -> None:
            try:
                done = close()
                if inspect.isawaitable(done):
                    await done
            except Exception:
                log.exception("shutdown: closing %s failed", what)

        self._exit.push_async_callback(step)

    async def _cancel_tasks(self) -> None:
        tasks = [*self._tasks, *([self._loading] if self._loading is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close_remotes(self) -> None:
        for remote in list(self.router.remote.values()):
            try:
                await remote.aclose()
            except Exception:
                log.exception("shutdown: closing remote %s failed", remote.name)

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
        await calibrate(self.local_models)
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
                # The fields' reload marks (settings_models.py) say what is applied and what needs a restart.
                in_force, unapplied = reloaded(self.settings, self._reload_settings())
                if unapplied:
                    log.warning("reload: %s changed; a restart applies that", ", ".join(unapplied))
                changes = await self.registry.reload(in_force, self._on_loading)
                self.settings = in_force  # e.g. drain_grace_s, read at shutdown
                self.router.default_max_tokens = in_force.default_max_tokens
                if self._liveness is not None:
                    self._liveness.stall_s = in_force.watchdog_stall_s
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

    async def _drain(self) -> None:
        """Refuses new calls, then waits up to the grace period for the streams in flight (stopping gRPC,
        the next step down, cancels those left)."""
        self.notifier.stopping(f"draining {self.lifecycle.in_flight} stream(s)")
        log.info("shutting down: draining %d stream(s), grace %.1fs", self.lifecycle.in_flight,
                 self.settings.drain_grace_s)
        self.lifecycle.accepting = False
        await self.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self.lifecycle.idle.wait(), self.settings.drain_grace_s)
        except TimeoutError:
            log.warning("grace period over: cancelling %d stream(s)", self.lifecycle.in_flight)

    async def shutdown(self) -> None:
        """Closes everything in reverse order of acquiring it: goodbye on mDNS (peers and clients stop
        choosing this daemon), the drain, gRPC, the unix sockets, the metrics endpoint, the background
        tasks, the audit log, the models, the remote targets, the decode thread."""
        await self._exit.aclose()
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
