"""Requests that arrive together are routed together: a cohort.

Layer: router (asyncio's clock and futures, no I/O). Each decision reserves its request's load before
the next is made (load.py), so a burst does not all pick the target that looked fastest alone. But the
first request of a burst was decided, and its time predicted, before the rest had arrived: on the
device it was predicted alone and then decoded in a batch with them (issue 21: bursts on the device
predicted 37% too fast). A request whose route depends on the load (AUTO or PREFER_LOCAL, a latency
budget, more than one target) therefore waits in a cohort that closes `window_s` after its latest
arrival (a lone request waits that long), and at the latest `CAP_WINDOWS` windows after its first (a
burst whose calls a busy client spreads still gathers whole: issue 21, a burst of four split into
cohorts of one and three, its first predicted alone). Then the cohort is decided in arrival order,
each member reserving its load on its target before the next is decided, as before; then each
member's time is predicted again beside the whole cohort's load (Target.estimate with the member's
hold), so the first of a burst is predicted as it will run, with the rest of the burst beside it (on the
device: beside each batch-mate's prompt and tokens, latency.LocalEstimator.in_batch_ms). The reason
names the cohort.

The reservations are made here and handed over with the decision (Router.run adopts them); a member
whose caller is cancelled while it waits is left out, and one cancelled after its decision releases
its hold: nothing leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field, replace

from laas.router.load import Hold
from laas.router.policy import Decision, Query, choose
from laas.router.targets import Admitted, Target

CAP_WINDOWS = 4  # the longest a cohort stays open, in windows after its first arrival


def closes_at(first_at: float, latest_at: float, window_s: float) -> float:
    """When a cohort closes: a window after its latest arrival, at most CAP_WINDOWS after its first."""
    return min(latest_at + window_s, first_at + CAP_WINDOWS * window_s)


@dataclass(eq=False)
class _Member:
    query: Query
    admitted: Admitted
    targets: list[Target]
    future: asyncio.Future[tuple[Decision, Hold]] = field(repr=False)


class Cohorts:
    """Gathers the requests that arrive within `window_s` of each other (up to CAP_WINDOWS windows after the
    first) and decides them together."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._members: list[_Member] = []
        self._timer: asyncio.TimerHandle | None = None
        self._first_at = 0.0
        self.decided = 0  # cohorts decided, and the requests in them (metrics, tests)
        self.requests = 0

    async def decide(self, query: Query, admitted: Admitted, targets: list[Target]) -> tuple[Decision, Hold]:
        """The request's decision, made with its cohort's, and its reservation on the chosen target."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Decision, Hold]] = loop.create_future()
        self._members.append(_Member(query, admitted, targets, future))
        now = loop.time()
        if self._timer is None:
            self._first_at = now
        else:
            self._timer.cancel()
        self._timer = loop.call_at(closes_at(self._first_at, now, self.window_s), self.close)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result()[1].release()  # decided, then cancelled before it could run
            raise

    def close(self) -> None:
        """Decides the cohort gathered so far (its timer calls it)."""
        if self._timer is not None:
            self._timer.cancel()
        members, self._members, self._timer = self._members, [], None
        if not members:
            return
        decided: list[tuple[_Member, Decision, Target, Hold]] = []
        for m in members:
            if m.future.done():  # its caller went away while it waited
                continue
            try:
                decision = choose(m.query, [t.estimate(m.admitted) for t in m.targets])
                target = next(t for t in m.targets if t.name == decision.chosen.target)
                decided.append((m, decision, target, target.reserve(m.admitted)))
            except Exception as e:  # the request's own error (nothing fits it): its caller raises it
                m.future.set_exception(e)
        self.decided += 1
        self.requests += len(decided)
        for m, decision, target, hold in decided:
            with contextlib.suppress(Exception):  # a prediction that cannot be made again keeps the first
                decision = _beside(decision, target, m.admitted, hold, len(decided))
            m.future.set_result((decision, hold))


def _beside(decision: Decision, target: Target, admitted: Admitted, hold: Hold, size: int) -> Decision:
    """The decision with its route's time predicted again beside everything reserved now."""
    if size < 2:
        return decision
    again = target.estimate(admitted, hold)
    chosen = replace(decision.chosen, predicted_ms=again.predicted_ms, first_token_ms=again.first_token_ms)
    others = "1 other request" if size == 2 else f"{size - 1} other requests"
    return replace(decision, order=(chosen, *decision.order[1:]),
                   reason=f"{decision.reason} (decided with {others} that arrived with it)")
