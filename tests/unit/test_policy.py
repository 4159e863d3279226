"""admit: a request fits the context window whole, or the default budget is shortened, or OutOfRange."""

from __future__ import annotations

import grpc
import pytest

from laas.core.errors import LaasError, OutOfRange
from laas.router.policy import Admission, admit


def test_explicit_max_tokens_that_fits_is_granted_whole() -> None:
    assert admit(100, 50, 2048, 256) == Admission(prompt_tokens=100, max_tokens=50)


def test_explicit_max_tokens_filling_the_window_exactly() -> None:
    assert admit(100, 1948, 2048, 256) == Admission(100, 1948)


def test_default_used_when_it_fits() -> None:
    assert admit(10, None, 2048, 256) == Admission(10, 256)


def test_default_shortened_to_the_room_left() -> None:
    assert admit(2000, None, 2048, 256) == Admission(2000, 48)


def test_default_shortened_to_one_token() -> None:
    assert admit(2047, None, 2048, 256) == Admission(2047, 1)


def test_explicit_max_tokens_is_not_shortened() -> None:
    # the default is shortened, an explicit request is not: it must fit whole
    with pytest.raises(OutOfRange) as info:
        admit(2000, 49, 2048, 256)
    err = info.value
    assert err.field == "sampling.max_tokens"
    assert "2000" in str(err) and "49" in str(err) and "2048" in str(err)


def test_explicit_max_tokens_larger_than_window() -> None:
    with pytest.raises(OutOfRange) as info:
        admit(0, 4097, 4096, 256)
    assert info.value.field == "sampling.max_tokens"


@pytest.mark.parametrize("prompt_tokens", [2048, 2049, 10_000])
@pytest.mark.parametrize("requested", [None, 1, 100])
def test_prompt_alone_too_big(prompt_tokens: int, requested: int | None) -> None:
    with pytest.raises(OutOfRange) as info:
        admit(prompt_tokens, requested, 2048, 256)
    err = info.value
    assert err.field == "prompt"
    assert str(prompt_tokens) in str(err)
    assert "2048" in str(err)


def test_out_of_range_is_a_laas_error_with_its_code() -> None:
    with pytest.raises(LaasError) as info:
        admit(5000, None, 2048, 256)
    assert info.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_admission_is_frozen() -> None:
    a = admit(1, 1, 16, 8)
    with pytest.raises(AttributeError):
        a.max_tokens = 2  # type: ignore[misc]


def test_granted_budget_always_fits() -> None:
    for ctx in (16, 100, 2048):
        for prompt in range(0, ctx + 3, 7):
            for requested in (None, 1, 5, 64, 4096):
                try:
                    a = admit(prompt, requested, ctx, 32)
                except OutOfRange as e:
                    assert prompt >= ctx or (requested is not None and prompt + requested > ctx), e
                else:
                    assert a.prompt_tokens == prompt
                    assert a.max_tokens >= 1
                    assert prompt + a.max_tokens <= ctx
                    if requested is not None:
                        assert a.max_tokens == requested
                    else:
                        assert a.max_tokens == min(32, ctx - prompt)
