"""Prompt-lookup drafts, and how many of their tokens a step should decode.

Layer: domain (pure: token ids and timings in, token ids and counts out). Input-grounded work (rewrite,
extract from or summarize a passage given in the prompt) copies spans of its prompt. A sequence's drafter
(NgramDrafter) indexes every n-gram of its prompt and output (n = MIN_NGRAM..MAX_NGRAM) by where it last
ended; at each step it looks up the longest n-gram that ends the text so far and proposes the tokens that
followed it. The scheduler (batching.py) decodes those drafts in the same step as the sequence's next token
and keeps the ones the target model would have produced itself (speculative decoding with a deterministic
draft: sampling from the target and keeping a draft token only where the sample equals it is the
standard acceptance rule, so greedy output is token for token what plain decoding gives, and sampled
output keeps the target's distribution).

A drafted token is not free: on a CPU a step's time grows with its tokens. The engine times that when
it loads (batching.time_token_cost: one more token's cost relative to a one-token step). Measured on a
2-core AVX2 machine: SmolLM2-135M Q4_1 0.6 (its matmuls run a row at a time: each token adds most of a
step), Q8_0 0.44, F16 0.23 (batched GEMM kernels). `plan_drafts` decodes a draft token only where it
raises the step's expected tokens per unit of time, from that cost and each sequence's measured
acceptance rate: so a sequence whose drafts keep being rejected stops paying for them, and a copying one
drafts long runs. At the acceptance grounded work measured (about 0.75) a token costing 0.35 of a step
still wins about 1.3x in theory, one costing 0.6 at most 1.09x before the verification's own work: so
speculation is off by default (bench/speculation.py measured it slower on the default model here).
"""

from __future__ import annotations

MAX_NGRAM = 3  # the longest n-gram looked up (longer matches are rarer and barely more accurate)
MIN_NGRAM = 2  # a single repeated token is too weak a hint
PRIOR_ACCEPTANCE = 0.8  # a new sequence's acceptance rate, worth PRIOR_WEIGHT tokens (optimistic: drafts teach it)
PRIOR_WEIGHT = 2.0
DECAY = 0.9  # per draft token tried: the last few dozen say what the text being produced now is like
PRIOR_MARGINAL = 0.5  # a token's cost relative to a one-token step, where it could not be timed


class NgramDrafter:
    """One sequence's index of its own tokens (updated as they are appended) and its acceptance rate."""

    __slots__ = ("_index", "_kept", "_seen", "_tokens", "accepted", "drafted", "max_draft")

    def __init__(self, prompt: list[int], max_draft: int) -> None:
        self._tokens: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest occurrence ended
        self.max_draft = max_draft
        self._kept = PRIOR_ACCEPTANCE * PRIOR_WEIGHT  # decayed counts of draft tokens kept / verified
        self._seen = PRIOR_WEIGHT
        self.drafted = 0
        self.accepted = 0
        self.extend(prompt)

    @property
    def acceptance(self) -> float:
        """The estimated chance that a draft token is kept, given the ones before it were."""
        return self._kept / self._seen

    def extend(self, tokens: list[int]) -> None:
        t = self._tokens
        for token in tokens:
            end = len(t)  # the n-grams ending just before `token` are followed by it: index them
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if end >= n:
                    self._index[tuple(t[end - n:end])] = end
            t.append(token)

    def draft(self, room: int) -> list[int]:
        """Up to min(room, max_draft) tokens that followed the longest n-gram ending the text, or []."""
        t = self._tokens
        limit = min(room, self.max_draft)
        if limit <= 0:
            return []
        end = len(t)
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if end < n:
                continue
            start = self._index.get(tuple(t[end - n:]))
            if start is not None:
                return t[start:start + limit]
        return []

    def settle(self, drafted: int, accepted: int) -> None:
        """Records that `accepted` of `drafted` tokens were kept (the first rejected one, if any, is a
        failure; those after it were never tried)."""
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        tried = accepted + (1 if accepted < drafted else 0)
        forget = DECAY ** tried
        self._kept = self._kept * forget + accepted
        self._seen = self._seen * forget + tried


def plan_drafts(acceptance: list[float], available: list[int], marginal: float) -> list[int]:
    """How many tokens of each sequence's draft a step decodes. Sequence i's j-th draft token is kept with
    chance acceptance[i] ** j and costs `marginal` (a one-token step costing 1); every decoding sequence
    already has its next token in the step. Draft tokens are taken most likely first while each raises
    the expected tokens per unit of time of the whole step."""
    m = len(acceptance)
    take = [0] * m
    tokens = float(m)  # expected tokens the step delivers
    cost = 1.0 + marginal * (m - 1)
    gains = sorted(((acceptance[i] ** j, i) for i in range(m) for j in range(1, available[i] + 1)),
                   reverse=True)
    for gain, i in gains:  # a sequence's j-th token comes after its (j-1)-th: its gain is never larger
        if gain * cost <= tokens * marginal:  # gain / marginal <= tokens / cost: it would not pay
            break
        take[i] += 1
        tokens += gain
        cost += marginal
    return take


def relative_token_cost(one: float, many: float, tokens: int) -> float:
    """From a one-token step's time and a `tokens`-token step's: one more token's cost relative to the first."""
    if one <= 0.0 or tokens <= 1:
        return PRIOR_MARGINAL
    return min(1.0, max(0.02, (many - one) / (tokens - 1) / one))
