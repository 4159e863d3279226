"""What a decode step costs by its tokens on this machine (speculation.StepCost), kept from one load to the next.

Layer: infrastructure. Speculation plans with that curve, and timing it at load is 25 decodes of up to 49
tokens: about a second on the default model, most of its cold load. So the curve is kept in a file in the
daemon's home (`cache/step-costs.json`), under a key of everything it depends on: the model file (name, size,
modification time), the context's settings, the llama.cpp build in use (its libraries, the CPU features it
runs with) and the CPU. A later load with the same key times only a one-token step, and keeps the curve
where that agrees with the kept one within KEEP_TOLERANCE; otherwise (a slower host now, a CPU of another
speed behind the same name) it times the whole curve again and keeps that. A missing, unreadable or corrupt
file is a cache miss, never an error: the curve is timed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from laas.daemon.backends.speculation import StepCost
from laas.daemon.native_build import this_machine

log = logging.getLogger(__name__)

FILE = "step-costs.json"
KEEP_TOLERANCE = 0.25  # a one-token step timed now may differ this much from the kept one's
MAX_ENTRIES = 64  # curves kept; the oldest go first


def step_cost_key(model: Path, settings: dict[str, Any], library: dict[str, Any]) -> str:
    """The key of a model's curve: its file, the context's `settings` and the `library` in use (llama_lib)."""
    st = model.stat()
    machine, _, cpu = this_machine()
    identity = {"model": [model.name, st.st_size, st.st_mtime_ns], "settings": settings, "library": library,
                "cpu": [machine, cpu], "cpus": os.cpu_count()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


class StepCosts:
    """The kept curves of one daemon home (`directory` is its cache folder)."""

    def __init__(self, directory: Path) -> None:
        self._file = directory / FILE

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self._file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> StepCost | None:
        entry = self._read().get(key)
        try:
            return StepCost([(int(n), float(s)) for n, s in entry["points"]])  # type: ignore[index]
        except (TypeError, KeyError, ValueError):  # none kept (None), or not what put() writes
            return None

    def put(self, key: str, cost: StepCost) -> None:
        """Keeps `cost` under `key` (atomically: a reader sees the old file or the new one); a home that
        cannot be written keeps nothing, and says so."""
        data = self._read()
        data.pop(key, None)
        data[key] = {"points": cost.points()}
        while len(data) > MAX_ENTRIES:
            data.pop(next(iter(data)))
        tmp: str | None = None
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self._file.parent, prefix=".step-costs-", delete=False) as f:
                tmp = f.name
                json.dump(data, f)
            os.replace(tmp, self._file)
        except OSError as e:
            log.warning("could not keep the step costs in %s: %s", self._file, e)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def kept_or_timed(time_steps: Callable[[tuple[int, ...]], StepCost], sizes: tuple[int, ...],
                  costs: StepCosts | None, key: str) -> tuple[StepCost, bool]:
    """The curve over `sizes`: the kept one where a one-token step timed now agrees with it, else timed with
    `time_steps(sizes)` (and kept). Returns it and whether it was the kept one."""
    kept = costs.get(key) if costs is not None else None
    if kept is not None:
        now = time_steps((1,)).seconds
        if abs(now / kept.seconds - 1.0) <= KEEP_TOLERANCE:
            return kept, True
        log.info("a one-token step takes %.1f ms now, %.1f ms when its curve was kept: timing it again",
                 now * 1000, kept.seconds * 1000)
    cost = time_steps(sizes)
    if costs is not None:
        costs.put(key, cost)
    return cost, False
