"""Per-token log-probabilities, as the request's sampling transforms shape the distribution.

Layer: domain (pure; numpy only). Both engines call :func:`token_logprob` with a step's logits (already
masked by the constraint, when there is one) and the token they chose; only requests that ask for
logprobs pay for it. The transforms follow sampling.py (and llama.cpp's chain): top_k -> top_p -> min_p
(judged at temperature 1) -> temperature; the chosen token's log-probability is its share of what is
left. Greedy decoding (temperature 0) reports the model's own distribution (temperature 1, nothing cut),
as OpenAI does, so the figures are the model's scores. Repetition penalties are not reflected.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from laas.core.types import SamplingParams, TokenLogprob

MAX_TOP_LOGPROBS = 20

Floats = npt.NDArray[np.float64]


def _log_softmax(values: Floats) -> Floats:
    top = values.max()
    shifted = values - top
    result: Floats = shifted - np.log(np.exp(shifted).sum())
    return result


def distribution(logits: npt.NDArray[np.float32], params: SamplingParams) -> tuple[npt.NDArray[np.int64], Floats]:
    """The tokens the request may draw from and their log-probabilities, most likely first."""
    x = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(x)
    n_finite = int(finite.sum())
    if params.temperature <= 0:
        ids = np.flatnonzero(finite)
        values = _log_softmax(x[ids])
        order = np.argsort(-values, kind="stable")
        return ids[order], values[order]
    if 0 < params.top_k < n_finite:
        ids = np.argpartition(-np.where(finite, x, -np.inf), params.top_k - 1)[: params.top_k]
    else:
        ids = np.flatnonzero(finite)
    values = x[ids]
    order = np.argsort(-values, kind="stable")
    ids, values = ids[order], values[order]
    probs = np.exp(_log_softmax(values))
    keep = len(ids)
    if params.top_p < 1.0:
        keep = min(keep, int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1)
    if params.min_p > 0.0:
        keep = min(keep, max(1, int(np.count_nonzero(probs[:keep] >= params.min_p * probs[0]))))
    ids, values = ids[:keep], values[:keep]
    return ids, _log_softmax(values / params.temperature)


def token_logprob(logits: npt.NDArray[np.float32], token: int, params: SamplingParams,
                  text_of: Callable[[int], str]) -> TokenLogprob:
    """The chosen token's entry: its log-probability and the request's top_logprobs alternatives."""
    ids, values = distribution(logits, params)
    where = np.flatnonzero(ids == token)
    # A token outside what the transforms keep (a penalty moved it in): -inf, as its share is none.
    chosen = float(values[where[0]]) if len(where) else float("-inf")
    n = min(params.top_logprobs, MAX_TOP_LOGPROBS, len(ids))
    top = tuple(TokenLogprob(int(i), text_of(int(i)), float(v)) for i, v in zip(ids[:n], values[:n], strict=True))
    return TokenLogprob(token, text_of(token), chosen, top)
