"""Softmax and scaled dot-product attention, as ``torch.nn.functional``'s.

Symbols as in ``docs/attention.md``: queries ``q (..., T, d)``, keys
``k (..., S, d)``, values ``v (..., S, dv)``, the scores
``s = scale * q @ k^T (..., T, S)`` (plus the mask), the attention weights
``p = softmax(s)`` over the last axis, the weights after dropout
``pd = p * dropout_mask`` and the output ``y = pd @ v (..., T, dv)``. The
leading dimensions ``...`` (batch, heads) are any number, the same for
``q``, ``k`` and ``v``; the products are batched with ``np.matmul``. The
public kernels check their arguments and call their ``*_core``.

Masked entries
    A score whose mask entry is False (or whose additive mask is ``-inf``)
    gets the weight exactly 0. A row of scores that is ``-inf`` everywhere
    (a query allowed to see no key) gets weights 0 everywhere and so the
    output 0 and zero gradients, as PyTorch's ``scaled_dot_product_attention``
    does; the plain :func:`softmax` follows the same rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.nn.functional.checks import as_grad, as_input, as_param, check_cache
from lowrank.utils.validation import as_float_array, check_bool, check_int, check_real, describe_non_finite

__all__ = [
    "AttentionCache",
    "AttentionGrads",
    "SoftmaxCache",
    "causal_mask",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "scaled_dot_product_attention_backward_core",
    "scaled_dot_product_attention_core",
    "softmax",
    "softmax_backward",
    "softmax_backward_core",
    "softmax_core",
]


# ---------------------------------------------------------------- softmax


@dataclass(frozen=True, slots=True)
class SoftmaxCache:
    """The output ``y`` of :func:`softmax` and the axis it normalized over."""

    y: np.ndarray
    axis: int


def softmax(x: Any, axis: int = -1) -> tuple[np.ndarray, SoftmaxCache]:
    """``y = exp(x - max(x)) / Σ exp(x - max(x))`` along ``axis``, overflow-free.

    Parameters
    ----------
    x : ndarray of any shape with at least one dimension
        Finite or ``-inf`` (a masked entry, weight 0); NaN and ``+inf`` are refused.
    axis : int, default -1

    Returns
    -------
    y : ndarray of x's shape and dtype
        Each slice along ``axis`` sums to 1, or is 0 everywhere when it was
        ``-inf`` everywhere.
    cache : SoftmaxCache
    """
    x = as_input(x)
    axis = check_int(axis, "axis", -x.ndim, x.ndim - 1)
    bad = np.isnan(x) | (x == np.inf)
    if bad.any():
        message = describe_non_finite(np.where(bad, x, 0), "x")
        raise ValueError(f"{message} (only -inf, a masked entry, is allowed)")
    return softmax_core(x.copy(), axis % x.ndim)


def softmax_core(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, SoftmaxCache]:
    """:func:`softmax` *in place*: overwrites and returns ``x``, which the caller owns.

    No validation: ``x`` is a float array without NaN or ``+inf``.
    """
    if x.shape[axis] == 0:  # an empty slice has no max: nothing to normalize (torch returns it empty too)
        return x, SoftmaxCache(y=x, axis=axis)
    m = x.max(axis=axis, keepdims=True)  # (..., 1, ...)
    all_masked = m == -np.inf
    masked = bool(all_masked.any())
    if masked:
        m[all_masked] = 0  # exp(-inf - 0) = 0: the slice becomes all zeros
    x -= m  # every slice's max is 0 (or the slice is -inf): exp never overflows
    np.exp(x, out=x)
    total = x.sum(axis=axis, keepdims=True)  # >= 1, or 0 for an all-masked slice
    if masked:
        total[all_masked] = 1
    x *= 1 / total  # a multiplication by the slice's reciprocal: cheaper than dividing every entry
    return x, SoftmaxCache(y=x, axis=axis)


def softmax_backward(dy: Any, cache: SoftmaxCache) -> np.ndarray:
    """``dx = y * (dy - Σ_axis dy * y)``, the Jacobian-vector product of softmax.

    Parameters
    ----------
    dy : ndarray of the output's shape
    cache : SoftmaxCache

    Returns
    -------
    dx : ndarray of x's shape and dtype
    """
    check_cache(cache, SoftmaxCache, "softmax")
    return softmax_backward_core(as_grad(dy, cache.y.shape, cache.y.dtype, "the output y"), cache)


def softmax_backward_core(dy: np.ndarray, cache: SoftmaxCache) -> np.ndarray:
    """:func:`softmax_backward` without validation: ``dy`` has the output's shape and dtype."""
    y, axis = cache.y, cache.axis
    if axis in (-1, y.ndim - 1):  # the attention case: a row dot product, no (..., n) temporary
        inner = np.einsum("...i,...i->...", dy, y)[..., None]  # Σ dy * y, (..., 1)
    else:
        inner = (dy * y).sum(axis=axis, keepdims=True)  # (..., 1, ...)
    dx = dy - inner  # (..., n, ...), fresh
    dx *= y  # y * (dy - Σ dy * y)
    return dx


# ---------------------------------------------------------------- attention


@dataclass(frozen=True, slots=True)
class AttentionCache:
    """What :func:`scaled_dot_product_attention_backward` needs.

    Attributes
    ----------
    qs : ndarray of shape (..., T, d)
        ``scale * q``.
    k : ndarray of shape (..., S, d)
    v : ndarray of shape (..., S, dv)
        The caller's keys and values, referenced, not copied.
    p : ndarray of shape (..., T, S)
        The attention weights ``softmax(s)``, before dropout.
    pd : ndarray of shape (..., T, S)
        ``p * dropout_mask``; the same array as ``p`` without dropout.
    dropout_mask : ndarray broadcastable to (..., T, S), or None
    scale : float
    """

    qs: np.ndarray
    k: np.ndarray
    v: np.ndarray
    p: np.ndarray
    pd: np.ndarray
    dropout_mask: np.ndarray | None
    scale: float


@dataclass(frozen=True, slots=True)
class AttentionGrads:
    """Gradients of attention with respect to ``q``, ``k`` and ``v``."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray


def causal_mask(t: int, s: int) -> np.ndarray:
    """The boolean mask ``(t, s)`` letting query ``i`` see keys ``j <= i``: ``np.tri(t, s)``, torch's ``is_causal``."""
    return np.tri(t, s, dtype=bool)


def _as_attn_mask(mask: Any, shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    """A boolean mask, or an additive float mask cast to ``dtype``, broadcastable to ``shape``."""
    arr = np.asarray(mask)
    if arr.dtype != bool and arr.dtype.kind != "f":  # torch refuses these too: a 0/1 integer mask is ambiguous
        raise TypeError(
            f"{name} must be boolean (True = attend) or float (added to the scores, -inf = do not attend), "
            f"got dtype {arr.dtype}; for a 0/1 mask such as transformers' attention_mask pass mask.astype(bool)"
        )
    if arr.dtype != bool:
        arr = as_float_array(arr, name).astype(dtype, copy=False)
        bad = np.isnan(arr) | (arr == np.inf)
        if bad.any():
            message = describe_non_finite(np.where(bad, arr, 0), name)
            raise ValueError(f"{message} (an additive mask may hold -inf, not NaN or +inf)")
    try:
        fits = np.broadcast_shapes(arr.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{name} must broadcast to the scores' shape (..., T, S) = {shape}, got shape {arr.shape}")
    return arr


def scaled_dot_product_attention(
    q: Any,
    k: Any,
    v: Any,
    attn_mask: Any = None,
    is_causal: bool = False,
    dropout_mask: Any = None,
    scale: float | None = None,
) -> tuple[np.ndarray, AttentionCache]:
    """``y = (softmax(scale * q @ k^T + mask) * dropout_mask) @ v``, as torch's SDPA.

    Parameters
    ----------
    q : ndarray of shape (..., T, d)
    k : ndarray of shape (..., S, d)
    v : ndarray of shape (..., S, dv)
        The same leading dimensions as ``q``, the same dtype.
    attn_mask : ndarray broadcastable to (..., T, S), optional
        Boolean (True = attend, as torch) or float, added to the scores
        (``-inf`` = do not attend). Any other dtype (an integer 0/1 mask)
        is a TypeError, as in torch.
    is_causal : bool, default False
        Query ``i`` attends to keys ``j <= i`` only (``np.tri(T, S)``, aligned
        top-left, as torch). Combined with ``attn_mask`` when both are given.
    dropout_mask : ndarray broadcastable to (..., T, S), optional
        Inverted-dropout mask on the attention weights, holding 0 or
        ``1/(1-p)`` (see :func:`dropout_mask`); None means no dropout.
    scale : float, optional
        Default ``1 / sqrt(d)``.

    Returns
    -------
    y : ndarray of shape (..., T, dv)
    cache : AttentionCache
    """
    q = as_input(q, "q")
    k = as_param(k, "k", q.dtype, "q")
    v = as_param(v, "v", q.dtype, "q")
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            f"q, k and v must have the same number of dimensions, at least 2: (..., T, d), (..., S, d), "
            f"(..., S, dv), got shapes {q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1] or (
        v.shape[-2] != k.shape[-2]
    ):
        raise ValueError(
            f"q, k and v must have shapes (..., T, d), (..., S, d), (..., S, dv) with the same leading "
            f"dimensions, got {q.shape}, {k.shape}, {v.shape}"
        )
    scores_shape = (*q.shape[:-1], k.shape[-2])
    mask = None if attn_mask is None else _as_attn_mask(attn_mask, scores_shape, q.dtype, "attn_mask")
    is_causal = check_bool(is_causal, "is_causal")
    dmask = None
    if dropout_mask is not None:
        dmask = as_float_array(dropout_mask, "dropout_mask").astype(q.dtype, copy=False)
        try:
            fits = np.broadcast_shapes(dmask.shape, scores_shape) == scores_shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"dropout_mask must broadcast to the scores' shape (..., T, S) = {scores_shape}, got {dmask.shape}"
            )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    else:
        scale = check_real(scale, "scale")
    return scaled_dot_product_attention_core(q, k, v, mask, is_causal, dmask, scale)


def scaled_dot_product_attention_core(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    attn_mask: np.ndarray | None = None,
    is_causal: bool = False,
    dropout_mask: np.ndarray | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, AttentionCache]:
    """:func:`scaled_dot_product_attention` without validation.

    The caller guarantees shapes and dtypes: masks broadcast to (..., T, S),
    a float ``attn_mask`` and ``dropout_mask`` have ``q``'s dtype.
    """
    t, s = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    qs = q * q.dtype.type(scale)  # (..., T, d): scaling q costs T*d, the scores T*S
    scores = np.matmul(qs, k.swapaxes(-1, -2))  # (..., T, S), fresh
    if attn_mask is not None:
        if attn_mask.dtype == bool:
            np.copyto(scores, -np.inf, where=~attn_mask)
        else:
            scores += attn_mask
    if is_causal:
        np.copyto(scores, -np.inf, where=~causal_mask(t, s))
    p, _ = softmax_core(scores, -1)  # (..., T, S), in place over scores
    pd = p if dropout_mask is None else p * dropout_mask  # (..., T, S)
    y = np.matmul(pd, v)  # (..., T, dv)
    return y, AttentionCache(qs=qs, k=k, v=v, p=p, pd=pd, dropout_mask=dropout_mask, scale=scale)


def scaled_dot_product_attention_backward(dy: Any, cache: AttentionCache) -> AttentionGrads:
    """Gradients of :func:`scaled_dot_product_attention`.

    ``dv = pd^T @ dy``; ``dp = (dy @ v^T) * dropout_mask``;
    ``ds = p * (dp - Σ_S dp * p)`` (softmax's backward);
    ``dq = scale * ds @ k``; ``dk = scale * ds^T @ q``.

    Parameters
    ----------
    dy : ndarray of shape (..., T, dv)
    cache : AttentionCache

    Returns
    -------
    AttentionGrads
        ``.q`` (..., T, d), ``.k`` (..., S, d), ``.v`` (..., S, dv).
    """
    check_cache(cache, AttentionCache, "scaled_dot_product_attention")
    shape = (*cache.qs.shape[:-1], cache.v.shape[-1])
    return scaled_dot_product_attention_backward_core(as_grad(dy, shape, cache.qs.dtype, "the output y"), cache)


def scaled_dot_product_attention_backward_core(dy: np.ndarray, cache: AttentionCache) -> AttentionGrads:
    """:func:`scaled_dot_product_attention_backward` without validation: ``dy`` has the output's shape and dtype."""
    qs, k, v, p = cache.qs, cache.k, cache.v, cache.p
    dv = np.matmul(cache.pd.swapaxes(-1, -2), dy)  # (..., S, dv)
    dp = np.matmul(dy, v.swapaxes(-1, -2))  # (..., T, S), gradient of pd
    if cache.dropout_mask is not None:
        dp *= cache.dropout_mask  # now the gradient of p
    ds = softmax_backward_core(dp, SoftmaxCache(y=p, axis=-1))  # (..., T, S)
    dq = np.matmul(ds, k)  # (..., T, d)
    dq *= dq.dtype.type(cache.scale)
    dk = np.matmul(ds.swapaxes(-1, -2), qs)  # (..., S, d): scale * ds^T @ q
    return AttentionGrads(q=dq, k=dk, v=dv)
