"""Finding a model's backend, and the engine loader the server hands the model registry.

Layer: infrastructure. The backend of a format is the ``FORMAT`` of the module formats.py names for it
(imported when first asked for). The loader dispatches on a model's format, runs the native check first
where the format asks for it, and logs each format's runtime once.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Protocol

from laas.core.engine import Engine
from laas.core.errors import NotFound
from laas.daemon.backends.backend import Backend, Described, EngineLoader, Shared
from laas.daemon.backends.formats import FORMATS
from laas.daemon.settings import ModelConfig

log = logging.getLogger(__name__)

def backend_for(config: ModelConfig) -> Backend:
    module = FORMATS.get(config.format)
    if module is None:
        raise NotFound(f"models.{config.name}.format: {config.format!r} is not supported "
                       f"({', '.join(FORMATS)})", field=f"models.{config.name}.format")
    backend: Backend = importlib.import_module(module).FORMAT
    return backend


class NativeCheck(Protocol):
    async def check(self, model: Path) -> None:
        """Returns when the native library runs on this machine; raises ModelLoadError if not."""


def engine_loader(native: NativeCheck, shared: Shared | None = None, *, runners: bool = False) -> EngineLoader:
    """The model registry's loader: the model's format loads it, once `native` passed where it must, with
    the process's `shared` resources (the composition root's decode thread). With `runners`, each model
    loads in a runner process of its own (runners/engine.py; engine_isolation = "runner"), so that a native
    crash takes down that model only."""
    shared = shared or Shared()
    logged: set[str] = set()

    async def load_engine(path: Path, described: Described, config: ModelConfig, threads: int) -> Engine:
        backend = backend_for(config)
        if backend.native_check:
            await native.check(path)
        if runners:
            from laas.daemon.runners.engine import RunnerEngine  # its runtime line comes from the runner

            return await RunnerEngine.start(config.name, path, described, config, threads, cache=shared.cache,
                                           gate=shared.gate)
        engine = await backend.load(path, described, config, threads, shared)
        if backend.runtime is not None and backend.name not in logged:
            logged.add(backend.name)
            log.info("%s", backend.runtime(threads))
        return engine

    return load_engine
