"""Token sampling over a logits vector, in numpy, with llama.cpp's parameters and order.

Layer: domain (pure; numpy only). Engines that get raw logits from their runtime (the ONNX engine) use
this so a request means the same on every engine. The chain follows llama-cpp-python's: penalties ->
top_k -> top_p -> min_p -> temperature -> draw; temperature 0 is greedy (after penalties). Penalties
look at the last `penalty_last_n` tokens of the context (prompt and output), as llama.cpp's do.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from laas.core.types import SamplingParams

PENALTY_LAST_N = 64

Logits = npt.NDArray[np.float32]


class Sampler:
    """One request's sampler: holds its random generator and the recent tokens the penalties see."""

    def __init__(self, params: SamplingParams, context: Iterable[int] = (), *,
                 penalty_last_n: int = PENALTY_LAST_N) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        self._recent: deque[int] = deque(context, maxlen=penalty_last_n)

    def accept(self, token: int) -> None:
        self._recent.append(token)

    def sample(self, logits: Logits) -> int:
        p = self.params
        logits = self._penalize(logits)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        ids = np.arange(logits.shape[0])
        if 0 < p.top_k < logits.shape[0]:
            ids = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
        values = logits[ids].astype(np.float64)
        order = np.argsort(-values, kind="stable")
        ids, values = ids[order], values[order]
        probs = _softmax(values)
        keep = len(ids)
        if p.top_p < 1.0:
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0.0:
            keep = min(keep, max(1, int(np.count_nonzero(probs[:keep] >= p.min_p * probs[0]))))
        ids, values = ids[:keep], values[:keep]
        probs = _softmax(values / p.temperature)
        return int(ids[self._rng.choice(len(ids), p=probs)])

    def _penalize(self, logits: Logits) -> Logits:
        p = self.params
        if not self._recent or (p.repeat_penalty == 1.0 and p.presence_penalty == 0.0
                                and p.frequency_penalty == 0.0):
            return logits
        logits = logits.copy()
        counts = Counter(self._recent)
        ids = np.fromiter(counts, dtype=np.int64)
        n = np.fromiter(counts.values(), dtype=np.float32)
        values: npt.NDArray[np.floating[Any]] = logits[ids]
        if p.repeat_penalty != 1.0:
            values = np.where(values > 0, values / p.repeat_penalty, values * p.repeat_penalty)
        values = values - n * p.frequency_penalty - p.presence_penalty
        logits[ids] = values
        return logits


def _softmax(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    e = np.exp(values - values.max())
    result: npt.NDArray[np.float64] = e / e.sum()
    return result
