"""Dropout: the one mask builder, and the dropout kernel pair.

:func:`dropout_mask` is the only place a dropout mask is drawn; the
functional kernels take the mask explicitly, so that the forward and the
backward pass use the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.nn.functional.checks import as_grad, as_mask, check_cache
from lowrank.utils.validation import (
    RandomState,
    as_float_array,
    check_float_dtype,
    check_int,
    check_random_state,
    check_real,
)

__all__ = ["DropoutCache", "dropout", "dropout_backward", "dropout_backward_core", "dropout_core", "dropout_mask"]


@dataclass(frozen=True, slots=True)
class DropoutCache:
    """The mask of :func:`dropout` and the shape of its input."""

    mask: np.ndarray
    shape: tuple[int, ...]


def dropout_mask(
    shape: int | tuple[int, ...],
    p: float,
    random_state: RandomState = None,
    dtype: Any = np.float64,
) -> np.ndarray:
    """An inverted-dropout mask: each entry is 0 with probability ``p``, else ``1/(1-p)``.

    The kept entries are scaled so that the mask's expectation is 1 and the
    layer needs no rescaling in eval mode. The draw does not depend on
    ``dtype``: the same ``random_state`` gives the same pattern in float32 and
    float64.

    Parameters
    ----------
    shape : int or tuple of int
    p : float in [0, 1)
        Drop probability.
    random_state : None, int or numpy.random.Generator
    dtype : float32 or float64, default float64

    Returns
    -------
    mask : ndarray of the given shape and dtype
    """
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    if not isinstance(shape, tuple):
        raise TypeError(f"shape must be an int or a tuple of ints, got {type(shape).__name__} {shape!r}")
    shape = tuple(check_int(s, "every entry of shape", low=0) for s in shape)
    p = check_real(p, "p", 0.0, 1.0, high_open=True)
    dtype = check_float_dtype(dtype)
    rng = check_random_state(random_state)
    keep = rng.random(shape) >= p  # True with probability 1 - p
    mask = keep.astype(dtype)
    mask *= 1.0 / (1.0 - p)
    return mask


def dropout(x: Any, mask: Any) -> tuple[np.ndarray, DropoutCache]:
    """``y = x * mask`` with a mask from :func:`dropout_mask` (eval mode: do not call it).

    Parameters
    ----------
    x : ndarray of any shape
    mask : ndarray broadcastable to x's shape
        Cast to ``x``'s dtype.

    Returns
    -------
    y : ndarray of x's shape
    cache : DropoutCache
    """
    x = as_float_array(x, "x")
    if np.ndim(mask) == 0 and not isinstance(mask, (str, bytes)):
        # torch.nn.functional.dropout(x, p) takes a probability; here a number would just scale x
        raise TypeError(
            f"mask must be an array from dropout_mask(x.shape, p), not a number (got {mask!r}): "
            f"unlike torch.nn.functional.dropout(x, p), dropout takes the mask itself"
        )
    return dropout_core(x, as_mask(mask, x, "mask"))


def dropout_core(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, DropoutCache]:
    """:func:`dropout` without validation: ``mask`` broadcasts to ``x``'s shape and has its dtype."""
    return x * mask, DropoutCache(mask=mask, shape=x.shape)


def dropout_backward(dy: Any, cache: DropoutCache) -> np.ndarray:
    """``dx = dy * mask``."""
    check_cache(cache, DropoutCache, "dropout")
    return dropout_backward_core(as_grad(dy, cache.shape, cache.mask.dtype, "x"), cache)


def dropout_backward_core(dy: np.ndarray, cache: DropoutCache) -> np.ndarray:
    """:func:`dropout_backward` without validation: ``dy`` has ``x``'s shape and dtype."""
    return dy * cache.mask
