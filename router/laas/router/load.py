"""The load on a target: the requests laasd has in flight there, each reserved by the decision that chose it.

Layer: domain (no I/O; time is passed in). A decision reserves its request's predicted service time
on the chosen target before the next decision is made (dispatch.Router.run holds it from the plan to
the end of the stream), so requests that arrive together see each other instead of all picking the
target that looked fastest alone. A reservation is released when its request completes, is
cancelled, fails, or fails over to another target (each target's reservation is its own): the
in-flight count never leaks.

What the estimators (latency.py) read from here, per target:
- `count`: requests in flight (a request starts when it has the model's first token, or the remote's);
- `work_ms(now)`: their predicted service time still to run, the work a FIFO server does before a new
  request's turn (a started request's remaining part shrinks with the time it has run).
A `Hold` remembers what it saw when it was made (work ahead, others in flight), so that its request's
measured latency can teach the estimator how much of that load delayed it. On the device a reservation
also says what it is made of (its predicted prefill, the tokens it decodes), so that a request can be
predicted beside each of the others in its batch (`members`), and a request that decoded while others
prefilled knows how long their prompts held its steps (`Hold.stalled_ms`).

A `HostLoad` counts the requests in flight on every target of one daemon: the device's cores also run
what laasd does for the others (streaming them, and any model server on the same machine), so the
device's estimator learns how much the requests in flight elsewhere slow it (latency.LocalEstimator).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Reserved:
    service_ms: float
    reserved_at: float
    started_at: float | None = None
    prefill_ms: float = 0.0  # its prompt's predicted time (device)
    tokens: int = 0  # the tokens it decodes (device)
    stalled_ms: float = 0.0  # others' prefill that ran while it decoded

    def left_ms(self, now: float) -> float:
        """Its service time still to run: all of it until it starts, then shrinking with the time it has run."""
        if self.started_at is None:
            return self.service_ms
        return max(self.service_ms - (now - self.started_at) * 1000, 0.0)


@dataclass(frozen=True, slots=True)
class Member:
    """A request in flight on the device as a batch-mate sees it: its prefill still to run (none once it
    has its first token) and its tokens still to decode."""

    prefill_ms: float
    tokens: float


@dataclass
class HostLoad:
    """The requests in flight on all the targets of one daemon."""

    count: int = 0


@dataclass
class InFlight:
    """The reservations on one target."""

    host: HostLoad = field(default_factory=HostLoad)
    _held: dict[int, _Reserved] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def elsewhere(self) -> int:
        """Requests in flight on the host's other targets."""
        return self.host.count - self.count

    @property
    def count(self) -> int:
        return len(self._held)

    def remaining_ms(self, now: float, since: float | None = None) -> list[float]:
        """Each reservation's service time still to run (those reserved after `since`, when given)."""
        return [r.left_ms(now) for r in self._held.values() if since is None or r.reserved_at > since]

    def work_ms(self, now: float, since: float | None = None) -> float:
        return sum(self.remaining_ms(now, since))

    def hold(self, service_ms: float, now: float, prefill_ms: float = 0.0, tokens: int = 0) -> Hold:
        """Reserves a request's predicted service time from now on (of it, `prefill_ms` for its prompt and
        `tokens` decoded, when known); `Hold.release` gives it back."""
        ticket = next(self._ids)
        reserved = _Reserved(service_ms, now, prefill_ms=prefill_ms, tokens=tokens)
        hold = Hold(self, ticket, service_ms, ahead_ms=self.work_ms(now), others=self.count, _reserved=reserved)
        self._held[ticket] = reserved
        self.host.count += 1
        return hold

    def members(self, now: float, besides: int | None = None, limit: int | None = None) -> list[Member]:
        """The reservations other than ticket `besides`, earliest first (at most `limit`), as batch-mates: a
        started one's tokens still to decode shrink with the share of its service time it has run."""
        out = []
        for ticket, r in self._held.items():
            if ticket == besides:
                continue
            if r.started_at is None:
                out.append(Member(r.prefill_ms, float(r.tokens)))
            else:
                out.append(Member(0.0, r.tokens * r.left_ms(now) / r.service_ms if r.service_ms > 0 else 0.0))
        return out[:limit]

    def _start(self, ticket: int, now: float) -> None:
        reserved = self._held.get(ticket)
        if reserved is not None and reserved.started_at is None:
            reserved.started_at = now
            # its prompt ran just before its first token: the requests decoding then waited for it
            for other in self._held.values() if reserved.prefill_ms else ():
                if other is not reserved and other.started_at is not None and other.started_at < now:
                    other.stalled_ms += min(reserved.prefill_ms, (now - other.started_at) * 1000)

    def _release(self, ticket: int) -> None:
        if self._held.pop(ticket, None) is not None:
            self.host.count -= 1


@dataclass(eq=False)
class Hold:
    """One request's reservation on one target; release() is idempotent (completion, cancel, failure and
    failover may each reach it)."""

    in_flight: InFlight
    ticket: int
    service_ms: float
    ahead_ms: float  # the work in flight there when it was reserved
    others: int  # requests in flight there when it was reserved
    _reserved: _Reserved = field(repr=False)
    batch_at_start: int = 0  # requests in flight there (itself included) when it started
    elsewhere_at_start: int = 0  # requests in flight on the host's other targets when it started

    @property
    def stalled_ms(self) -> float:
        """The others' prefill that ran while it decoded (their predicted prompt times), so far."""
        return self._reserved.stalled_ms

    @property
    def held(self) -> bool:
        return self.ticket in self.in_flight._held

    def start(self, now: float) -> None:
        """Its request started (took the model; the first token came): its remaining work shrinks from now."""
        if self.held and self._reserved.started_at is None:
            self.in_flight._start(self.ticket, now)
            self.batch_at_start = self.in_flight.count
            self.elsewhere_at_start = self.in_flight.elsewhere

    def batch_during(self) -> float:
        """Requests in flight there while it ran, itself included: the mean of its start and now. Those
        still prefilling count: their prompts share its steps (issue 21: counted from the requests that
        had their first token, a burst's first was taken to decode alone beside two others' prompts,
        and taught the device a batch step 1.5-1.9x too slow per extra stream)."""
        return (max(self.batch_at_start, 1) + max(self.in_flight.count, 1)) / 2

    def elsewhere_during(self) -> float:
        """Requests in flight on the host's other targets while it ran: the mean of its start and now."""
        return (self.elsewhere_at_start + self.in_flight.elsewhere) / 2

    def release(self) -> None:
        self.in_flight._release(self.ticket)
