"""Prompt lookup: drafts from the longest n-gram seen before, acceptance by position, a step's cost curve,
the plan of what pays in a step."""

from __future__ import annotations

import itertools
import random

import pytest

from laas.daemon.backends.speculation import (
    MAX_NGRAM,
    MIN_NGRAM,
    PRIOR_ACCEPTANCE,
    PRIOR_MARGINAL,
    NgramDrafter,
    StepCost,
    draft_model_can_pay,
    plan_drafts,
    relative_to,
    split_cost,
)


def reference_draft(tokens: list[int], limit: int) -> list[int]:
    """By brute force: the tokens after the latest earlier occurrence of the longest n-gram ending `tokens`."""
    for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
        if len(tokens) < n:
            continue
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # an occurrence followed by at least one token
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + limit]
    return []


def test_a_passage_being_copied_drafts_its_continuation() -> None:
    passage = [10, 11, 12, 13, 14, 15, 16, 17]
    d = NgramDrafter([1, 2, *passage, 3, 4], max_draft=4)
    d.extend([12, 13])  # the output starts copying the passage
    assert d.draft(room=10) == [14, 15, 16, 17]  # max_draft
    assert d.draft(room=2) == [14, 15]
    assert d.draft(room=0) == []


def test_the_longest_ngram_wins_over_a_shorter_later_one() -> None:
    # [5, 6] last occurred before 9, but [4, 5, 6] occurred before 7: the 3-gram decides
    d = NgramDrafter([4, 5, 6, 7, 8, 0, 5, 6, 9, 4], max_draft=2)
    d.extend([5, 6])
    assert d.draft(room=5) == [7, 8]


def test_no_match_and_single_tokens_draft_nothing() -> None:
    d = NgramDrafter([1, 2, 3, 4], max_draft=8)
    assert d.draft(room=8) == []
    d.extend([1])  # a 1-gram match is not enough
    assert d.draft(room=8) == []
    assert NgramDrafter([], max_draft=8).draft(room=8) == []


def test_drafts_match_a_brute_force_search_on_random_text() -> None:
    rng = random.Random(5)
    for _ in range(50):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 60))]
        d = NgramDrafter(tokens[:10], max_draft=5)
        d.extend(tokens[10:])
        assert d.draft(room=5) == reference_draft(tokens, 5), tokens


def test_acceptance_follows_recent_verifications_at_each_position() -> None:
    d = NgramDrafter([1, 2, 3], max_draft=16)
    assert d.survival(3) == pytest.approx([PRIOR_ACCEPTANCE, PRIOR_ACCEPTANCE ** 2, PRIOR_ACCEPTANCE ** 3])
    for _ in range(20):
        d.settle(drafted=16, accepted=16)  # a copying stretch
    assert d.survival(16)[-1] > 0.9
    d.settle(drafted=16, accepted=3)  # one miss does not end a copying stretch
    assert d.survival(16)[-1] > 0.7
    for _ in range(30):
        d.settle(drafted=8, accepted=2)  # a text that keeps two draft tokens and then diverges
    chances = d.survival(8)
    assert chances[1] > 0.9 and chances[2] < 0.1  # run-length aware: the third is where it ends
    assert all(a >= b for a, b in itertools.pairwise(chances))
    for _ in range(30):
        d.settle(drafted=4, accepted=0)  # free text: the first draft token is wrong every time
    assert d.acceptance(1) < 0.1
    d.settle(drafted=0, accepted=0)  # nothing drafted: nothing learnt
    assert (d.drafted, d.accepted) == (20 * 16 + 16 + 30 * 8 + 30 * 4, 20 * 16 + 3 + 30 * 2)


# Timed on a 2-core AMD EPYC (SmolLM2-135M, F16 weights): a step's time by its tokens, in ms.
F16 = StepCost([(1, 10.07), (2, 16.85), (3, 18.52), (5, 20.03), (9, 28.72), (17, 43.87), (33, 75.33)])


def test_a_step_cost_interpolates_what_was_timed_and_extrapolates_its_last_slope() -> None:
    assert F16(1) == 1.0
    assert F16(2) == pytest.approx(16.85 / 10.07)
    assert F16(4) == pytest.approx((18.52 + 20.03) / 2 / 10.07)
    assert F16(41) == pytest.approx((75.33 + (75.33 - 43.87) / 2) / 10.07)
    assert F16(0) == 0.0
    noisy = StepCost([(1, 10.0), (2, 9.0), (3, 30.0)])  # a bigger step timed faster: noise
    assert noisy(2) == pytest.approx(1.02) and noisy(3) == 3.0
    assert StepCost.linear(0.25)(5) == pytest.approx(2.0)
    assert StepCost.linear()(3) == pytest.approx(1 + 2 * PRIOR_MARGINAL)
    with pytest.raises(ValueError):
        StepCost([(2, 1.0)])


def _rate(chances: list[float], k: int, cost: StepCost) -> float:
    return (1 + sum(chances[:k])) / cost(1 + k)


def test_a_plan_drafts_long_where_a_second_token_is_dear_but_later_ones_cheap() -> None:
    sure = [0.97 ** j for j in range(1, 17)]
    assert plan_drafts([sure], F16) == [16]
    # One likely draft token would not pay for the jump to a batched step; several together do.
    assert plan_drafts([[0.6]], F16) == [0]
    assert plan_drafts([[0.6, 0.5, 0.45, 0.4]], F16) == [4]
    assert plan_drafts([[0.5 ** j for j in range(1, 9)]], F16) == [0]  # independent misses: never
    assert plan_drafts([], F16) == []


def test_for_one_sequence_the_plan_is_the_draft_length_with_the_best_expected_tokens_per_time() -> None:
    rng = random.Random(3)
    for _ in range(300):
        sizes = sorted(rng.sample(range(2, 40), 4))
        cost = StepCost([(1, 1.0)] + [(n, 1.0 + rng.uniform(0.05, 0.9) * (n - 1)) for n in sizes])
        chances, p = [], 1.0
        for _ in range(rng.randrange(0, 17)):
            p *= rng.uniform(0.3, 1.0)
            chances.append(p)
        k = plan_drafts([chances], cost)[0]
        best = max(_rate(chances, n, cost) for n in range(len(chances) + 1))
        assert _rate(chances, k, cost) == pytest.approx(best), (chances, k)


def test_in_a_batch_the_likelier_sequence_drafts_more_and_none_gets_more_than_it_has() -> None:
    linear = StepCost.linear(0.3)
    take = plan_drafts([[0.95 ** j for j in range(1, 7)], [0.4 ** j for j in range(1, 7)], [0.8, 0.64]], linear)
    assert take[0] > take[2] >= take[1]
    assert take[2] <= 2


def test_a_draft_model_drafts_what_pays_for_its_rounds_and_its_place_in_the_step() -> None:
    sure = [1.0] * 16
    free = lambda n: 0.0  # noqa: E731
    assert plan_drafts([sure], F16, free) == plan_drafts([sure], F16) == [16]  # free rounds: as a lookup
    assert plan_drafts([sure], F16, lambda n: 0.1 * n) == [16]  # a tenth of a step a round
    assert plan_drafts([sure], F16, lambda n: 1.0 * n) == [0]  # as slow as the model: never
    likely = [0.9 ** j for j in range(1, 17)]
    cheap = plan_drafts([likely], F16, lambda n: 0.1 * n)[0]
    dear = plan_drafts([likely], F16, lambda n: 0.3 * n)[0]
    assert 0 < dear < cheap < 16  # the dearer a round, the shorter the draft
    assert plan_drafts([], F16, free) == []
    # A round of the draft model batches its sequences: where a second sequence's round costs little more
    # than the first's, two sequences draft further than where each costs a round of its own.
    batched = lambda n: 0.0 if n == 0 else 0.3 + 0.02 * (n - 1)  # noqa: E731
    together = plan_drafts([likely] * 2, F16, batched)
    apart = plan_drafts([likely] * 2, F16, lambda n: 0.3 * n)
    assert min(together) > max(apart)


def test_a_draft_model_that_cannot_pay_even_when_always_right_is_told_apart() -> None:
    assert draft_model_can_pay(F16, lambda n: 0.3 * n, 16)
    assert not draft_model_can_pay(F16, lambda n: 1.0 * n, 16)
    half = StepCost([(1, 0.005), (2, 0.010)])  # a draft model half as fast per token, timed in seconds
    assert relative_to(half, F16)(1) == pytest.approx(0.005 / F16.seconds)


def test_acceptance_is_kept_apart_by_how_long_the_match_is() -> None:
    """A draft after a 12-token match is text being copied; one after a 3-token match may be a common phrase:
    each kind learns its own acceptance."""
    passage = list(range(100, 130))
    d = NgramDrafter([*passage, 1, 2], max_draft=8)
    d.extend(passage[:14])  # the output copies 14 tokens of the passage: the match goes back 12 and more
    assert d.draft(room=8) == passage[14:22] and d.kind == 2
    for _ in range(20):
        d.settle(drafted=8, accepted=8)
    copying = d.survival(8)[-1]
    e = NgramDrafter([7, 8, 9, 50, 51, 3, 4, 5, 6], max_draft=4)
    e.extend([1, 8, 9])  # only [8, 9] matches, and the token before differs (1, not 7)
    assert e.draft(room=4) == [50, 51, 3, 4] and e.kind == 0
    d.kind = 0  # the short kind of the copying drafter learnt nothing from the long matches
    assert d.survival(8)[-1] == pytest.approx(PRIOR_ACCEPTANCE ** 8) and copying > PRIOR_ACCEPTANCE ** 8
    mid = NgramDrafter([*passage[:8], 9, *passage[:7]], max_draft=2)  # the output so far repeats 7 tokens
    assert mid.draft(room=2) == [passage[7], 9] and mid.kind == 1


def test_a_step_costs_what_llama_cpps_equal_split_makes_of_it() -> None:
    """A KV stream per sequence: llama.cpp decodes a step as sub-batches that take as many tokens from each
    of their sequences, so a lone draft in company is a sub-batch of its own, and drafts of one length in
    every sequence share one."""
    assert split_cost([1], F16) == 1.0 and split_cost([9], F16) == F16(9)
    assert split_cost([1, 1, 1, 1], F16) == F16(4)
    assert split_cost([2, 1, 1, 1], F16) == pytest.approx(F16(4) + F16(1))
    assert split_cost([2, 2, 2, 2], F16) == F16(8) < split_cost([5, 1, 1, 1], F16)
    assert split_cost([5, 5, 1, 1], F16) == pytest.approx(F16(4) + F16(8))
    assert split_cost([], F16) == 0.0
    # So four streams take a draft token each where one stream alone would not draft at these odds.
    assert plan_drafts([[0.8]] * 4, F16) == [1, 1, 1, 1]
    assert plan_drafts([[0.8], [], [], []], F16) == [0, 0, 0, 0]
