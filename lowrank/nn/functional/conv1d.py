"""transformers' Conv1D: a linear layer with its weight stored transposed, ``y = x @ weight + bias``.

GPT-2 (and transformers' ``pytorch_utils.Conv1D``) keeps the weight as
``(in_features, out_features)``, the transpose of ``nn.Linear``'s; the maths
is a linear layer's (``docs/lora.md``), only the layout differs. The public
kernels check their arguments and call their ``*_core``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.nn.functional.checks import as_grad, as_input, as_param, check_cache
from lowrank.nn.functional.dense import LinearGrads
from lowrank.utils.validation import check_bool

__all__ = [
    "Conv1DCache",
    "conv1d",
    "conv1d_backward",
    "conv1d_backward_core",
    "conv1d_core",
]


@dataclass(frozen=True, slots=True)
class Conv1DCache:
    """What :func:`conv1d_backward` needs.

    Attributes
    ----------
    x : ndarray of shape (N, in_features)
        The input with its batch dimensions flattened (a view when possible).
    weight : ndarray of shape (in_features, out_features)
        The caller's weight, referenced, not copied.
    has_bias : bool
    batch_shape : tuple of int
        The leading dimensions of the input, restored on ``dx``.
    """

    x: np.ndarray
    weight: np.ndarray
    has_bias: bool
    batch_shape: tuple[int, ...]


def conv1d(x: Any, weight: Any, bias: Any = None) -> tuple[np.ndarray, Conv1DCache]:
    """``y = x @ weight + bias``, transformers' ``Conv1D`` (weight stored ``(in, out)``).

    Parameters
    ----------
    x : ndarray of shape (..., in_features)
    weight : ndarray of shape (in_features, out_features)
        Same dtype as ``x``.
    bias : ndarray of shape (out_features,), optional

    Returns
    -------
    y : ndarray of shape (..., out_features)
    cache : Conv1DCache
    """
    x = as_input(x)
    weight = as_param(weight, "weight", x.dtype)
    if weight.ndim != 2 or weight.size == 0:
        raise ValueError(
            f"weight must be a non-empty 2-D array of shape (in_features, out_features), got shape {weight.shape}"
        )
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"x of shape {x.shape} does not fit weight of shape {weight.shape}: "
            f"x's last dimension must be in_features = weight.shape[0] = {weight.shape[0]}"
        )
    if bias is not None:
        bias = as_param(bias, "bias", x.dtype)
        if bias.shape != (weight.shape[1],):
            raise ValueError(
                f"bias must have shape (out_features,) = ({weight.shape[1]},) to fit weight of shape "
                f"{weight.shape}, got shape {bias.shape}"
            )
    return conv1d_core(x, weight, bias)


def conv1d_core(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, Conv1DCache]:
    """:func:`conv1d` without validation: the caller guarantees shapes and dtypes."""
    in_features, out_features = weight.shape
    batch_shape = x.shape[:-1]
    x2 = x.reshape(math.prod(batch_shape), in_features)  # (N, in)
    y = x2 @ weight  # (N, out)
    if bias is not None:
        y += bias  # in place: no second (N, out) array
    cache = Conv1DCache(x=x2, weight=weight, has_bias=bias is not None, batch_shape=batch_shape)
    return y.reshape(*batch_shape, out_features), cache


def conv1d_backward(dy: Any, cache: Conv1DCache, *, trainable: bool = True) -> LinearGrads:
    """Gradients of :func:`conv1d`: ``dx = dy @ weight.T``; ``dweight = x.T @ dy``, ``dbias = Σ_batch dy``.

    The linear layer's rule (``dW = dy.T @ x``) with the weight transposed.
    With ``trainable=False`` the weight and bias gradients are not computed.

    Parameters
    ----------
    dy : ndarray of shape (..., out_features)
    cache : Conv1DCache
    trainable : bool, default True

    Returns
    -------
    LinearGrads
        ``.x`` of shape (..., in_features), ``.weight`` (in_features,
        out_features) or None, ``.bias`` (out_features,) or None.
    """
    check_cache(cache, Conv1DCache, "conv1d")
    trainable = check_bool(trainable, "trainable")
    dy = as_grad(dy, (*cache.batch_shape, cache.weight.shape[1]), cache.x.dtype, "the output y")
    return conv1d_backward_core(dy, cache, trainable=trainable)


def conv1d_backward_core(dy: np.ndarray, cache: Conv1DCache, *, trainable: bool = True) -> LinearGrads:
    """:func:`conv1d_backward` without validation: ``dy`` has the output's shape and dtype."""
    x, W = cache.x, cache.weight
    in_features, out_features = W.shape
    dy = dy.reshape(x.shape[0], out_features)  # (N, out)
    dx = (dy @ W.T).reshape(*cache.batch_shape, in_features)  # (..., in)
    if not trainable:
        return LinearGrads(x=dx, weight=None, bias=None)
    dW = x.T @ dy  # (in, out)
    db = dy.sum(axis=0) if cache.has_bias else None  # (out,)
    return LinearGrads(x=dx, weight=dW, bias=db)
