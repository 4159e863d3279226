"""The model formats the daemon serves: one line per format.

Layer: infrastructure (the backend registry). A new format is one module that defines ``FORMAT`` (a
Backend: locate, describe, load; see backend.py) plus its line in ``FORMATS``; nothing else in the daemon
names a format. The engine loader the server hands the model registry dispatches on a model's format,
runs the native check first where the format asks for it, and logs each format's runtime once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from laas.core.engine import Engine
from laas.core.errors import NotFound
from laas.daemon.backends import gguf_format, onnx_format
from laas.daemon.backends.backend import Backend, Described, EngineLoader
from laas.daemon.settings import ModelConfig

log = logging.getLogger(__name__)

FORMATS: dict[str, Backend] = {"gguf": gguf_format.FORMAT, "onnx": onnx_format.FORMAT}


def backend_for(config: ModelConfig) -> Backend:
    try:
        return FORMATS[config.format]
    except KeyError:
        raise NotFound(f"models.{config.name}.format: {config.format!r} is not supported "
                       f"({', '.join(FORMATS)})", field=f"models.{config.name}.format") from None


class NativeCheck(Protocol):
    async def check(self, model: Path) -> None:
        """Returns when the native library runs on this machine; raises ModelLoadError if not."""


def engine_loader(native: NativeCheck) -> EngineLoader:
    """The model registry's loader: the model's format loads it, once `native` passed where it must."""
    logged: set[str] = set()

    async def load_engine(path: Path, described: Described, config: ModelConfig, threads: int) -> Engine:
        backend = backend_for(config)
        if backend.native_check:
            await native.check(path)
        engine = await backend.load(path, described, config, threads)
        if backend.runtime is not None and backend.name not in logged:
            logged.add(backend.name)
            log.info("%s", backend.runtime(threads))
        return engine

    return load_engine
