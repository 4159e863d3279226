"""The daemon's server: gRPC listener, health, reflection, model loading, signals and the drain.

Layer: composition. Lifecycle, after uvicorn's serve() -> startup() -> main_loop() -> shutdown():
listen at once with health NOT_SERVING; fetch and load the models in the background; SERVING once
the default model is ready. On SIGTERM or SIGINT: NOT_SERVING, refuse new calls (UNAVAILABLE), let
streams in flight finish within the grace period, cancel what is left, close the engines, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from laas.daemon.backends.gguf import GgufEngine
from laas.daemon.engine import Engine
from laas.daemon.errors import ModelLoadError
from laas.daemon.gguf_header import GgufHeader
from laas.daemon.registry import ModelRegistry
from laas.daemon.service import Lifecycle, RuntimeService
from laas.daemon.settings import ModelConfig, Settings
from laas.daemon.store import ModelStore
from laas.v1 import runtime_pb2, runtime_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = runtime_pb2.DESCRIPTOR.services_by_name["Runtime"].full_name
MAX_MESSAGE_BYTES = 4 << 20


async def load_gguf(path: Path, header: GgufHeader, config: ModelConfig, threads: int) -> Engine:
    return await GgufEngine.load(path, header, context_length=config.context_length, threads=threads)


async def load_engine(path: Path, header: GgufHeader | None, config: ModelConfig, threads: int) -> Engine:
    """The registry's loader: dispatches on the model's format."""
    if config.format == "onnx":
        from laas.daemon.backends.onnx import OnnxEngine  # deferred: onnxruntime loads only to serve ONNX

        return await OnnxEngine.load(path, context_length=config.context_length, threads=threads)
    if header is None:
        raise ModelLoadError(f"{path.name}: no GGUF header was read")
    return await load_gguf(path, header, config, threads)


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lifecycle = Lifecycle()
        self.registry = ModelRegistry(settings, ModelStore(settings.store), load_engine)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._loading: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def startup(self) -> int:
        """Binds the listener and starts loading models; returns the bound port."""
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        runtime_pb2_grpc.add_RuntimeServicer_to_server(
            RuntimeService(self.registry, self.lifecycle, self.settings.default_max_tokens), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = server.add_insecure_port(self.settings.listen)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {self.settings.listen}: {e}") from e
        await server.start()
        self._grpc = server
        log.info("listening on %s (port %d); models in %s", self.settings.listen, self.port, self.settings.store)
        self._loading = asyncio.create_task(self._load_models(), name="load-models")
        return self.port

    async def _load_models(self) -> None:
        await self.registry.load_all()
        if self.lifecycle.accepting and self.registry.default.engine is not None:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("serving %d model(s); default %s", len(self.registry.entries()), self.registry.default.name)
        else:
            log.error("the default model %s is not available: %s", self.registry.default.name,
                      self.registry.default.error)

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def request_stop(self) -> None:
        self._stop.set()

    async def main_loop(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Drains: refuse new calls, wait up to the grace period for streams in flight, then stop."""
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
        await self.registry.aclose()
        log.info("stopped")

    async def serve(self) -> None:
        restore = _capture_signals(self.request_stop)
        try:
            await self.startup()
            await self.main_loop()
        finally:
            try:
                await self.shutdown()
            finally:
                restore()


def _capture_signals(on_signal: Callable[[], None]) -> Callable[[], None]:
    """Routes SIGTERM/SIGINT to `on_signal`; returns a function that restores the previous handlers."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)

    def restore() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)

    return restore
