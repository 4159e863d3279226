"""Online latency estimates per target, and the circuit breaker per remote endpoint.

Layer: domain (no I/O; time is passed in). Every finished request updates its target's estimates
with exponentially weighted averages, so predictions follow the machine's real speed (thermal
throttling, other load) and a remote endpoint's real latency.

    device:  queue ahead + prompt_tokens / prefill rate + max_tokens * decode step (longer in a batch)
    remote:  wait for the work in flight ahead + time to first token + max_tokens * inter-token time
             (longer with more in flight), inflated by its recent error rate

The work in flight is what laasd's own decisions reserved on each target (load.py).

The device's rates are seeded at start-up by a short calibration. One run can be taken while another
process holds the cores (llama.cpp with `threads` = every core collapses when it has to share them:
100x slower was seen), and a device predicted far too slow would see no live request to correct it
once requests with a deadline go elsewhere. So a run far below what the model's size predicts is
measured again (the fastest run counts), a seed is never below that floor, and the first live
request replaces a seed instead of being averaged with it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from laas.router.load import Hold, InFlight, Member

ALPHA = 0.3  # weight of the newest observation
# Decoding reads every weight once per token; 1 GB/s is far below any device laas targets (a Raspberry
# Pi 4 reads about 4 GB/s), so a slower run means the run was disturbed, not that the device is slow.
SLOWEST_BYTES_PER_S = 1e9
FLOOR_CAP_TPS = 30.0  # tiny models: per-token overheads, not the weights, bound the rate


def decode_floor_tps(size_bytes: int) -> float:
    """The slowest decode rate an undisturbed device gives for a model of this size (tokens/s)."""
    return min(SLOWEST_BYTES_PER_S / max(size_bytes, 1), FLOOR_CAP_TPS)


@dataclass(frozen=True, slots=True)
class Rates:
    """One calibration run: prefill and decode rates (tokens/s), None when the run could not tell."""

    prefill_tps: float | None
    decode_tps: float | None

    def best(self, other: Rates) -> Rates:
        """The faster of each rate: a disturbed run is only ever slower than the device."""
        return Rates(_max(self.prefill_tps, other.prefill_tps), _max(self.decode_tps, other.decode_tps))


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


async def calibrate_rates(measure: Callable[[int], Awaitable[Rates]], floor_tps: float, attempts: int = 3
                          ) -> tuple[Rates, int]:
    """Runs `measure(attempt)` until a run decodes at `floor_tps` or more, at most `attempts` times;
    returns the fastest rates seen and the runs it took."""
    best = Rates(None, None)
    for attempt in range(1, attempts + 1):
        best = best.best(await measure(attempt))
        if best.decode_tps is not None and best.decode_tps >= floor_tps:
            return best, attempt
    return best, attempts


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


@dataclass
class LocalEstimator:
    """Prefill and decode rates of one local model, the batch's cost, and the work in flight on it."""

    prefill_tps: float | None = None
    decode_tps: float | None = None  # one stream alone
    overhead_ms: float = 5.0
    # Requests the model decodes at once (continuous batching): one waits only when all slots are taken.
    parallel: int = 1
    # With batching, N streams share each decode step: a step takes (1 + batch_cost * (N - 1)) times a
    # lone stream's. Learned from requests that ran in a batch (0 until one has).
    batch_cost: float = 0.0
    # The cores are shared with what laasd runs for its other targets at the same time: a step takes
    # (1 + host_cost * requests in flight elsewhere) times an undisturbed one's. Learned (0 until seen).
    host_cost: float = 0.0
    host_observed: int = 0
    batch_observed: int = 0
    # A rate that is a calibration's seed: the first live observation replaces it.
    seeded_prefill: bool = False
    seeded_decode: bool = False
    in_flight: InFlight = field(default_factory=InFlight)

    @property
    def calibrated(self) -> bool:
        return self.prefill_tps is not None and self.decode_tps is not None

    def step_ms(self, batch: int = 1, elsewhere: float = 0.0) -> float:
        """One decode step of a stream among `batch` streams, with `elsewhere` requests on other targets."""
        return (1000 / (self.decode_tps or 20.0) * (1 + self.batch_cost * (max(batch, 1) - 1))
                * (1 + self.host_cost * elsewhere))

    def prefill_ms(self, prompt_tokens: int) -> float:
        return prompt_tokens * 1000 / (self.prefill_tps or 500.0)

    def service_ms(self, prompt_tokens: int, max_tokens: int, batch: int = 1, elsewhere: float = 0.0) -> float:
        """Time to run the request once it has the model, sharing each step with `batch - 1` others."""
        return self.overhead_ms + self.prefill_ms(prompt_tokens) + max_tokens * self.step_ms(batch, elsewhere)

    def in_batch_ms(self, prompt_tokens: int, max_tokens: int, mates: list[Member], elsewhere: float = 0.0,
                    first_token: bool = False) -> float:
        """Time to run the request beside `mates`, the others in its batch (issue 21: a burst predicted with
        every member in the batch for its whole run was 36-100% too slow on the device).

        Every prompt in the batch still to prefill holds every stream's steps (the steps carry prompt
        chunks): to its first token a request waits for each other prompt as far as its own goes, and for
        all of them by its end. Then the batch shrinks as its members finish: a stream decodes among those
        with tokens left (the shortest finishes first and the rest go on faster)."""
        own = self.prefill_ms(prompt_tokens)
        if first_token:
            held = sum(min(m.prefill_ms, own) for m in mates)
            return self.overhead_ms + own + held + self.step_ms(len(mates) + 1, elsewhere)
        total = self.overhead_ms + own + sum(m.prefill_ms for m in mates)
        done, batch = 0.0, len(mates) + 1
        for left in sorted(m.tokens for m in mates):
            if left >= max_tokens:
                break
            total += (left - done) * self.step_ms(batch, elsewhere)
            done, batch = left, batch - 1
        return total + (max_tokens - done) * self.step_ms(batch, elsewhere)

    def queue_ms(self, now: float) -> float:
        """Predicted time until the model is free for a new request.

        With `parallel` slots, a request waits only when they are all taken, and then for the work
        ahead spread over the slots."""
        if self.in_flight.count < self.parallel:
            return 0.0
        return self.in_flight.work_ms(now) / self.parallel

    def _run_ms(self, prompt_tokens: int, max_tokens: int, now: float, queued_ms: float | None,
                besides: int | None = None, first_token: bool = False) -> float:
        """A request's time: in a free slot (`queued_ms` None), beside the others in the batch but ticket
        `besides` (in_batch_ms); else after `queued_ms` of queue, in a full batch."""
        elsewhere = self.in_flight.elsewhere
        if queued_ms is None:
            mates = self.in_flight.members(now, besides=besides, limit=self.parallel - 1)
            return self.in_batch_ms(prompt_tokens, max_tokens, mates, elsewhere, first_token)
        return queued_ms + self.service_ms(prompt_tokens, 1 if first_token else max_tokens, self.parallel, elsewhere)

    def _queued_ms(self, now: float) -> float | None:
        """The queue a request decided now waits in; None when a slot is free."""
        return None if self.in_flight.count < self.parallel else self.queue_ms(now)

    def predict_ms(self, prompt_tokens: int, max_tokens: int, now: float) -> float:
        """A request decided now: beside the requests in flight when a slot is free, else after the queue
        in a full batch."""
        return self._run_ms(prompt_tokens, max_tokens, now, self._queued_ms(now))

    def first_token_ms(self, prompt_tokens: int, now: float) -> float:
        """Predicted time to the first token: the queue, the prompts' prefill and one decode step."""
        return self._run_ms(prompt_tokens, 1, now, self._queued_ms(now), first_token=True)

    def hold(self, prompt_tokens: int, max_tokens: int, now: float) -> Hold:
        """Reserves the request's own service time (not the queue ahead of it) until released."""
        free = self.in_flight.count < self.parallel
        service = self._run_ms(prompt_tokens, max_tokens, now, None if free else 0.0)
        return self.in_flight.hold(service, now, prefill_ms=self.prefill_ms(prompt_tokens), tokens=max_tokens)

    def predict_held(self, hold: Hold, prompt_tokens: int, max_tokens: int, now: float,
                     first_token: bool = False) -> float:
        """A reserved request's time with what is reserved now beside it (the requests reserved since
        included): in a free slot, beside the others in the batch (in_batch_ms); else after the queue it
        saw when it was reserved, in a full batch. `first_token`: to its first token."""
        queued = None if hold.others < self.parallel else hold.ahead_ms / self.parallel
        return self._run_ms(prompt_tokens, max_tokens, now, queued, hold.ticket, first_token)

    def seed(self, rates: Rates, floor_tps: float = 0.0) -> None:
        """Sets the rates a calibration measured, never below `floor_tps`; the first live request that
        measures a rate replaces its seed."""
        if rates.prefill_tps is not None:
            self.prefill_tps, self.seeded_prefill = max(rates.prefill_tps, floor_tps), True
        if rates.decode_tps is not None:
            self.decode_tps, self.seeded_decode = max(rates.decode_tps, floor_tps), True

    def observe(self, prompt_tokens: int, prompt_ms: float, decoded_tokens: int, decode_ms: float,
                batch: float = 1, elsewhere: float = 0.0, stalled_ms: float = 0.0) -> None:
        """Learns from a finished request that decoded among `batch` streams while `elsewhere` requests ran
        on other targets, its steps held `stalled_ms` by others' prompts (prefill of fewer than 8 tokens
        says little about the rate). A decode step is learned without those stalls: in_batch_ms predicts
        them on their own (counted in the step, they made a batch of two look 2.9x as slow as one stream).

        The prefill rate is learned from requests that ran alone: an engine's prompt time runs from the
        request's arrival to its first token, so in a batch it holds the other streams' steps too, and a
        rate learned there made every later lone request look slower than it was (issue 21: short requests
        predicted 20-60% too slow after a burst)."""
        batch = min(max(batch, 1), self.parallel)
        alone = batch == 1 and elsewhere < 0.5
        if prompt_tokens >= 8 and prompt_ms > 0 and (alone or self.prefill_tps is None):
            rate = prompt_tokens * 1000 / prompt_ms
            self.prefill_tps = rate if self.seeded_prefill else _ewma(self.prefill_tps, rate)
            self.seeded_prefill = False
        if decoded_tokens < 2 or decode_ms <= 0:
            return
        decode_ms = max(decode_ms - stalled_ms, decode_ms / 2)
        rate = (decoded_tokens - 1) * 1000 / decode_ms
        if self.decode_tps is None or alone:
            self.decode_tps = rate if self.seeded_decode else _ewma(self.decode_tps, rate)
            self.seeded_decode = False
        elif batch == 1:  # alone on the model, beside laasd's other work: how much slower, per request there
            cost = min(max((self.decode_tps / rate - 1) / elsewhere, 0.0), 2.0)
            self.host_cost = cost if not self.host_observed else _ewma(self.host_cost, cost)
            self.host_observed += 1
        else:  # a batched step: how much slower than a lone stream's, per extra stream
            slower = self.decode_tps / rate / (1 + self.host_cost * elsewhere)
            cost = min(max((slower - 1) / (batch - 1), 0.0), 2.0)
            self.batch_cost = cost if not self.batch_observed else _ewma(self.batch_cost, cost)
            self.batch_observed += 1


@dataclass
class RemoteEstimator:
    """Time to first token (a line over prompt tokens), inter-token time and error rate of one endpoint,
    and how the requests laasd has in flight there delay a new one.

    The first-token line is fitted by exponentially weighted least squares over (prompt tokens, ttft)
    from requests sent while nothing else was in flight: a remote server prefills long prompts for
    longer, so one average would mislead short requests. The load terms are learned from the others:

        ttft(prompt, load) = line(prompt) + queue_factor * laasd's work in flight ahead (ms)
        inter-token(load)  = inter_token_ms + itl_per_request * laasd's requests in flight there
                             + itl_per_elsewhere * laasd's requests in flight on its other targets

    A server that runs one request at a time (FIFO) shows queue_factor ~1 and no inter-token growth; one
    that batches shows queue_factor ~0 and an inter-token time growing with the batch. The last term is
    laasd's own machine, which streams every target's answers (and, in the benchmark, is the cloud's
    machine too): ~0 for an endpoint elsewhere. A LAN peer also
    advertises the wait queued on it (`advertise`), which counts what laasd sent it before the
    advertisement; the work laasd reserved there since is added to it.
    """

    ttft_ms: float = 1000.0  # the line's intercept: time to first token of a very short prompt
    inter_token_ms: float = 25.0
    prefill_ms_per_token: float = 0.0  # the line's slope
    error_rate: float = 0.0
    observed: int = 0
    # Until answers under load say otherwise, laasd's requests are assumed to run one after another there,
    # as on a llama.cpp server or a laasd peer: a burst is not all sent to one endpoint on a guess that it
    # batches. The first answer under load replaces the guess.
    queue_factor: float = 1.0
    itl_per_request: float = 0.0
    itl_per_elsewhere: float = 0.0
    elsewhere_observed: int = 0
    loaded_observed: int = 0  # observations made under load (the first replaces the 0 priors)
    advertised_ms: float = 0.0  # the wait the endpoint advertised (a discovered LAN peer)
    advertised_at: float | None = None
    in_flight: InFlight = field(default_factory=InFlight)
    _moments: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # E[x], E[y], E[xx], E[xy]

    def ttft_for(self, prompt_tokens: int) -> float:
        return self.ttft_ms + self.prefill_ms_per_token * prompt_tokens

    def wait_ms(self, now: float) -> float:
        """The wait ahead of a new request: the advertised wait still to run, plus laasd's own work reserved
        since (all of it, without an advertisement), as much of it as delays a first token."""
        advertised = 0.0
        if self.advertised_at is not None:
            advertised = max(self.advertised_ms - (now - self.advertised_at) * 1000, 0.0)
        return advertised + self.queue_factor * self.in_flight.work_ms(now, since=self.advertised_at)

    def service_ms(self, prompt_tokens: int, max_tokens: int, others: int = 0, elsewhere: float = 0.0) -> float:
        """The request's own time once the endpoint takes it, with `others` of laasd's requests beside it
        and `elsewhere` on its other targets."""
        itl = self.inter_token_ms + self.itl_per_request * others + self.itl_per_elsewhere * elsewhere
        return self.ttft_for(prompt_tokens) + max_tokens * itl

    def first_token_ms(self, prompt_tokens: int, now: float = 0.0) -> float:
        """Predicted time to the first token: the wait ahead and the endpoint's time to first token."""
        return self.wait_ms(now) + self.ttft_for(prompt_tokens)

    def predict_ms(self, prompt_tokens: int, max_tokens: int, now: float = 0.0) -> float:
        expected = self.wait_ms(now) + self.service_ms(prompt_tokens, max_tokens, self.in_flight.count,
                                                       self.in_flight.elsewhere)
        # A failing endpoint costs a timeout and a retry elsewhere: weigh it by its error rate.
        return expected * (1 + 2 * self.error_rate)

    def hold(self, prompt_tokens: int, max_tokens: int, now: float) -> Hold:
        """Reserves the request's own service time until released."""
        return self.in_flight.hold(self.service_ms(prompt_tokens, max_tokens, self.in_flight.count,
                                                   self.in_flight.elsewhere), now)

    def predict_held(self, hold: Hold, prompt_tokens: int, max_tokens: int, now: float,
                     first_token: bool = False) -> float:
        """A reserved request's time with what is reserved now beside it: the wait for the work that was
        ahead of it when it was reserved (a FIFO server does not make it wait for later ones), then its
        service beside the rest of laasd's requests there now. `first_token`: to its first token."""
        advertised = 0.0
        if self.advertised_at is not None:
            advertised = max(self.advertised_ms - (now - self.advertised_at) * 1000, 0.0)
        wait = advertised + self.queue_factor * hold.ahead_ms
        if first_token:
            return wait + self.ttft_for(prompt_tokens)
        others = max(self.in_flight.count - 1, 0)
        expected = wait + self.service_ms(prompt_tokens, max_tokens, others, self.in_flight.elsewhere)
        return expected * (1 + 2 * self.error_rate)

    def advertise(self, wait_ms: float, now: float) -> None:
        self.advertised_ms, self.advertised_at = wait_ms, now

    def observe(self, ttft_ms: float, tokens: int, decode_ms: float, prompt_tokens: int = 0,
                ahead_ms: float = 0.0, others: int = 0, elsewhere: float = 0.0) -> None:
        """Learns from a finished request, sent with `ahead_ms` of laasd's work in flight there and
        `others` of its requests beside it, while `elsewhere` ran on laasd's other targets."""
        loaded = others > 0
        if not loaded or not self.observed:
            self._fit_line(float(prompt_tokens), ttft_ms)
        if loaded and ahead_ms > 1.0:
            factor = min(max((ttft_ms - self.ttft_for(prompt_tokens)) / ahead_ms, 0.0), 1.5)
            self.queue_factor = factor if not self.loaded_observed else _ewma(self.queue_factor, factor)
        if tokens >= 2 and decode_ms > 0:
            itl = decode_ms / (tokens - 1)
            if not self.observed or (not loaded and elsewhere < 0.5):
                self.inter_token_ms = itl if not self.observed else _ewma(self.inter_token_ms, itl)
            elif not loaded:
                cost = max((itl - self.inter_token_ms) / elsewhere, 0.0)
                self.itl_per_elsewhere = cost if not self.elsewhere_observed else _ewma(self.itl_per_elsewhere, cost)
                self.elsewhere_observed += 1
            else:
                shared = self.itl_per_elsewhere * elsewhere
                growth = max((itl - self.inter_token_ms - shared) / others, 0.0)
                self.itl_per_request = growth if not self.loaded_observed else _ewma(self.itl_per_request, growth)
        self.loaded_observed += loaded
        self.error_rate = _ewma(self.error_rate, 0.0)
        self.observed += 1

    def _fit_line(self, x: float, y: float) -> None:
        new = (x, y, x * x, x * y)
        moments = new if not self.observed else tuple(
            _ewma(old, value) for old, value in zip(self._moments, new, strict=True))
        self._moments = mx, my, mxx, mxy = moments  # type: ignore[assignment]
        variance = mxx - mx * mx
        if variance > 25.0:  # prompts differ by more than a few tokens: the slope is measurable
            self.prefill_ms_per_token = max((mxy - mx * my) / variance, 0.0)
        self.ttft_ms = max(my - self.prefill_ms_per_token * mx, 0.0)

    def observe_failure(self) -> None:
        self.error_rate = _ewma(self.error_rate, 1.0)


@dataclass
class CircuitBreaker:
    """Opens after `threshold` consecutive failures; after `cooldown_s` lets one trial request through."""

    threshold: int = 3
    cooldown_s: float = 30.0
    failures: int = 0
    opened_at: float | None = None
    trial_in_flight: bool = False

    def state(self, now: float) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if now - self.opened_at >= self.cooldown_s else "open"

    def allows(self, now: float) -> bool:
        """Whether a request may be sent now (read-only: the router asks before it decides)."""
        state = self.state(now)
        return state == "closed" or (state == "half_open" and not self.trial_in_flight)

    def on_attempt(self, now: float) -> None:
        if self.state(now) == "half_open":
            self.trial_in_flight = True

    def on_success(self) -> None:
        self.failures, self.opened_at, self.trial_in_flight = 0, None, False

    def on_abandon(self) -> None:
        """The attempt ended without a verdict (the client cancelled): the trial slot is free again."""
        self.trial_in_flight = False

    def on_failure(self, now: float) -> None:
        self.failures += 1
        self.trial_in_flight = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = now  # (re)open: a failed trial restarts the cool-down
