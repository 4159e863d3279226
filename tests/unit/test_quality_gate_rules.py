"""The quality gate's rule, on its own: a rise above the threshold is refused unless forced."""

from __future__ import annotations

import pytest

from laas.exporters.errors import QualityGateFailed
from laas.exporters.evaluate import Evaluation
from laas.exporters.package import check_gate


def _eval(perplexity: float, reference: float | None = 10.0) -> Evaluation:
    return Evaluation(perplexity=perplexity, tokens=100, size_bytes=1, decode_tokens_per_second=1.0,
                      time_to_first_token_ms=1.0, reference="ref" if reference else None,
                      reference_perplexity=reference, top1_agreement=0.9 if reference else None)


def test_within_the_threshold_passes() -> None:
    check_gate("m", _eval(10.99))  # +9.9%
    check_gate("m", _eval(9.0))  # better than the reference
    check_gate("m", _eval(50.0, reference=None))  # nothing to compare with: the fp32 reference itself


def test_above_the_threshold_is_refused_with_the_numbers() -> None:
    with pytest.raises(QualityGateFailed, match=r"perplexity 11\.200 is \+12\.0% over the fp32 reference"):
        check_gate("m", _eval(11.2))


def test_threshold_is_configurable_and_force_overrides() -> None:
    check_gate("m", _eval(11.2), threshold=0.15)
    with pytest.raises(QualityGateFailed):
        check_gate("m", _eval(10.2), threshold=0.01)
    check_gate("m", _eval(30.0), force=True)
