"""LocalEstimator, RemoteEstimator and CircuitBreaker: online estimates and the breaker's states.

Pure: every call that needs the time is given `now`; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from laas.router.latency import (
    ALPHA,
    CircuitBreaker,
    LocalEstimator,
    Rates,
    RemoteEstimator,
    calibrate_rates,
    decode_floor_tps,
)
from laas.router.load import HostLoad, InFlight

# --- LocalEstimator ----------------------------------------------------------------------------------


def test_uncalibrated_estimator_uses_conservative_defaults() -> None:
    est = LocalEstimator()
    assert not est.calibrated
    # 5 ms overhead + 100 tokens at 500 tok/s + 10 tokens at 20 tok/s
    assert est.service_ms(100, 10) == pytest.approx(5 + 200 + 500)


def test_service_time_from_the_measured_rates() -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=50.0, overhead_ms=2.0)
    assert est.calibrated
    assert est.service_ms(200, 25) == pytest.approx(2 + 200 + 500)
    assert est.service_ms(0, 0) == pytest.approx(2)


def test_prediction_with_an_empty_queue_is_the_service_time() -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=50.0)
    assert est.queue_ms(now=10.0) == 0
    assert est.predict_ms(100, 10, now=10.0) == pytest.approx(est.service_ms(100, 10))


def test_admitted_tickets_count_whole_until_they_start() -> None:
    est = LocalEstimator()
    est.in_flight.hold(300.0, now=0.0)
    est.in_flight.hold(500.0, now=0.0)
    assert est.queue_ms(now=0.0) == pytest.approx(800)
    assert est.queue_ms(now=100.0) == pytest.approx(800)  # waiting work does not shrink with time


def test_started_ticket_shrinks_as_time_passes_and_never_goes_negative() -> None:
    est = LocalEstimator()
    running = est.in_flight.hold(1000.0, now=0.0)
    est.in_flight.hold(400.0, now=0.0)
    running.start(now=50.0)
    assert est.queue_ms(now=50.0) == pytest.approx(1400)
    assert est.queue_ms(now=50.25) == pytest.approx(1150)
    assert est.queue_ms(now=50.9) == pytest.approx(500)
    assert est.queue_ms(now=52.0) == pytest.approx(400)  # overran its prediction: counts 0, not negative


def test_queue_decreases_monotonically_with_time() -> None:
    est = LocalEstimator()
    first = est.in_flight.hold(800.0, now=0.0)
    first.start(now=0.0)
    est.in_flight.hold(200.0, now=0.0)
    samples = [est.queue_ms(now=t / 10) for t in range(12)]
    assert samples == sorted(samples, reverse=True)
    assert samples[0] == pytest.approx(1000) and samples[-1] == pytest.approx(200)


def test_finished_ticket_leaves_the_queue() -> None:
    est = LocalEstimator()
    a = est.in_flight.hold(300.0, now=0.0)
    b = est.in_flight.hold(500.0, now=0.0)
    a.start(now=0.0)
    a.release()
    assert est.queue_ms(now=0.0) == pytest.approx(500)
    b.start(now=1.0)
    b.release()
    assert est.queue_ms(now=1.0) == 0


def test_holds_are_distinct_and_release_is_idempotent() -> None:
    est = LocalEstimator()
    holds = [est.in_flight.hold(1.0, now=0.0) for _ in range(5)]
    assert len({h.ticket for h in holds}) == 5
    holds[0].release()
    holds[0].release()  # twice (completion, then the router's finally): no error, counted once
    holds[0].start(now=0.0)  # a released hold does not come back
    assert est.queue_ms(now=0.0) == pytest.approx(4) and est.in_flight.count == 4


def test_prediction_includes_the_queue() -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=50.0, overhead_ms=0.0)
    est.in_flight.hold(700.0, now=0.0).start(now=0.0)
    assert est.predict_ms(100, 10, now=0.2) == pytest.approx(500 + 100 + 200)


def test_first_observation_sets_the_rates() -> None:
    est = LocalEstimator()
    est.observe(prompt_tokens=100, prompt_ms=50.0, decoded_tokens=11, decode_ms=250.0)
    assert est.prefill_tps == pytest.approx(2000)
    assert est.decode_tps == pytest.approx(40)  # 10 tokens after the first in 250 ms
    assert est.calibrated


def test_later_observations_are_an_ewma() -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=40.0)
    est.observe(prompt_tokens=100, prompt_ms=50.0, decoded_tokens=21, decode_ms=250.0)  # 2000 and 80 tok/s
    assert est.prefill_tps == pytest.approx((1 - ALPHA) * 1000 + ALPHA * 2000)
    assert est.decode_tps == pytest.approx((1 - ALPHA) * 40 + ALPHA * 80)


def test_repeated_observations_converge_to_the_new_rate() -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=40.0)
    for _ in range(30):
        est.observe(prompt_tokens=100, prompt_ms=200.0, decoded_tokens=11, decode_ms=500.0)  # 500, 20 tok/s
    assert est.prefill_tps == pytest.approx(500, rel=1e-3)
    assert est.decode_tps == pytest.approx(20, rel=1e-3)


@pytest.mark.parametrize("prompt_tokens", [0, 1, 7])
def test_tiny_prefills_are_ignored(prompt_tokens: int) -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=40.0)
    est.observe(prompt_tokens=prompt_tokens, prompt_ms=1.0, decoded_tokens=11, decode_ms=125.0)  # 80 tok/s
    assert est.prefill_tps == 1000.0
    assert est.decode_tps == pytest.approx((1 - ALPHA) * 40 + ALPHA * 80)  # the decode part still counts


def test_eight_token_prefill_counts() -> None:
    est = LocalEstimator(prefill_tps=1000.0)
    est.observe(prompt_tokens=8, prompt_ms=4.0, decoded_tokens=0, decode_ms=0.0)
    assert est.prefill_tps == pytest.approx((1 - ALPHA) * 1000 + ALPHA * 2000)


def test_degenerate_timings_are_ignored() -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=40.0)
    est.observe(prompt_tokens=100, prompt_ms=0.0, decoded_tokens=1, decode_ms=100.0)  # 1 token: no interval
    est.observe(prompt_tokens=100, prompt_ms=-1.0, decoded_tokens=10, decode_ms=0.0)
    assert (est.prefill_tps, est.decode_tps) == (1000.0, 40.0)


def test_uncalibrated_prefill_rate_is_learned_on_its_own() -> None:
    est = LocalEstimator()
    est.observe(prompt_tokens=3, prompt_ms=1.0, decoded_tokens=5, decode_ms=100.0)
    assert est.prefill_tps is None and est.decode_tps == pytest.approx(40)
    assert not est.calibrated


# --- calibration (issue 13 item 21: a disturbed start-up run fed the router rates 100x too low) -------


def _runs(*rates: Rates) -> tuple[list[int], Callable[[int], Awaitable[Rates]]]:
    calls: list[int] = []

    async def measure(attempt: int) -> Rates:
        calls.append(attempt)
        return rates[attempt - 1]

    return calls, measure


def test_the_floor_follows_the_model_size() -> None:
    assert decode_floor_tps(250_000_000) == pytest.approx(4.0)  # 1 GB/s over 250 MB of weights
    assert decode_floor_tps(90_000_000) == pytest.approx(11.1, rel=1e-2)
    assert decode_floor_tps(1_000) == 30.0  # tiny: capped


async def test_a_run_at_the_expected_speed_is_measured_once() -> None:
    calls, measure = _runs(Rates(400.0, 80.0))
    assert await calibrate_rates(measure, floor_tps=11.0) == (Rates(400.0, 80.0), 1)
    assert calls == [1]


async def test_a_run_far_below_the_floor_is_measured_again_and_the_fastest_counts() -> None:
    calls, measure = _runs(Rates(4.0, 0.8), Rates(350.0, 75.0), Rates(1.0, 1.0))
    rates, runs = await calibrate_rates(measure, floor_tps=11.0)
    assert (rates, runs, calls) == (Rates(350.0, 75.0), 2, [1, 2])


async def test_runs_that_stay_slow_stop_after_the_attempts() -> None:
    calls, measure = _runs(Rates(4.0, 0.8), Rates(None, 1.2), Rates(6.0, None))
    rates, runs = await calibrate_rates(measure, floor_tps=11.0, attempts=3)
    assert (rates, runs, calls) == (Rates(6.0, 1.2), 3, [1, 2, 3])


def test_a_seed_is_never_below_the_floor_and_the_first_live_request_replaces_it() -> None:
    est = LocalEstimator()
    est.seed(Rates(4.0, 0.8), floor_tps=11.0)  # the runs stayed 100x too slow
    assert (est.prefill_tps, est.decode_tps) == (11.0, 11.0)
    est.observe(prompt_tokens=100, prompt_ms=250.0, decoded_tokens=41, decode_ms=500.0)  # 400, 80 tok/s
    assert (est.prefill_tps, est.decode_tps) == pytest.approx((400.0, 80.0))  # one request, not a dozen
    est.observe(prompt_tokens=100, prompt_ms=500.0, decoded_tokens=41, decode_ms=1000.0)  # 200, 40 tok/s
    assert est.decode_tps == pytest.approx((1 - ALPHA) * 80 + ALPHA * 40)  # then the usual average


def test_a_seeded_rate_waits_for_a_request_that_measures_it() -> None:
    est = LocalEstimator()
    est.seed(Rates(500.0, 50.0))
    est.observe(prompt_tokens=3, prompt_ms=1.0, decoded_tokens=11, decode_ms=100.0)  # no prefill rate: 100 tok/s
    assert est.prefill_tps == 500.0 and est.decode_tps == pytest.approx(100.0)
    assert est.seeded_prefill and not est.seeded_decode


# --- RemoteEstimator ---------------------------------------------------------------------------------


def test_remote_prediction_from_the_seeds() -> None:
    est = RemoteEstimator(ttft_ms=200.0, inter_token_ms=10.0)
    assert est.predict_ms(prompt_tokens=1000, max_tokens=30) == pytest.approx(500)


def test_first_remote_observation_replaces_the_seeds() -> None:
    est = RemoteEstimator(ttft_ms=1000.0, inter_token_ms=25.0)
    est.observe(ttft_ms=80.0, tokens=11, decode_ms=50.0)
    assert (est.ttft_ms, est.observed) == (80.0, 1)
    assert est.inter_token_ms == pytest.approx(5.0)
    assert est.predict_ms(0, 20) == pytest.approx(80 + 20 * 5)


def test_later_remote_observations_are_an_ewma() -> None:
    est = RemoteEstimator()
    est.observe(ttft_ms=100.0, tokens=11, decode_ms=100.0)  # itl 10
    est.observe(ttft_ms=200.0, tokens=11, decode_ms=200.0)  # itl 20
    assert est.ttft_ms == pytest.approx((1 - ALPHA) * 100 + ALPHA * 200)
    assert est.inter_token_ms == pytest.approx((1 - ALPHA) * 10 + ALPHA * 20)
    assert est.observed == 2


def test_remote_observation_with_one_token_keeps_the_inter_token_time() -> None:
    est = RemoteEstimator(ttft_ms=1000.0, inter_token_ms=25.0)
    est.observe(ttft_ms=100.0, tokens=1, decode_ms=0.0)
    assert est.ttft_ms == 100.0 and est.inter_token_ms == 25.0


def test_errors_inflate_the_prediction() -> None:
    est = RemoteEstimator(ttft_ms=100.0, inter_token_ms=10.0)
    base = est.predict_ms(0, 10)
    est.observe_failure()
    assert est.error_rate == pytest.approx(ALPHA)
    assert est.predict_ms(0, 10) == pytest.approx(base * (1 + 2 * ALPHA))
    est.observe_failure()
    assert est.error_rate == pytest.approx(ALPHA + (1 - ALPHA) * ALPHA)
    assert est.predict_ms(0, 10) > base * (1 + 2 * ALPHA)


def test_error_rate_approaches_one_under_constant_failure() -> None:
    est = RemoteEstimator(ttft_ms=100.0, inter_token_ms=10.0)
    for _ in range(50):
        est.observe_failure()
    assert est.error_rate == pytest.approx(1.0, abs=1e-6)
    assert est.predict_ms(0, 10) == pytest.approx(3 * 200, rel=1e-6)


def test_successes_decay_the_error_rate() -> None:
    est = RemoteEstimator(ttft_ms=100.0, inter_token_ms=10.0)
    est.observe_failure()
    est.observe_failure()
    rates = [est.error_rate]
    for _ in range(20):
        est.observe(ttft_ms=100.0, tokens=11, decode_ms=100.0)
        rates.append(est.error_rate)
    assert rates == sorted(rates, reverse=True)
    assert rates[1] == pytest.approx((1 - ALPHA) * rates[0])
    assert rates[-1] < 0.01
    assert est.predict_ms(0, 10) == pytest.approx(200, rel=0.02)


def test_failures_do_not_count_as_observations() -> None:
    est = RemoteEstimator(ttft_ms=1000.0)
    est.observe_failure()
    assert est.observed == 0 and est.ttft_ms == 1000.0
    est.observe(ttft_ms=50.0, tokens=0, decode_ms=0.0)
    assert est.ttft_ms == 50.0  # still the first real measurement: it replaces the seed


# --- CircuitBreaker ----------------------------------------------------------------------------------


def test_breaker_starts_closed() -> None:
    b = CircuitBreaker(threshold=3, cooldown_s=30.0)
    assert b.state(0.0) == "closed" and b.allows(0.0)


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    b = CircuitBreaker(threshold=3, cooldown_s=30.0)
    b.on_failure(1.0)
    b.on_failure(2.0)
    assert b.state(2.0) == "closed" and b.allows(2.0)
    b.on_failure(3.0)
    assert b.state(3.0) == "open" and not b.allows(3.0)
    assert b.opened_at == 3.0


def test_a_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(threshold=3, cooldown_s=30.0)
    b.on_failure(1.0)
    b.on_failure(2.0)
    b.on_success()
    b.on_failure(3.0)
    b.on_failure(4.0)
    assert b.state(4.0) == "closed"  # not three in a row
    b.on_failure(5.0)
    assert b.state(5.0) == "open"


def test_breaker_stays_open_during_the_cooldown() -> None:
    b = CircuitBreaker(threshold=1, cooldown_s=30.0)
    b.on_failure(100.0)
    for now in (100.0, 110.0, 129.999):
        assert b.state(now) == "open" and not b.allows(now)
    assert b.state(130.0) == "half_open" and b.allows(130.0)


def test_attempts_while_closed_do_not_mark_a_trial() -> None:
    b = CircuitBreaker(threshold=2, cooldown_s=5.0)
    b.on_attempt(0.0)
    b.on_attempt(0.0)
    assert not b.trial_in_flight and b.allows(0.0)


def test_half_open_lets_exactly_one_trial_through() -> None:
    b = CircuitBreaker(threshold=1, cooldown_s=10.0)
    b.on_failure(0.0)
    assert b.allows(10.0)
    assert b.allows(10.0)  # asking is read-only
    b.on_attempt(10.0)
    assert b.trial_in_flight
    assert b.state(11.0) == "half_open"
    assert not b.allows(11.0) and not b.allows(1000.0)  # the trial is still out: nobody else


def test_successful_trial_closes_the_circuit() -> None:
    b = CircuitBreaker(threshold=2, cooldown_s=10.0)
    b.on_failure(0.0)
    b.on_failure(0.0)
    b.on_attempt(10.0)
    b.on_success()
    assert b.state(10.5) == "closed" and b.allows(10.5)
    assert (b.failures, b.opened_at, b.trial_in_flight) == (0, None, False)
    b.on_failure(11.0)
    assert b.state(11.0) == "closed"  # the count starts again from zero


def test_failed_trial_reopens_and_restarts_the_cooldown() -> None:
    b = CircuitBreaker(threshold=3, cooldown_s=10.0)
    for t in (0.0, 0.1, 0.2):
        b.on_failure(t)
    b.on_attempt(15.0)
    b.on_failure(16.0)  # one failure is enough in half-open, below the threshold
    assert not b.trial_in_flight
    assert b.opened_at == 16.0
    assert b.state(16.0) == "open" and not b.allows(25.9)
    assert b.state(26.0) == "half_open" and b.allows(26.0)


def test_failure_while_open_extends_the_cooldown() -> None:
    # a request sent before the circuit opened and failing late also pushes the next trial back
    b = CircuitBreaker(threshold=1, cooldown_s=10.0)
    b.on_failure(0.0)
    b.on_failure(5.0)
    assert b.state(12.0) == "open"
    assert b.state(15.0) == "half_open"


# --- regressions -------------------------------------------------------------------------------------


def test_remote_first_token_time_grows_with_the_prompt() -> None:
    est = RemoteEstimator()
    for prompt_tokens, ttft in [(10, 120.0), (600, 4200.0)] * 4:  # a CPU "cloud": prefill dominates
        est.observe(ttft_ms=ttft, tokens=11, decode_ms=100.0, prompt_tokens=prompt_tokens)
    assert est.prefill_ms_per_token == pytest.approx((4200 - 120) / 590, rel=0.05)
    assert est.predict_ms(10, 0) == pytest.approx(120, rel=0.1)  # short prompts are not predicted as long ones
    assert est.predict_ms(600, 0) == pytest.approx(4200, rel=0.05)


def test_a_cancelled_half_open_trial_frees_the_slot() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown_s=10)
    breaker.on_failure(now=0.0)
    breaker.on_attempt(now=11.0)
    assert not breaker.allows(now=11.0)
    breaker.on_abandon()
    assert breaker.allows(now=11.0) and breaker.state(now=11.0) == "half_open"


def test_queue_ahead_counts_each_request_once() -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=10.0, overhead_ms=0.0)
    predictions = []
    for _ in range(5):
        predictions.append(est.predict_ms(0, 10, now=0.0))
        est.hold(0, 10, now=0.0)  # as LocalTarget reserves: its own service time
    assert predictions == pytest.approx([1000, 2000, 3000, 4000, 5000])


def test_a_batching_model_queues_only_when_every_slot_is_taken() -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=10.0, overhead_ms=0.0, parallel=2)
    est.in_flight.hold(1000.0, now=0.0).start(now=0.0)
    assert est.queue_ms(now=0.0) == 0.0  # a slot is free
    est.in_flight.hold(2000.0, now=0.0).start(now=0.0)
    assert est.queue_ms(now=0.5) == pytest.approx((500.0 + 1500.0) / 2)


# --- load: in-flight counts in, predictions out (load.py and the estimators' load terms) -------------


def test_a_fifo_endpoint_learns_that_work_ahead_delays_the_first_token() -> None:
    est = RemoteEstimator(ttft_ms=100.0, inter_token_ms=10.0)
    est.observe(ttft_ms=100.0, tokens=11, decode_ms=100.0)  # alone: the line
    # sent behind 400 ms of laasd's work, it waited for all of it (a server that runs one at a time)
    est.observe(ttft_ms=500.0, tokens=11, decode_ms=100.0, ahead_ms=400.0, others=1)
    assert est.queue_factor == pytest.approx(1.0)
    assert est.itl_per_request == pytest.approx(0.0)  # its tokens came as fast as alone
    predictions = []
    for _ in range(3):
        predictions.append(est.predict_ms(0, 10, now=0.0))
        est.hold(0, 10, now=0.0)
    assert predictions == pytest.approx([200.0, 400.0, 600.0])  # each waits for those reserved before it


def test_a_batching_endpoint_learns_that_inter_token_time_grows_with_the_requests_in_flight() -> None:
    est = RemoteEstimator(ttft_ms=100.0, inter_token_ms=10.0)
    est.observe(ttft_ms=100.0, tokens=11, decode_ms=100.0)
    est.observe(ttft_ms=100.0, tokens=11, decode_ms=150.0, ahead_ms=300.0, others=1)  # beside one other
    assert est.queue_factor == pytest.approx(0.0)  # no wait: it batches
    assert est.itl_per_request == pytest.approx(5.0)  # 15 ms a token beside one: +5 ms per request
    est.hold(0, 10, now=0.0)
    est.hold(0, 10, now=0.0)
    assert est.predict_ms(0, 10, now=0.0) == pytest.approx(100 + 10 * (10 + 2 * 5))


def test_a_loaded_observation_never_moves_the_unloaded_line() -> None:
    est = RemoteEstimator(ttft_ms=100.0, inter_token_ms=10.0)
    est.observe(ttft_ms=100.0, tokens=11, decode_ms=100.0)
    est.observe(ttft_ms=2000.0, tokens=11, decode_ms=100.0, ahead_ms=1900.0, others=3)
    assert est.ttft_ms == pytest.approx(100.0) and est.inter_token_ms == pytest.approx(10.0)


def test_released_holds_leave_the_prediction_and_started_ones_shrink() -> None:
    est = RemoteEstimator(ttft_ms=100.0, inter_token_ms=10.0, queue_factor=1.0)
    alone = est.predict_ms(0, 10, now=0.0)
    a = est.hold(0, 10, now=0.0)  # 200 ms of service
    b = est.hold(0, 10, now=0.0)
    assert est.in_flight.count == 2 and est.predict_ms(0, 10, now=0.0) == pytest.approx(alone + 400)
    a.start(now=0.0)
    assert est.predict_ms(0, 10, now=0.1) == pytest.approx(alone + 100 + 200)
    a.release()
    b.release()
    assert est.in_flight.count == 0 and est.predict_ms(0, 10, now=0.1) == pytest.approx(alone)


def test_a_peer_counts_its_advertised_wait_and_what_was_sent_since() -> None:
    est = RemoteEstimator(ttft_ms=50.0, inter_token_ms=10.0, queue_factor=1.0)
    sent_before = est.hold(0, 10, now=0.0)  # 150 ms, in the peer's queue when it advertises
    est.advertise(wait_ms=600.0, now=1.0)  # its own wait (ours included)
    assert est.wait_ms(now=1.0) == pytest.approx(600.0)  # ours is not counted twice
    est.hold(0, 10, now=1.1)
    assert est.wait_ms(now=1.2) == pytest.approx(600.0 - 200.0 + 150.0)  # the wait runs down; ours adds
    sent_before.release()


def test_a_batched_decode_step_is_learned_and_predicted_with_the_batch() -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=50.0, overhead_ms=0.0, parallel=4)
    est.observe(prompt_tokens=0, prompt_ms=0.0, decoded_tokens=11, decode_ms=300.0, batch=2)  # 33 tok/s: 1.5x
    assert est.decode_tps == pytest.approx(50.0)  # the lone rate stays
    assert est.batch_cost == pytest.approx(0.5)  # the first batched answer replaces the 0 guess
    est.batch_cost = 0.5
    assert est.step_ms(1) == pytest.approx(20.0) and est.step_ms(3) == pytest.approx(40.0)
    assert est.predict_ms(0, 10, now=0.0) == pytest.approx(200.0)  # alone
    est.hold(0, 10, now=0.0).start(now=0.0)
    est.hold(0, 10, now=0.0).start(now=0.0)
    assert est.predict_ms(0, 10, now=0.0) == pytest.approx(10 * 40.0)  # the third of a batch: no wait, slower steps


def test_a_burst_spreads_over_two_fifo_targets_as_predicted() -> None:
    """Six requests decided at once, each after the others' holds: they alternate, and the predictions are
    the times a FIFO pair of servers gives them."""
    device = LocalEstimator(prefill_tps=1000.0, decode_tps=50.0, overhead_ms=0.0)  # 200 ms for 10 tokens
    cloud = RemoteEstimator(ttft_ms=60.0, inter_token_ms=20.0, queue_factor=1.0)  # 260 ms for 10 tokens
    chosen = []
    for _ in range(6):
        local, remote = device.predict_ms(0, 10, now=0.0), cloud.predict_ms(0, 10, now=0.0)
        if local <= remote:
            chosen.append(("device", local))
            device.hold(0, 10, now=0.0)
        else:
            chosen.append(("cloud", remote))
            cloud.hold(0, 10, now=0.0)
    assert [name for name, _ in chosen] == ["device", "cloud"] * 3
    assert [ms for _, ms in chosen] == pytest.approx([200.0, 260.0, 400.0, 520.0, 600.0, 780.0])


def test_the_device_learns_how_much_work_in_flight_elsewhere_slows_it() -> None:
    host = HostLoad()
    device = LocalEstimator(prefill_tps=1000.0, decode_tps=50.0, overhead_ms=0.0, in_flight=InFlight(host))
    cloud = RemoteEstimator(ttft_ms=50.0, inter_token_ms=10.0, in_flight=InFlight(host))
    assert device.predict_ms(0, 10, now=0.0) == pytest.approx(200.0)
    remote = [cloud.hold(0, 10, now=0.0) for _ in range(2)]
    assert host.count == 2 and device.in_flight.elsewhere == 2 and cloud.in_flight.elsewhere == 0
    mine = device.hold(0, 10, now=0.0)
    mine.start(now=0.0)
    assert mine.elsewhere_during() == pytest.approx(2.0)
    # decoded at 25 tok/s beside two cloud streams: each one there costs half a step more
    device.observe(0, 0.0, 11, 400.0, batch=1, elsewhere=mine.elsewhere_during())
    assert device.decode_tps == pytest.approx(50.0) and device.host_cost == pytest.approx(0.5)
    mine.release()
    assert device.predict_ms(0, 10, now=0.0) == pytest.approx(400.0)  # two still in flight there
    for hold in remote:
        hold.release()
    assert host.count == 0 and device.predict_ms(0, 10, now=0.0) == pytest.approx(200.0)


def test_a_remote_endpoint_learns_how_laasd_s_work_elsewhere_slows_its_tokens() -> None:
    host = HostLoad()
    cloud = RemoteEstimator(ttft_ms=50.0, inter_token_ms=10.0, in_flight=InFlight(host))
    device = LocalEstimator(in_flight=InFlight(host))
    cloud.observe(ttft_ms=50.0, tokens=11, decode_ms=100.0)
    cloud.observe(ttft_ms=50.0, tokens=11, decode_ms=200.0, elsewhere=2.0)  # 20 ms a token beside 2 there
    assert cloud.inter_token_ms == pytest.approx(10.0) and cloud.itl_per_elsewhere == pytest.approx(5.0)
    alone = cloud.predict_ms(0, 10, now=0.0)
    held = [device.hold(0, 10, now=0.0) for _ in range(2)]
    assert cloud.predict_ms(0, 10, now=0.0) == pytest.approx(alone + 10 * 2 * 5.0)
    for hold in held:
        hold.release()
    assert cloud.predict_ms(0, 10, now=0.0) == pytest.approx(alone)


def test_prefill_in_a_batch_or_beside_other_work_does_not_teach_the_lone_rate() -> None:
    """A prompt's time in a batch holds the other streams' steps: only a lone request says how fast the
    model prefills (else every lone request after a burst is predicted too slow)."""
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=40.0, parallel=4)
    est.observe(prompt_tokens=100, prompt_ms=400.0, decoded_tokens=11, decode_ms=500.0, batch=3)
    est.observe(prompt_tokens=100, prompt_ms=400.0, decoded_tokens=11, decode_ms=500.0, elsewhere=2)
    assert est.prefill_tps == 1000.0
    est.observe(prompt_tokens=100, prompt_ms=50.0, decoded_tokens=11, decode_ms=250.0)  # alone: 2000 tok/s
    assert est.prefill_tps == pytest.approx((1 - ALPHA) * 1000 + ALPHA * 2000)


def test_with_no_prefill_rate_yet_a_batched_request_still_gives_one() -> None:
    est = LocalEstimator(parallel=4)
    est.observe(prompt_tokens=100, prompt_ms=100.0, decoded_tokens=11, decode_ms=250.0, batch=2)
    assert est.prefill_tps == pytest.approx(1000)


def test_in_a_batch_the_shortest_finishes_first_and_the_rest_go_on_faster() -> None:
    """Processor sharing: a stream decodes among those with tokens left, not among its first batch-mates
    for its whole run (issue 21)."""
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=50.0, overhead_ms=0.0, parallel=4, batch_cost=0.5)
    short = est.hold(0, 5, now=0.0)
    long = est.hold(0, 20, now=0.0)
    assert est.predict_held(short, 0, 5, now=0.0) == pytest.approx(5 * 30.0)  # beside the long one throughout
    # 5 steps of 30 ms beside the short one, then 15 alone at 20 ms
    assert est.predict_held(long, 0, 20, now=0.0) == pytest.approx(5 * 30.0 + 15 * 20.0)
    short.start(now=0.0)
    long.start(now=0.0)
    # a started one's tokens left shrink with the share of its reserved time it has run (the short one was
    # reserved alone, for 100 ms; the long one beside it, for 450 ms)
    assert [m.tokens for m in est.in_flight.members(0.05)] == pytest.approx([5 * 0.5, 20 * 400 / 450])
    assert all(m.prefill_ms == 0.0 for m in est.in_flight.members(0.05))  # their prompts ran


def test_every_prompt_in_the_batch_holds_every_stream() -> None:
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=50.0, overhead_ms=0.0, parallel=4, batch_cost=0.5)
    est.hold(100, 10, now=0.0)  # a 100 ms prompt, not started
    # to its first token, a 20-token prompt waits for the other's as far as its own goes; by its end, for all
    assert est.first_token_ms(20, now=0.0) == pytest.approx(20 + 20 + 30)
    assert est.predict_ms(20, 10, now=0.0) == pytest.approx(20 + 100 + 10 * 30)


def test_a_decode_step_is_learned_without_the_prompts_that_held_it() -> None:
    """Another request's prompt ran while this one decoded: its time comes off the decode before the batch's
    cost is learned (counted in the step, it made a batch of two look far slower than it decodes)."""
    est = LocalEstimator(prefill_tps=1000.0, decode_tps=50.0, overhead_ms=0.0, parallel=4)
    first = est.hold(0, 10, now=0.0)
    first.start(now=0.0)
    second = est.hold(200, 10, now=0.05)  # a 200 ms prompt
    second.start(now=0.3)  # its first token: its prompt ran while the first decoded
    assert first.stalled_ms == pytest.approx(200.0) and second.stalled_ms == 0.0
    # 11 tokens in 500 ms, 200 of them the other's prompt: 300 ms for 10 steps, 1.5x a lone step, beside
    # the other for about half its run (batch 1.5): a whole lone step per extra stream (2.5x, were the
    # prompt counted: the cap, 2)
    assert first.batch_during() == pytest.approx(1.5)
    est.observe(0, 0.0, 11, 500.0, batch=first.batch_during(), stalled_ms=first.stalled_ms)
    assert est.batch_cost == pytest.approx(1.0)
    assert est.decode_tps == pytest.approx(50.0)
