"""What a model format provides the daemon: where its model lives, what its file says, how it loads.

Layer: infrastructure (the seam between the model registry and the engines). A format is one module that
defines a :class:`Backend` named ``FORMAT`` and one line in ``formats.py``; the registry, the memory budget
and the server know formats only through it. ``describe`` reads metadata only (no native code runs, no
weights are read): the model's ModelInfo and the bytes it takes once loaded, known before it loads.
``load`` makes the Engine; it imports the format's native libraries itself, so they load only when a model
of that format is served.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from laas.core.engine import Engine
from laas.core.types import ModelInfo
from laas.daemon.settings import ModelConfig
from laas.daemon.store import ModelStore

if TYPE_CHECKING:
    from laas.daemon.backends.decode_loop import DecodeLoop


@dataclass(frozen=True, slots=True)
class Described:
    """A model file's metadata: what it is, the bytes it needs loaded, and the format's own parsed
    metadata (a GgufHeader, a Manifest), handed back to ``load`` so that it is not read twice."""

    info: ModelInfo
    memory_bytes: int
    metadata: object = None
    kv_bytes_per_sequence: int = 0  # what one more sequence decoded at once costs; 0: the engine does not batch


# (path, its description, the model's config with the daemon's defaults resolved, threads) -> an engine
EngineLoader = Callable[[Path, Described, ModelConfig, int], Awaitable[Engine]]


@dataclass(frozen=True, slots=True)
class Shared:
    """What the composition root owns and every engine of a process shares (and stops on shutdown)."""

    # The one thread that runs llama_decode for every GGUF engine; None: each engine runs its own.
    decode_loop: DecodeLoop | None = None
    # Where engines keep what they measured of this machine (step_costs.py); None: nothing is kept.
    cache: Path | None = None
    # The daemon's compute lock (compute_gate.py): every decode loop of its processes steps holding it.
    gate: Path | None = None


# An EngineLoader that also gets the process's shared resources.
BackendLoad = Callable[[Path, Described, ModelConfig, int, Shared], Awaitable[Engine]]


@dataclass(frozen=True, slots=True)
class Backend:
    """One model format. Every callable but ``load`` blocks (call it off the event loop)."""

    name: str  # the `format` value in [[models]]
    # The model's path in the store (a file or a folder); raises NotFound when it is not there.
    locate: Callable[[ModelStore, ModelConfig], Path]
    # Reads the metadata; raises ModelLoadError for a file that may not reach native code.
    describe: Callable[[Path, ModelConfig], Described]
    load: BackendLoad
    # Checks the file before it loads (a configured digest); None: nothing beyond describe.
    verify: Callable[[Path, ModelConfig], None] | None = None
    # The native library must pass the daemon's native check (a decode in a child process) first.
    native_check: bool = False
    # A line for the log at the first load in this process (which native build runs); None: none.
    runtime: Callable[[int], str] | None = None


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What a batching engine (gguf.py) is doing now, and has done (counters since load). Here, not with the
    engine, so that a runner's report of it unpickles in the daemon without importing the engine."""

    parallel: int
    active: int
    waiting: int
    kv_cells: int
    kv_used: int
    steps: int
    prefix_hits: int
    prefix_cached_tokens: int
    prompt_tokens: int
    decoded_tokens: int
    draft_tokens: int = 0  # drafted by prompt lookup and decoded to be verified
    draft_accepted: int = 0  # of those, the tokens the model produced itself (kept)
