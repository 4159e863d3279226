"""The router and model residency: a model that is not loaded stays a candidate, its load time counted."""

from __future__ import annotations

import time
from pathlib import Path

from laas.core.types import ModelFormat, ModelInfo, SamplingParams
from laas.daemon.local_target import LocalModels, LocalTarget
from laas.daemon.model_entry import ModelState
from laas.daemon.registry import ModelRegistry
from laas.daemon.settings import Settings
from laas.daemon.store import ModelStore
from laas.router.targets import Admitted, RoutedRequest
from tests.unit.test_liveness import StubEngine

TEN = Admitted(RoutedRequest(SamplingParams(max_tokens=10), prompt="hi"), 10, 16)  # 10 tokens in, 10 out


def _target(tmp_path: Path) -> LocalTarget:
    settings = Settings(home=tmp_path)
    registry = ModelRegistry(settings, ModelStore(settings.store), None)  # type: ignore[arg-type]
    return LocalModels(registry, time.monotonic).targets()[settings.default_model]


def test_a_model_not_loaded_is_eligible_and_its_load_time_is_predicted(tmp_path: Path) -> None:
    target = _target(tmp_path)
    entry = target.entry
    residency = entry.residency
    residency.described(ModelInfo(ModelFormat.GGUF, "Q4_1", 4096, 8192, 400_000_000, "llama"))
    not_loaded = target.estimate(TEN)
    assert not_loaded.available and not not_loaded.unavailable_reason
    assert target.load_ms() == 200.0 + 1000.0  # never loaded: guessed from the size
    residency.start_loading()  # loaded in 350 ms, then unloaded: the last load's time is the guess
    residency.loaded(StubEngine(), load_ms=350.0)
    residency.unloaded()
    assert target.estimate(TEN).predicted_ms == not_loaded.predicted_ms - 1200.0 + 350.0
    residency.start_loading()
    residency.loaded(StubEngine(), load_ms=350.0)
    assert entry.state is ModelState.READY
    assert target.load_ms() == 0.0
    assert target.estimate(TEN).predicted_ms == not_loaded.predicted_ms - 1200.0


def test_a_failed_or_fetching_model_is_not_a_candidate(tmp_path: Path) -> None:
    target = _target(tmp_path)
    residency = target.entry.residency
    residency.start_loading()
    residency.fetching(True)
    fetching = target.estimate(TEN)
    assert not fetching.available and fetching.unavailable_reason == "model is loading"
    residency.fetching(False)
    residency.failed("the file is broken")
    failed = target.estimate(TEN)
    assert not failed.available and failed.unavailable_reason == "model is failed"
