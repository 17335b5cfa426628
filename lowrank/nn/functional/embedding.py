"""Embedding lookup, as ``torch.nn.functional.embedding``: ``y[..., :] = weight[indices[...], :]``.

Its backward scatters ``dy`` into the rows of ``dweight`` that were read,
summing over repeated indices (``docs/attention.md``). The indices are
integers, so there is no gradient with respect to them. The public kernels
check their arguments and call their ``*_core``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.nn.functional.checks import as_grad, check_cache
from lowrank.utils.validation import as_float_array

__all__ = [
    "EmbeddingCache",
    "check_indices",
    "embedding",
    "embedding_backward",
    "embedding_backward_core",
    "embedding_core",
]


@dataclass(frozen=True, slots=True)
class EmbeddingCache:
    """What :func:`embedding_backward` needs.

    Attributes
    ----------
    indices : ndarray of int of shape (...)
        The looked-up rows, referenced, not copied.
    num_embeddings, embedding_dim : int
        The table's shape.
    dtype : numpy.dtype
        The weight's dtype, that of ``dweight``.
    """

    indices: np.ndarray
    num_embeddings: int
    embedding_dim: int
    dtype: np.dtype


def check_indices(indices: Any, num_embeddings: int, name: str = "indices") -> np.ndarray:
    """Integer indices in ``[0, num_embeddings)``, as an ndarray of the same shape.

    A float or bool array (or anything else not integer) is a TypeError; an
    index out of range is a ValueError naming its position and value.
    """
    arr = np.asarray(indices)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers (token ids), got dtype {arr.dtype}")
    if arr.size:
        bad = (arr < 0) | (arr >= num_embeddings)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name} must be in [0, num_embeddings) = [0, {num_embeddings}), got {arr[where]} at index {where}"
            )
    return arr


def embedding(indices: Any, weight: Any) -> tuple[np.ndarray, EmbeddingCache]:
    """``y = weight[indices]``: one row of ``weight`` per index.

    Parameters
    ----------
    indices : ndarray of int of any shape (...)
        Each in ``[0, num_embeddings)``.
    weight : ndarray of shape (num_embeddings, embedding_dim)
        float32 or float64 (integer and bool become float64).

    Returns
    -------
    y : ndarray of shape (..., embedding_dim), weight's dtype
    cache : EmbeddingCache
    """
    weight = as_float_array(weight, "weight")
    if weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D array (num_embeddings, embedding_dim), got shape {weight.shape}")
    return embedding_core(check_indices(indices, weight.shape[0]), weight)


def embedding_core(indices: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, EmbeddingCache]:
    """:func:`embedding` without validation: integer indices in range, a 2-D float weight."""
    y = weight[indices]  # (..., D), fancy indexing makes a fresh array
    num, dim = weight.shape
    return y, EmbeddingCache(indices=indices, num_embeddings=num, embedding_dim=dim, dtype=weight.dtype)


def embedding_backward(dy: Any, cache: EmbeddingCache) -> np.ndarray:
    """``dweight[j] = Σ_{p : indices[p] = j} dy[p]``: rows scattered, repeated indices summed.

    Parameters
    ----------
    dy : ndarray of shape (..., embedding_dim)
        The upstream gradient, the output's shape.
    cache : EmbeddingCache

    Returns
    -------
    dweight : ndarray of shape (num_embeddings, embedding_dim)
        Zero in the rows no index read.
    """
    check_cache(cache, EmbeddingCache, "embedding")
    dy = as_grad(dy, (*cache.indices.shape, cache.embedding_dim), cache.dtype, "the output y")
    return embedding_backward_core(dy, cache)


def embedding_backward_core(dy: np.ndarray, cache: EmbeddingCache) -> np.ndarray:
    """:func:`embedding_backward` without validation: ``dy`` has the output's shape and dtype."""
    d = dy.shape[-1]
    dweight = np.zeros((cache.num_embeddings, d), dtype=dy.dtype)  # (V, D)
    # np.add.at is unbuffered, so repeated indices sum. It runs on the flat (V * D,) view
    # with one index per entry, rows * D + column: the same additions in the same order as
    # np.add.at(dweight, rows, dy), five times faster (measured 0.26 ms against 1.3 ms for
    # 1024 indices into (1024, 128), float32, one thread)
    rows = cache.indices.reshape(-1).astype(np.intp)  # (n,)
    flat = (rows[:, None] * d + np.arange(d)).reshape(-1)  # (n * D,)
    np.add.at(dweight.reshape(-1), flat, dy.reshape(-1))
    return dweight
