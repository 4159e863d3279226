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

A drafted token is not free: on a CPU a step's time grows with its tokens, and not in a straight line.
The engine times steps of 1, 2, 3, 5, 9, 17, 33 and 49 tokens when it loads (batching.time_step_cost) and
plans with that curve (StepCost). Measured on a 2-core AMD EPYC with SmolLM2-135M: with F16 weights a
second token costs 0.67 of a step (ggml leaves its one-row kernel for the batched one) but each token
after the third only 0.2; with Q4_1 weights each token adds 0.5-0.8 of a step. So a one-token draft
rarely pays, and a long one may where a short one does not.

How likely a draft token is to be kept is not the same at every position: a text being copied keeps
whole runs and diverges at a point. Each drafter keeps, for positions 1, 2, 3-4, 5-8, 9-16 and 17 on, a
recent (decayed) count of the draft tokens verified there and kept (their conditional acceptance, given
the ones before were kept); the chance that the j-th is kept is the product up to j (`survival`). A
lookup drafter keeps these apart by how long its match is (the n-gram extended backwards while the
earlier text agrees: up to 5 tokens, 6-11, 12 or more): a long match is text being copied, and its drafts
are kept far more often than those after a short one, which may be a common phrase.
`plan_drafts` decodes the draft tokens, likeliest first, up to the count that gives the step the most
expected tokens per unit of time: a sequence whose drafts keep being rejected stops paying for them, and
a copying one drafts long runs. Speculation is on by default: with laas' Q4_1 kernel patch (a batch of
tokens multiplies two rows by two columns) bench/speculation.py measured it 1.41-1.46x plain decoding on
the default Q4_1 model's grounded answers at one stream, level on free text, and where a model's drafts do
not pay for their steps the plan drafts nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

MAX_NGRAM = 3  # the longest n-gram looked up (longer matches are rarer and barely more accurate)
MIN_NGRAM = 2  # a single repeated token is too weak a hint
PRIOR_ACCEPTANCE = 0.8  # a new sequence's conditional acceptance at every position (optimistic: drafts teach it)
PRIOR_WEIGHT = 2.0  # ... worth this many verified tokens
DECAY = 0.9  # per draft token verified at a position: the last dozen or so say what the text is like now
BUCKETS = 6  # positions 1, 2, 3-4, 5-8, 9-16, 17+
# How long the text's match with its earlier occurrence is (the n-gram looked up, extended backwards): a
# draft after a 12-token match is copying, after a 3-token one it may be a common phrase. A drafter keeps
# its acceptance apart for matches of up to 5 tokens, 6-11 and 12 or more.
MATCH_KINDS = (6, 12)  # where the second and the third kind begin
PRIOR_MARGINAL = 0.5  # a token's cost relative to a one-token step, where steps could not be timed


def _bucket(position: int) -> int:
    return min(BUCKETS - 1, (position - 1).bit_length())


class DraftAcceptance:
    """One sequence's record of how its drafts fare: for each position bucket, decayed counts of the draft
    tokens verified there (the ones before them kept) and of those kept. A draft model's sequences keep
    only this; prompt lookup (NgramDrafter) adds its index."""

    __slots__ = ("_kept", "_seen", "accepted", "drafted", "kind", "max_draft")

    def __init__(self, max_draft: int, kinds: int = 1) -> None:
        self.max_draft = max_draft
        self._kept = [[PRIOR_ACCEPTANCE * PRIOR_WEIGHT] * BUCKETS for _ in range(kinds)]
        self._seen = [[PRIOR_WEIGHT] * BUCKETS for _ in range(kinds)]
        self.kind = 0  # the kind of draft the estimates and records are of (NgramDrafter: its match's length)
        self.drafted = 0
        self.accepted = 0

    def acceptance(self, position: int) -> float:
        """The estimated chance that the draft token at `position` (1-based) is kept, given the ones before
        it were."""
        b = _bucket(position)
        return self._kept[self.kind][b] / self._seen[self.kind][b]

    def survival(self, length: int) -> list[float]:
        """For j = 1..length: the estimated chance that a draft's first j tokens are all kept."""
        out, p = [], 1.0
        for j in range(1, length + 1):
            p *= self.acceptance(j)
            out.append(p)
        return out

    def extend(self, tokens: list[int]) -> None:
        """The sequence appended `tokens` (a lookup drafter indexes them)."""

    def settle(self, drafted: int, accepted: int) -> None:
        """Records that `accepted` of `drafted` tokens were kept (the first rejected one, if any, is a
        failure; those after it were never tried)."""
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        kept, seen = self._kept[self.kind], self._seen[self.kind]
        for position in range(1, min(drafted, accepted + 1) + 1):
            b = _bucket(position)
            kept[b] = kept[b] * DECAY + (position <= accepted)
            seen[b] = seen[b] * DECAY + 1


class NgramDrafter(DraftAcceptance):
    """One sequence's index of its own tokens (updated as they are appended) and its acceptance by position."""

    __slots__ = ("_index", "_tokens")

    def __init__(self, prompt: list[int], max_draft: int) -> None:
        super().__init__(max_draft, kinds=len(MATCH_KINDS) + 1)
        self._tokens: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest occurrence ended
        self.extend(prompt)

    def extend(self, tokens: list[int]) -> None:
        t = self._tokens
        for token in tokens:
            end = len(t)  # the n-grams ending just before `token` are followed by it: index them
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if end >= n:
                    self._index[tuple(t[end - n:end])] = end
            t.append(token)

    def draft(self, room: int) -> list[int]:
        """Up to min(room, max_draft) tokens that followed the longest n-gram ending the text, or []; sets
        `kind` by how far the match goes back (MATCH_KINDS)."""
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
                matched = n
                while matched < MATCH_KINDS[-1] and start > matched and t[start - matched - 1] == t[end - matched - 1]:
                    matched += 1
                self.kind = sum(matched >= k for k in MATCH_KINDS)
                return t[start:start + limit]
        return []


class StepCost:
    """A decode step's time as a function of its tokens, relative to a one-token step's: linear between the
    timed sizes, and past the largest one at the slope of the last segment."""

    __slots__ = ("_points", "_table", "seconds")

    def __init__(self, points: list[tuple[int, float]]) -> None:
        """`points`: (tokens, seconds) of timed steps, one of them of one token. A step never costs less than
        a smaller one (timing noise), nor a token less than 2% of a step."""
        points = sorted(points)
        if not points or points[0][0] != 1 or points[0][1] <= 0.0:
            raise ValueError("a step of one token must be timed")
        one = points[0][1]
        self.seconds = one  # a one-token step's time, as timed (another model's curve is scaled by it)
        curve = [(1, 1.0)]
        for n, seconds in points[1:]:
            if n > curve[-1][0]:
                last_n, last = curve[-1]
                curve.append((n, max(seconds / one, last + 0.02 * (n - last_n))))
        self._points = curve
        self._table: list[float] = []  # cost by tokens, filled as far as asked: plan_drafts asks every step

    @classmethod
    def linear(cls, marginal: float = PRIOR_MARGINAL) -> StepCost:
        """Each token past the first costs `marginal` of a step (where steps could not be timed)."""
        return cls([(1, 1.0), (2, 1.0 + marginal)])

    def __call__(self, tokens: int) -> float:
        table = self._table
        while len(table) <= tokens:
            table.append(self._at(len(table)))
        return table[tokens] if tokens >= 0 else 0.0

    def _at(self, tokens: int) -> float:
        points = self._points
        if tokens <= 1 or len(points) == 1:
            return float(max(tokens, 0))
        for (n0, c0), (n1, c1) in itertools.pairwise(points):
            if tokens <= n1:
                return c0 + (c1 - c0) * (tokens - n0) / (n1 - n0)
        (n0, c0), (n1, c1) = points[-2], points[-1]
        return c1 + (c1 - c0) / (n1 - n0) * (tokens - n1)

    def describe(self) -> str:
        return ", ".join(f"{n}: {c:.2f}" for n, c in self._points)

    def points(self) -> list[tuple[int, float]]:
        """(tokens, seconds) of the curve: StepCost(cost.points()) is the same curve (to keep it in a file)."""
        return [(n, c * self.seconds) for n, c in self._points]


def plan_drafts(survival: list[list[float]], cost: StepCost,
                draft_cost: Callable[[int], float] | None = None) -> list[int]:
    """How many tokens of each sequence's draft a step decodes. survival[i][j-1] is the chance that sequence
    i's first j draft tokens are all kept (never rising with j; its length is what the draft offers); every
    decoding sequence already has its next token in the step, which costs split_cost(tokens of each). Draft
    tokens are taken likeliest first, as many as give the step the most expected tokens per unit of time.

    `draft_cost`: where the drafts are still to be made by a draft model, which decodes a round per
    position (every sequence drafting that far in one batch): a round of n sequences' time relative to
    the step's one-token time; then the plan is how far each sequence drafts. None: drafts are free (a
    lookup)."""
    m = len(survival)
    order = sorted(((p, j, i) for i, chances in enumerate(survival) for j, p in enumerate(chances)),
                   key=lambda g: (-g[0], g[1]))  # a sequence's j-th token never before its (j-1)-th
    best_rate, best_k = (m / cost(m) if m else 0.0), 0
    tokens, rounds = float(m), 0.0  # expected tokens; the draft rounds' time so far
    drafting = [0] * (max(map(len, survival), default=0) + 1)  # sequences drafting in each round
    counts = [1] * m  # each sequence's tokens in the step
    for k, (p, j, i) in enumerate(order, 1):
        if draft_cost is not None:
            rounds += draft_cost(drafting[j] + 1) - draft_cost(drafting[j])
            drafting[j] += 1
        tokens += p
        counts[i] += 1
        rate = tokens / (rounds + split_cost(counts, cost))
        if rate > best_rate * (1 + 1e-9):
            best_rate, best_k = rate, k
    take = [0] * m
    for _, _, i in order[:best_k]:
        take[i] += 1
    return take


def split_cost(counts: list[int], cost: StepCost) -> float:
    """The time of a step in which the sequences decode `counts` tokens each. llama.cpp splits a step over
    a KV stream per sequence into sub-batches that take as many tokens from each of their sequences (its
    equal split): one with a token of every sequence, then one of the sequences that have more, and so on,
    each decoded on its own. So a lone sequence's draft in company costs a step of its own (measured, F16:
    [2, 1, 1, 1] tokens cost 2.65 one-token steps, [2, 2, 2, 2] 2.51), and drafts of the same length in
    several sequences share one."""
    total, below = 0.0, 0
    ordered = sorted(counts)
    for index, count in enumerate(ordered):
        if count > below:
            total += cost((len(ordered) - index) * (count - below))
            below = count
    return total


def relative_to(cost: StepCost, model: StepCost) -> Callable[[int], float]:
    """`cost` (another model's steps, as timed) in units of `model`'s one-token step."""
    scale = cost.seconds / model.seconds
    return lambda tokens: cost(tokens) * scale


def draft_model_can_pay(cost: StepCost, draft_cost: Callable[[int], float], max_draft: int) -> bool:
    """Whether a draft model that is always right pays for its rounds at one stream: if not, a plan never
    drafts with it (only `draft_min` would)."""
    return plan_drafts([[1.0] * max_draft], cost, draft_cost) != [0]
