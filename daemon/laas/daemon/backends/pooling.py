"""From an encoder's hidden states to one vector per input: pooling, Matryoshka cuts, normalization.

Layer: infrastructure (numpy only; shared by every embedding engine). Pooling reads only the positions
the attention mask keeps, so padding a batch to its longest input changes no vector: batching gives the
vectors one-by-one calls give (up to float rounding in the kernels).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from laas.core.errors import InvalidArgument
from laas.core.types import ModelInfo

Floats = npt.NDArray[np.float32]


def pool(hidden: Floats, mask: npt.NDArray[np.int64], kind: str) -> Floats:
    """[batch, tokens, hidden] + [batch, tokens] mask -> [batch, hidden], as sentence-transformers pools."""
    m = mask.astype(np.float32)[:, :, None]
    if kind == "cls":
        return np.asarray(hidden[:, 0], dtype=np.float32)
    if kind == "last":
        last = mask.sum(axis=1) - 1
        return np.asarray(hidden[np.arange(len(hidden)), last], dtype=np.float32)
    if kind == "max":
        return np.asarray(np.where(m > 0, hidden, np.float32(-1e9)).max(axis=1), dtype=np.float32)
    summed = (hidden * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    if kind == "mean_sqrt_len":
        return np.asarray(summed / np.sqrt(counts), dtype=np.float32)
    return np.asarray(summed / counts, dtype=np.float32)  # mean


def finish(vectors: Floats, *, normalize: bool, dimensions: int | None) -> Floats:
    """Cuts to `dimensions` (already checked against the model) and L2-normalizes when asked; a cut
    vector is always renormalized, as Matryoshka models are trained to be used."""
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = vectors[:, :dimensions]
        normalize = True
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.clip(norms, 1e-12, None)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def check_dimensions(info: ModelInfo, dimensions: int | None, model: str) -> None:
    """`dimensions` is the model's full size, or one it was trained to be cut to; else InvalidArgument."""
    if dimensions is None or dimensions == info.embedding_dimensions:
        return
    if dimensions < 1:
        raise InvalidArgument(f"dimensions must be >= 1; got {dimensions}", field="dimensions")
    if dimensions in info.matryoshka_dimensions:
        return
    trained = ", ".join(str(d) for d in info.matryoshka_dimensions)
    raise InvalidArgument(
        f"dimensions {dimensions}: model {model!r} gives {info.embedding_dimensions}-dimensional vectors and "
        + (f"was trained to be cut only to {trained}" if trained else
           "was not trained to be cut (a cut vector of such a model loses its meaning)"),
        field="dimensions")
