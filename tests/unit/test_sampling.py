"""The numpy sampler: llama.cpp's parameters, in llama.cpp's order."""

from __future__ import annotations

import numpy as np

from laas.core.types import SamplingParams
from laas.daemon.sampling import Sampler


def _logits(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_temperature_zero_is_argmax() -> None:
    assert Sampler(SamplingParams(temperature=0.0)).sample(_logits(0.1, 3.0, 2.9, -1.0)) == 1


def test_top_k_one_is_greedy_whatever_the_temperature() -> None:
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=1))
    assert {sampler.sample(_logits(0.0, 1.0, 0.5)) for _ in range(50)} == {1}


def test_seed_makes_draws_repeatable_and_different_seeds_differ() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a = [Sampler(params).sample(logits) for _ in range(5)]
    draws = Sampler(params)
    b = [draws.sample(logits) for _ in range(20)]
    assert a == [a[0]] * 5  # a fresh sampler with the same seed draws the same first token
    assert b[0] == a[0] and len(set(b)) > 10
    other = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43))
    assert [other.sample(logits) for _ in range(20)] != b


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # probabilities about 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two only
    logits = np.log(np.array([0.64, 0.24, 0.09, 0.03], dtype=np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, seed=3))
    assert {sampler.sample(logits) for _ in range(300)} == {0, 1}


def test_min_p_drops_tokens_far_below_the_best() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25, seed=3))
    assert {sampler.sample(logits) for _ in range(300)} == {0, 1, 2}  # 0.05 < 0.25 * 0.5


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0), context=[0])
    assert sampler.sample(_logits(3.0, 2.0)) == 1  # 3.0 / 2 < 2.0
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0), context=[1])
    assert sampler.sample(_logits(-1.5, -1.0)) == 0  # -1.0 * 2 < -1.5


def test_presence_and_frequency_penalties_count_recent_tokens() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.4), context=[0, 0, 0])
    assert sampler.sample(_logits(2.0, 1.0)) == 1  # 2.0 - 3 * 0.4 = 0.8
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=0.5), context=[0, 0, 0])
    assert sampler.sample(_logits(2.0, 1.0)) == 0  # 2.0 - 0.5 = 1.5: presence counts once
    sampler.accept(1)
    assert sampler.sample(_logits(2.0, 1.8)) == 0  # both penalised once now


def test_penalties_only_see_the_last_tokens() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=10.0), context=[0], penalty_last_n=2)
    sampler.accept(2)
    sampler.accept(2)  # token 0 has left the window
    assert sampler.sample(_logits(3.0, 2.0, 0.0)) == 0
