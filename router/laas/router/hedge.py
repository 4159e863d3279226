"""Hedged requests: when the chosen target's first token is late, the next target starts too, and the one
that answers first streams (the other is cancelled).

Layer: domain (no I/O, no clock). A hedge is planned with the decision, from each target's predicted time
to first token (Estimate.first_token_ms):

- only for a request with a latency budget and a second eligible target;
- the backup starts `after` times the chosen target's predicted first token (never sooner than
  `min_after_ms`), and only when it can still meet the budget if it starts then;
- each target has a budget of hedges: `share` of the requests the router routes (a token bucket that
  fills by `share` a request, up to `burst`), so hedges cannot multiply what a cloud endpoint is sent.

Off by default (settings `hedge`): see bench/routing_mixed.py for what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from laas.router.policy import Decision, Estimate, Policy, Query


@dataclass(frozen=True, slots=True)
class HedgeConfig:
    after: float = 1.5  # multiple of the chosen target's predicted first token
    min_after_ms: float = 50.0
    share: float = 0.1  # of the routed requests, the most that may start a hedge on one target
    burst: float = 2.0  # hedges a target may take at once after a quiet spell


@dataclass(frozen=True, slots=True)
class Hedge:
    """Start `backup` when the first target has not answered `after_ms` after it started."""

    backup: Estimate
    after_ms: float


def plan_hedge(decision: Decision, query: Query, config: HedgeConfig) -> Hedge | None:
    """The hedge for a decision, or None when none may pay (see the module's rules; budgets aside)."""
    if query.budget_ms is None or query.policy is Policy.LOCAL_ONLY or len(decision.order) < 2:
        return None
    first, backup = decision.order[0], decision.order[1]
    if first.first_token_ms <= 0:
        return None
    after_ms = max(first.first_token_ms * config.after, config.min_after_ms)
    if after_ms + backup.predicted_ms > query.budget_ms:
        return None
    return Hedge(backup, after_ms)


@dataclass
class HedgeBudget:
    """Each target's allowance of hedges: `share` of a hedge per routed request, at most `burst` banked."""

    config: HedgeConfig
    _tokens: dict[str, float] = field(default_factory=dict)

    def routed(self, targets: list[str]) -> None:
        """A request was routed: each of `targets` (the ones it could go to) earns its share."""
        for name in targets:
            self._tokens[name] = min(self._tokens.get(name, self.config.burst) + self.config.share,
                                     self.config.burst)

    def take(self, target: str) -> bool:
        """Spends one hedge on `target`, when it has one left."""
        tokens = self._tokens.get(target, self.config.burst)
        if tokens < 1:
            return False
        self._tokens[target] = tokens - 1
        return True
