"""Step costs kept across loads (step_costs.py): what the key depends on, a round trip, a corrupt or
unwritable cache, and when a kept curve is used or timed again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from laas.daemon.backends.speculation import StepCost
from laas.daemon.backends.step_costs import FILE, MAX_ENTRIES, StepCosts, kept_or_timed, step_cost_key

pytestmark = pytest.mark.fast

CURVE = StepCost([(1, 0.010), (2, 0.015), (9, 0.040)])


def test_the_key_follows_the_file_the_settings_and_the_library(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    key = step_cost_key(model, {"threads": 2}, {"build": [["libllama.so", 1, 2]]})
    assert key == step_cost_key(model, {"threads": 2}, {"build": [["libllama.so", 1, 2]]})
    assert key != step_cost_key(model, {"threads": 4}, {"build": [["libllama.so", 1, 2]]})
    assert key != step_cost_key(model, {"threads": 2}, {"build": [["libllama.so", 1, 3]]})
    os.utime(model, ns=(1, 1))  # the same name and size, rewritten: another model as far as the key knows
    assert key != step_cost_key(model, {"threads": 2}, {"build": [["libllama.so", 1, 2]]})


def test_a_curve_comes_back_as_it_was_kept(tmp_path: Path) -> None:
    costs = StepCosts(tmp_path / "cache")  # made when first written
    assert costs.get("k") is None
    costs.put("k", CURVE)
    back = costs.get("k")
    assert back is not None and back.points() == CURVE.points() and back(5) == CURVE(5)
    for i in range(MAX_ENTRIES + 3):  # the oldest go first
        costs.put(f"other{i}", CURVE)
    assert costs.get("k") is None and costs.get(f"other{MAX_ENTRIES + 2}") is not None


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", '{"k": {"points": [["x", 1]]}}', '{"k": 3}',
                                  '{"k": {"points": [[2, 0.1]]}}'])
def test_a_corrupt_cache_is_a_miss(tmp_path: Path, text: str) -> None:
    (tmp_path / FILE).write_text(text)
    assert StepCosts(tmp_path).get("k") is None
    StepCosts(tmp_path).put("k", CURVE)  # and is replaced by a good one
    assert StepCosts(tmp_path).get("k") is not None


def test_an_unwritable_cache_keeps_nothing_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    StepCosts(blocked / "cache").put("k", CURVE)  # its folder cannot be made under a file
    assert "could not keep the step costs" in caplog.text
    assert StepCosts(blocked / "cache").get("k") is None


class Timer:
    """Times steps as a machine whose one-token step takes `one` seconds; records what it was asked."""

    def __init__(self, one: float) -> None:
        self.one = one
        self.asked: list[tuple[int, ...]] = []

    def __call__(self, sizes: tuple[int, ...]) -> StepCost:
        self.asked.append(sizes)
        return StepCost([(n, self.one * (1 + 0.5 * (n - 1))) for n in sizes])


def test_a_kept_curve_is_used_while_a_one_token_step_agrees_and_timed_again_when_not(tmp_path: Path) -> None:
    costs, sizes = StepCosts(tmp_path), (1, 2, 9)
    timer = Timer(0.010)
    cost, kept = kept_or_timed(timer, sizes, costs, "k")
    assert not kept and timer.asked == [sizes] and costs.get("k") is not None
    timer = Timer(0.011)  # 10% slower now: within the tolerance
    cost2, kept = kept_or_timed(timer, sizes, costs, "k")
    assert kept and timer.asked == [(1,)] and cost2.points() == cost.points()
    timer = Timer(0.020)  # twice as slow: timed again, and that is kept
    cost3, kept = kept_or_timed(timer, sizes, costs, "k")
    assert not kept and timer.asked == [(1,), sizes] and cost3.seconds == 0.020
    kept_cost = costs.get("k")
    assert kept_cost is not None and kept_cost.seconds == 0.020
    timer = Timer(0.010)
    assert kept_or_timed(timer, sizes, None, "k")[1] is False and timer.asked == [sizes]  # no cache: timed
