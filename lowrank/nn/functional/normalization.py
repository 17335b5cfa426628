"""Layer normalization over the last axis, as ``torch.nn.functional.layer_norm``.

Symbols as in ``docs/attention.md``: for each row ``x`` of length ``D``,
``mu = mean(x)``, ``var = mean((x - mu)**2)`` (the *biased* variance, PyTorch's),
``rstd = 1 / sqrt(var + eps)``, ``xhat = (x - mu) * rstd`` and
``y = xhat * weight + bias``. The public kernels check their arguments and
call their ``*_core``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.nn.functional.checks import as_grad, as_input, as_param, check_cache
from lowrank.utils.validation import check_bool, check_real

__all__ = [
    "LayerNormCache",
    "LayerNormGrads",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_backward_core",
    "layer_norm_core",
]


@dataclass(frozen=True, slots=True)
class LayerNormCache:
    """What :func:`layer_norm_backward` needs.

    Attributes
    ----------
    xhat : ndarray of shape (..., D)
        The normalized input ``(x - mu) * rstd``.
    rstd : ndarray of shape (..., 1)
        ``1 / sqrt(var + eps)`` of each row.
    weight : ndarray of shape (D,) or None
        The caller's weight, referenced, not copied.
    has_bias : bool
    """

    xhat: np.ndarray
    rstd: np.ndarray
    weight: np.ndarray | None
    has_bias: bool


@dataclass(frozen=True, slots=True)
class LayerNormGrads:
    """Gradients of a layer norm; ``weight``/``bias`` are None when absent or not computed."""

    x: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None


def layer_norm(x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> tuple[np.ndarray, LayerNormCache]:
    """``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last axis.

    ``var`` is the biased variance (divided by ``D``), as in PyTorch.

    Parameters
    ----------
    x : ndarray of shape (..., D)
    weight, bias : ndarray of shape (D,), optional
        Same dtype as ``x``; None means 1 and 0.
    eps : float, default 1e-5
        Added to the variance; must be > 0.

    Returns
    -------
    y : ndarray of x's shape
    cache : LayerNormCache
    """
    x = as_input(x)
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"x must have a non-empty last axis to normalize over, got shape {x.shape}")
    params = []
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            value = as_param(value, name, x.dtype)
            if value.shape != (d,):
                raise ValueError(f"{name} must have shape (D,) = ({d},) for x of shape {x.shape}, got {value.shape}")
        params.append(value)
    eps = check_real(eps, "eps", 0.0, low_open=True)
    return layer_norm_core(x, params[0], params[1], eps)


def layer_norm_core(
    x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float = 1e-5
) -> tuple[np.ndarray, LayerNormCache]:
    """:func:`layer_norm` without validation: the caller guarantees shapes and dtypes."""
    mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mu  # (..., D)
    var = np.einsum("...i,...i->...", xc, xc)[..., None] / x.shape[-1]  # (..., 1), biased
    rstd = 1.0 / np.sqrt(var + x.dtype.type(eps))  # (..., 1)
    xhat = xc
    xhat *= rstd  # (..., D), in place: xc is ours
    if weight is None:
        y = xhat.copy()
    else:
        y = xhat * weight
    if bias is not None:
        y += bias
    return y, LayerNormCache(xhat=xhat, rstd=rstd, weight=weight, has_bias=bias is not None)


def layer_norm_backward(dy: Any, cache: LayerNormCache, *, trainable: bool = True) -> LayerNormGrads:
    """Gradients of :func:`layer_norm`.

    ``g = dy * weight``; ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``
    (means over the last axis); ``dweight = Σ_batch dy * xhat``,
    ``dbias = Σ_batch dy``. With ``trainable=False`` (or when the forward had
    no weight/bias) those two are None and not computed.

    Parameters
    ----------
    dy : ndarray of the output's shape
    cache : LayerNormCache
    trainable : bool, default True

    Returns
    -------
    LayerNormGrads
        ``.x`` of x's shape, ``.weight`` and ``.bias`` of shape (D,) or None.
    """
    check_cache(cache, LayerNormCache, "layer_norm")
    trainable = check_bool(trainable, "trainable")
    dy = as_grad(dy, cache.xhat.shape, cache.xhat.dtype, "the output y")
    return layer_norm_backward_core(dy, cache, trainable=trainable)


def layer_norm_backward_core(dy: np.ndarray, cache: LayerNormCache, *, trainable: bool = True) -> LayerNormGrads:
    """:func:`layer_norm_backward` without validation: ``dy`` has the output's shape and dtype."""
    xhat, rstd, weight = cache.xhat, cache.rstd, cache.weight
    d = xhat.shape[-1]
    g = dy.copy() if weight is None else dy * weight  # (..., D), fresh: it becomes dx in place
    mean_g = g.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_gx = np.einsum("...i,...i->...", g, xhat)[..., None] / d  # (..., 1)
    dx = g
    dx -= mean_g
    dx -= xhat * mean_gx
    dx *= rstd  # rstd * (g - mean(g) - xhat * mean(g * xhat))
    dweight = dbias = None
    if trainable:
        rows = dy.reshape(-1, d)  # (N, D)
        if weight is not None:
            dweight = np.einsum("ni,ni->i", rows, xhat.reshape(-1, d))  # (D,)
        if cache.has_bias:
            dbias = rows.sum(axis=0)  # (D,)
    return LayerNormGrads(x=dx, weight=dweight, bias=dbias)
