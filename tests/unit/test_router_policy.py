"""policy.choose: every rule of its docstring, on hand-made estimates (pure: no daemon, no clock)."""

from __future__ import annotations

import pytest

from laas.core.errors import InvalidArgument, LaasError, OutOfRange, Unavailable
from laas.router.policy import Decision, Estimate, Policy, Query, TargetKind, choose

CTX = 512  # the device's window in these tests; the remotes have 8192


def device(predicted_ms: float = 100.0, *, available: bool = True, context_length: int = CTX,
           name: str = "device") -> Estimate:
    return Estimate(name, TargetKind.LOCAL, context_length, available, predicted_ms,
                    "" if available else "model is loading")


def cloud(predicted_ms: float = 300.0, *, name: str = "cloud", available: bool = True,
          context_length: int = 8192, kind: TargetKind = TargetKind.CLOUD) -> Estimate:
    return Estimate(name, kind, context_length, available, predicted_ms,
                    "" if available else "circuit open after 3 failures; next try in 20s")


def query(prompt_tokens: int = 20, max_tokens: int | None = 16, *, policy: Policy = Policy.AUTO,
          budget_ms: float | None = None, default_max_tokens: int = 256) -> Query:
    return Query(prompt_tokens, max_tokens, default_max_tokens, policy, budget_ms)


def order(decision: Decision) -> list[str]:
    return [e.target for e in decision.order]


def judged(decision: Decision, target: str) -> tuple[bool, bool, str, str]:
    j = next(j for j in decision.judged if j.estimate.target == target)
    return j.eligible, j.meets_deadline, j.why, j.note


# --- AUTO without a budget (rule 3) ------------------------------------------------------------------


def test_no_budget_device_fits_goes_to_the_device_even_when_slower() -> None:
    d = choose(query(), [device(5000), cloud(50)])
    assert order(d) == ["device", "cloud"]
    assert d.chosen.kind is TargetKind.LOCAL
    assert d.reason == "the device fits the request"


def test_no_budget_oversized_goes_to_the_fastest_remote() -> None:
    d = choose(query(600, 16), [device(10), cloud(900, name="slow"), cloud(400, name="fast")])
    assert order(d) == ["fast", "slow"]
    assert d.chosen.target == "fast"
    assert "needs 616 tokens of context, has 512" in d.reason
    assert "fast" in d.reason


def test_no_budget_oversized_by_max_tokens_alone_goes_remote() -> None:
    d = choose(query(100, 500), [device(10), cloud(900)])
    assert d.chosen.target == "cloud"
    assert judged(d, "device")[:3] == (False, True, "context")


def test_no_budget_oversized_reason_names_the_fastest_remote_not_a_deadline() -> None:
    d = choose(query(600, 16), [device(10), cloud(400)])
    assert d.reason == "the device cannot take it (needs 616 tokens of context, has 512); " \
                       "cloud is the fastest remote target"


def test_model_not_on_the_device_goes_remote() -> None:
    d = choose(query(), [cloud(300)])
    assert order(d) == ["cloud"]
    assert "the model is not on the device" in d.reason


def test_exact_fit_of_the_context_window_stays_on_the_device() -> None:
    d = choose(query(496, 16), [device(), cloud()])
    assert d.chosen.target == "device"
    d = choose(query(497, 16), [device(), cloud()])
    assert d.chosen.target == "cloud"


# --- AUTO with a budget (rule 2) ---------------------------------------------------------------------


def test_device_meets_the_deadline_goes_to_the_device_even_when_the_cloud_is_faster() -> None:
    d = choose(query(budget_ms=1000), [device(900), cloud(100)])
    assert order(d) == ["device", "cloud"]
    assert d.reason == "the device meets the deadline"
    assert judged(d, "device") == (True, True, "", "meets the deadline")


def test_device_exactly_at_the_budget_meets_it() -> None:
    d = choose(query(budget_ms=900), [device(900), cloud(100)])
    assert d.chosen.target == "device"


def test_device_too_slow_goes_to_the_fastest_target_that_meets() -> None:
    d = choose(query(budget_ms=1000), [device(3000), cloud(800, name="a"), cloud(400, name="b")])
    assert d.chosen.target == "b"
    assert order(d) == ["b", "a", "device"]
    assert "3000 ms, over the 1000 ms deadline" in d.reason
    assert "b is the fastest that meets it" in d.reason
    assert judged(d, "device")[:2] == (True, False)


def test_device_too_slow_only_one_remote_meets() -> None:
    d = choose(query(budget_ms=1000), [device(3000), cloud(1200, name="a"), cloud(950, name="b")])
    assert d.chosen.target == "b"
    assert order(d) == ["b", "a", "device"]


def test_nothing_meets_the_deadline_goes_to_the_fastest_with_that_reason() -> None:
    d = choose(query(budget_ms=100), [device(3000), cloud(800, name="a"), cloud(400, name="b")])
    assert d.chosen.target == "b"
    assert order(d) == ["b", "a", "device"]
    assert d.reason == "no target meets the 100 ms deadline; b is the fastest"


def test_nothing_meets_and_the_device_is_fastest_goes_to_the_device() -> None:
    d = choose(query(budget_ms=100), [device(200), cloud(800)])
    assert d.chosen.target == "device"
    assert d.reason == "no target meets the 100 ms deadline; device is the fastest"


def test_oversized_with_a_budget_goes_remote_even_if_the_device_would_be_fast() -> None:
    d = choose(query(600, 16, budget_ms=5000), [device(10), cloud(400)])
    assert order(d) == ["cloud"]
    assert "the device cannot take it (needs 616 tokens of context, has 512)" in d.reason


def test_oversized_with_a_budget_nobody_meets() -> None:
    d = choose(query(600, 16, budget_ms=50), [device(10), cloud(400)])
    assert d.chosen.target == "cloud"
    assert d.reason == "no target meets the 50 ms deadline; cloud is the fastest"


def test_unavailable_device_is_skipped() -> None:
    d = choose(query(budget_ms=1000), [device(10, available=False), cloud(400)])
    assert order(d) == ["cloud"]
    assert judged(d, "device") == (False, True, "unavailable", "model is loading")
    assert "model is loading" in d.reason


def test_open_circuit_remote_is_skipped() -> None:
    d = choose(query(budget_ms=100), [device(3000), cloud(50, available=False)])
    assert order(d) == ["device"]
    assert judged(d, "cloud")[2] == "unavailable"
    assert "circuit open" in judged(d, "cloud")[3]


def test_peer_is_a_remote_target_like_the_cloud() -> None:
    d = choose(query(budget_ms=500), [device(3000), cloud(450, name="peer", kind=TargetKind.PEER), cloud(700)])
    assert order(d) == ["peer", "cloud", "device"]


# --- LOCAL_ONLY, CLOUD_ONLY, PREFER_LOCAL (rule 1 and 3) ----------------------------------------------


def test_local_only_keeps_the_device_even_when_it_misses_the_deadline() -> None:
    d = choose(query(policy=Policy.LOCAL_ONLY, budget_ms=100), [device(3000), cloud(50)])
    assert order(d) == ["device"]
    assert d.reason == "no target meets the 100 ms deadline; device is the fastest"
    eligible, _, why, note = judged(d, "cloud")
    assert (eligible, why) == (False, "policy") and "LOCAL_ONLY" in note


def test_local_only_without_budget() -> None:
    d = choose(query(policy=Policy.LOCAL_ONLY), [device(3000), cloud(50)])
    assert order(d) == ["device"]
    assert d.reason == "the device fits the request"


def test_cloud_only_never_uses_the_device() -> None:
    d = choose(query(policy=Policy.CLOUD_ONLY, budget_ms=1000), [device(10), cloud(900, name="a"),
                                                                  cloud(300, name="b")])
    assert order(d) == ["b", "a"]
    eligible, _, why, note = judged(d, "device")
    assert (eligible, why) == (False, "policy") and "CLOUD_ONLY" in note
    assert "CLOUD_ONLY" in d.reason


def test_cloud_only_without_budget_goes_to_the_fastest_remote() -> None:
    d = choose(query(policy=Policy.CLOUD_ONLY), [device(10), cloud(900, name="a"), cloud(300, name="b")])
    assert order(d) == ["b", "a"]


def test_cloud_only_nothing_meets_the_deadline() -> None:
    d = choose(query(policy=Policy.CLOUD_ONLY, budget_ms=100), [device(10), cloud(900)])
    assert order(d) == ["cloud"]
    assert d.reason == "no target meets the 100 ms deadline; cloud is the fastest"


def test_prefer_local_with_a_budget_keeps_the_device_even_when_it_misses() -> None:
    d = choose(query(policy=Policy.PREFER_LOCAL, budget_ms=100), [device(3000), cloud(50)])
    assert order(d) == ["device", "cloud"]
    assert d.reason == "PREFER_LOCAL: the device fits"


def test_prefer_local_with_a_budget_the_device_meets() -> None:
    d = choose(query(policy=Policy.PREFER_LOCAL, budget_ms=5000), [device(3000), cloud(50)])
    assert order(d) == ["device", "cloud"]
    assert d.reason == "the device meets the deadline"


def test_prefer_local_without_budget() -> None:
    d = choose(query(policy=Policy.PREFER_LOCAL), [device(3000), cloud(50)])
    assert order(d) == ["device", "cloud"]
    assert d.reason == "the device fits the request"


def test_prefer_local_oversized_goes_remote() -> None:
    d = choose(query(600, 16, policy=Policy.PREFER_LOCAL, budget_ms=100), [device(10), cloud(900)])
    assert order(d) == ["cloud"]


# --- unset max_tokens --------------------------------------------------------------------------------


def test_unset_max_tokens_is_shortened_on_the_device() -> None:
    # 500 prompt tokens leave 12 of the device's 512; the default 256 is shortened, so the device fits.
    d = choose(query(500, None), [device(), cloud()])
    assert d.chosen.target == "device"
    assert judged(d, "device")[0]


def test_unset_max_tokens_needs_one_token_of_room_on_the_device() -> None:
    d = choose(query(511, None), [device(), cloud()])
    assert d.chosen.target == "device"
    d = choose(query(512, None), [device(), cloud()])
    assert order(d) == ["cloud"]
    assert "needs 513 tokens of context, has 512" in judged(d, "device")[3]


def test_unset_max_tokens_is_not_shortened_on_a_remote() -> None:
    # the remote gets the whole default: 8000 + 256 > 8192
    d = choose(query(8000, None), [device(context_length=16384), cloud()])
    assert order(d) == ["device"]
    assert judged(d, "cloud")[:3] == (False, True, "context")
    assert "needs 8256 tokens of context, has 8192" in judged(d, "cloud")[3]


def test_explicit_max_tokens_is_not_shortened_on_the_device() -> None:
    d = choose(query(500, 13), [device(), cloud()])
    assert order(d) == ["cloud"]


# --- failover order ----------------------------------------------------------------------------------


def test_failovers_follow_predicted_latency() -> None:
    estimates = [device(700), cloud(900, name="c"), cloud(300, name="a"), cloud(500, name="b")]
    d = choose(query(), estimates)  # no budget: the device first, then the rest by speed
    assert order(d) == ["device", "a", "b", "c"]
    d = choose(query(budget_ms=400), estimates)
    assert order(d) == ["a", "b", "device", "c"]


def test_the_device_goes_first_among_equal_predictions() -> None:
    estimates = [cloud(400, name="a"), device(400), cloud(400, name="b")]
    d = choose(query(budget_ms=100), estimates)  # nothing meets: the fastest, the device among ties
    assert order(d) == ["device", "a", "b"]
    d = choose(query(budget_ms=500), [cloud(100, name="x"), *estimates])
    assert order(d) == ["device", "x", "a", "b"]  # the device meets: route; then by speed
    d = choose(query(budget_ms=200), [cloud(100, name="x"), *estimates])
    assert order(d) == ["x", "device", "a", "b"]  # the device misses: x routes; the device leads the ties


def test_ineligible_targets_are_not_failovers() -> None:
    d = choose(query(), [device(), cloud(100, name="down", available=False), cloud(200, name="small",
                                                                                  context_length=16)])
    assert order(d) == ["device"]
    assert judged(d, "small")[2] == "context"
    assert judged(d, "down")[2] == "unavailable"


def test_every_candidate_is_judged_in_input_order() -> None:
    estimates = [cloud(name="a"), device(), cloud(name="b")]
    d = choose(query(), estimates)
    assert [j.estimate for j in d.judged] == estimates


# --- errors ------------------------------------------------------------------------------------------


def test_prompt_beyond_every_window_is_out_of_range_on_prompt() -> None:
    with pytest.raises(OutOfRange) as info:
        choose(query(9000, 16), [device(), cloud()])
    assert info.value.field == "prompt"
    assert "needs 9016 tokens of context, has 512" in str(info.value)


def test_prompt_beyond_the_window_with_unset_max_tokens_is_out_of_range_on_prompt() -> None:
    with pytest.raises(OutOfRange) as info:
        choose(query(600, None), [device()])
    assert info.value.field == "prompt"


def test_max_tokens_beyond_every_window_is_out_of_range_on_max_tokens() -> None:
    with pytest.raises(OutOfRange) as info:
        choose(query(100, 9000), [device(), cloud()])
    assert info.value.field == "sampling.max_tokens"


def test_local_only_oversized_prompt_is_out_of_range_on_prompt() -> None:
    with pytest.raises(OutOfRange) as info:
        choose(query(600, 16, policy=Policy.LOCAL_ONLY), [device(), cloud()])
    assert info.value.field == "prompt"


def test_local_only_oversized_max_tokens_is_out_of_range_on_max_tokens() -> None:
    with pytest.raises(OutOfRange) as info:
        choose(query(100, 500, policy=Policy.LOCAL_ONLY), [device(), cloud()])
    assert info.value.field == "sampling.max_tokens"


def test_unavailable_when_the_target_that_would_fit_is_down() -> None:
    with pytest.raises(Unavailable) as info:
        choose(query(600, 16), [device(), cloud(available=False)])
    assert not isinstance(info.value, OutOfRange)
    assert "circuit open" in str(info.value)


def test_unavailable_when_the_only_target_is_down() -> None:
    with pytest.raises(Unavailable):
        choose(query(), [device(available=False)])
    with pytest.raises(Unavailable):
        choose(query(policy=Policy.LOCAL_ONLY), [device(available=False), cloud()])
    with pytest.raises(Unavailable):
        choose(query(policy=Policy.CLOUD_ONLY), [device(), cloud(available=False)])


def test_out_of_range_when_the_target_that_is_down_would_not_fit_either() -> None:
    with pytest.raises(OutOfRange) as info:
        choose(query(600, 16), [device(), cloud(available=False, context_length=256)])
    assert info.value.field == "prompt"


def test_no_target_at_all_is_unavailable() -> None:
    with pytest.raises(Unavailable) as info:
        choose(query(), [])
    assert "no target serves this model" in str(info.value)


@pytest.mark.parametrize(("policy", "estimates"), [
    (Policy.LOCAL_ONLY, [cloud()]),
    (Policy.CLOUD_ONLY, [device()]),
])
def test_policy_excluding_every_target_is_invalid_argument(policy: Policy, estimates: list[Estimate]) -> None:
    with pytest.raises(InvalidArgument) as info:
        choose(query(policy=policy), estimates)
    assert info.value.field == "routing.policy"


def test_errors_are_laas_errors_with_their_codes() -> None:
    import grpc

    cases: list[tuple[Query, list[Estimate], grpc.StatusCode]] = [
        (query(9000, 16), [device()], grpc.StatusCode.OUT_OF_RANGE),
        (query(600, 16), [device(), cloud(available=False)], grpc.StatusCode.UNAVAILABLE),
        (query(policy=Policy.CLOUD_ONLY), [device()], grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for q, estimates, code in cases:
        with pytest.raises(LaasError) as info:
            choose(q, estimates)
        assert info.value.code == code


def test_choose_is_pure() -> None:
    estimates = [device(3000), cloud(400)]
    q = query(budget_ms=1000)
    assert choose(q, estimates) == choose(q, list(estimates))
    assert estimates == [device(3000), cloud(400)]
