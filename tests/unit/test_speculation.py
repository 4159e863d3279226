"""Prompt lookup: drafts from the longest n-gram seen before, the acceptance rate, the plan of what pays in a step."""

from __future__ import annotations

import random

import pytest

from laas.daemon.backends.speculation import (
    MAX_NGRAM,
    MIN_NGRAM,
    PRIOR_ACCEPTANCE,
    PRIOR_MARGINAL,
    NgramDrafter,
    plan_drafts,
    relative_token_cost,
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


def test_the_acceptance_rate_follows_recent_verifications() -> None:
    d = NgramDrafter([1, 2, 3], max_draft=8)
    assert d.acceptance == PRIOR_ACCEPTANCE
    for _ in range(20):
        d.settle(drafted=8, accepted=8)  # a copying stretch
    assert d.acceptance > 0.95
    d.settle(drafted=8, accepted=3)  # one miss does not end a copying stretch
    assert d.acceptance > 0.85
    for _ in range(30):
        d.settle(drafted=4, accepted=0)  # free text: the first draft token is wrong every time
    assert d.acceptance < 0.1
    d.settle(drafted=0, accepted=0)  # nothing drafted: nothing learnt
    assert (d.drafted, d.accepted) == (288, 163)


def test_a_plan_decodes_draft_tokens_only_while_they_raise_tokens_per_second() -> None:
    assert plan_drafts([0.5], [8], marginal=0.5) == [0]  # 0.5 of a token for half a step: no gain
    assert plan_drafts([0.99], [8], marginal=0.05) == [8]  # nearly free and nearly sure: all of it
    one = plan_drafts([0.9], [16], marginal=0.5)[0]
    assert 1 <= one < 16

    def throughput(p: float, k: int, marginal: float) -> float:
        return sum(p ** j for j in range(k + 1)) / (1 + marginal * k)

    # For one sequence the plan is the draft length with the best expected tokens per unit of time.
    for p in (0.3, 0.6, 0.8, 0.9, 0.97):
        for marginal in (0.05, 0.2, 0.5, 0.9):
            k = plan_drafts([p], [16], marginal)[0]
            best = max(range(17), key=lambda n: throughput(p, n, marginal))
            assert abs(throughput(p, k, marginal) - throughput(p, best, marginal)) < 1e-9, (p, marginal)


def test_in_a_batch_the_likelier_sequence_drafts_more_and_none_is_cut_below_what_it_has() -> None:
    take = plan_drafts([0.95, 0.4, 0.8], [6, 6, 2], marginal=0.3)
    assert take[0] > take[2] >= take[1]
    assert take[2] <= 2
    assert plan_drafts([], [], marginal=0.3) == []


def test_the_relative_token_cost_of_two_timed_steps() -> None:
    assert relative_token_cost(0.010, 0.058, 9) == pytest.approx(0.6)  # 6 ms a token over a 10 ms step
    assert relative_token_cost(0.010, 0.009, 9) == 0.02  # noise: never free, never negative
    assert relative_token_cost(0.010, 0.500, 9) == 1.0
    assert relative_token_cost(0.0, 0.1, 9) == PRIOR_MARGINAL  # not timed
