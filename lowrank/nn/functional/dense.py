"""Linear and LoRA linear layers: ``y = x @ W.T + b``, plus ``scaling * (x * mask) @ A.T @ B.T``.

Each public kernel checks its arguments (:mod:`lowrank.nn.functional.checks`)
and calls its ``*_core``, which assumes them valid. The derivations are in
``docs/lora.md``, symbol for symbol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.nn.functional.checks import (
    as_grad,
    as_input,
    as_mask,
    check_bias,
    check_cache,
    check_fits,
    check_lora_factors,
    check_weight,
)
from lowrank.utils.validation import check_bool, check_real

__all__ = [
    "LinearCache",
    "LinearGrads",
    "LoRACache",
    "LoRAGrads",
    "fold_pays",
    "folded_weight",
    "linear",
    "linear_backward",
    "linear_backward_core",
    "linear_core",
    "lora_linear",
    "lora_linear_backward",
    "lora_linear_backward_core",
    "lora_linear_backward_folded",
    "lora_linear_core",
    "lora_linear_folded",
]


# ---------------------------------------------------------------- linear


@dataclass(frozen=True, slots=True)
class LinearCache:
    """What :func:`linear_backward` needs.

    Attributes
    ----------
    x : ndarray of shape (N, in_features)
        The input with its batch dimensions flattened (a view when possible).
    weight : ndarray of shape (out_features, in_features)
        The caller's weight, referenced, not copied.
    has_bias : bool
    batch_shape : tuple of int
        The leading dimensions of the input, restored on ``dx``.
    """

    x: np.ndarray
    weight: np.ndarray
    has_bias: bool
    batch_shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LinearGrads:
    """Gradients of a linear layer; ``weight``/``bias`` are None when not computed."""

    x: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None


def linear(x: Any, weight: Any, bias: Any = None) -> tuple[np.ndarray, LinearCache]:
    """``y = x @ weight.T + bias``.

    Parameters
    ----------
    x : ndarray of shape (..., in_features)
    weight : ndarray of shape (out_features, in_features)
        Same dtype as ``x``.
    bias : ndarray of shape (out_features,), optional

    Returns
    -------
    y : ndarray of shape (..., out_features)
    cache : LinearCache
    """
    x = as_input(x)
    weight = check_weight(weight, x.dtype)
    check_fits(x, weight)
    return linear_core(x, weight, check_bias(bias, weight, x.dtype))


def linear_core(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, LinearCache]:
    """:func:`linear` without validation: the caller guarantees shapes and dtypes."""
    out_features, in_features = weight.shape
    batch_shape = x.shape[:-1]
    x2 = x.reshape(math.prod(batch_shape), in_features)  # (N, in)
    y = x2 @ weight.T  # (N, out)
    if bias is not None:
        y += bias  # in place: no second (N, out) array
    cache = LinearCache(x=x2, weight=weight, has_bias=bias is not None, batch_shape=batch_shape)
    return y.reshape(*batch_shape, out_features), cache


def linear_backward(dy: Any, cache: LinearCache, *, trainable: bool = True) -> LinearGrads:
    """Gradients of :func:`linear`: ``dx = dy @ W``; ``dW = dy.T @ x``, ``db = Σ_batch dy``.

    Batch dimensions are flattened, so ``dy.T @ x`` sums over all of them.
    With ``trainable=False`` the weight and bias gradients are not computed
    (``.weight`` and ``.bias`` are None): that skips the ``dy.T @ x`` product.

    Parameters
    ----------
    dy : ndarray of shape (..., out_features)
    cache : LinearCache
    trainable : bool, default True

    Returns
    -------
    LinearGrads
        ``.x`` of shape (..., in_features), ``.weight`` (out_features,
        in_features) or None, ``.bias`` (out_features,) or None.
    """
    check_cache(cache, LinearCache, "linear")
    trainable = check_bool(trainable, "trainable")
    dy = as_grad(dy, (*cache.batch_shape, cache.weight.shape[0]), cache.x.dtype, "the output y")
    return linear_backward_core(dy, cache, trainable=trainable)


def linear_backward_core(dy: np.ndarray, cache: LinearCache, *, trainable: bool = True) -> LinearGrads:
    """:func:`linear_backward` without validation: ``dy`` has the output's shape and dtype."""
    x, W = cache.x, cache.weight
    out_features, in_features = W.shape
    dy = dy.reshape(x.shape[0], out_features)  # (N, out)
    dx = (dy @ W).reshape(*cache.batch_shape, in_features)  # (..., in)
    if not trainable:
        return LinearGrads(x=dx, weight=None, bias=None)
    dW = dy.T @ x  # (out, in)
    db = dy.sum(axis=0) if cache.has_bias else None  # (out,)
    return LinearGrads(x=dx, weight=dW, bias=db)


# ---------------------------------------------------------------- LoRA linear


@dataclass(frozen=True, slots=True)
class LoRACache:
    """What :func:`lora_linear_backward` needs; nothing of shape (out, in) is created for it.

    Attributes
    ----------
    x : ndarray of shape (N, in_features)
        The input, batch dimensions flattened (a view when possible).
    xm : ndarray of shape (N, in_features)
        ``x * mask``, the LoRA path's input; the same array as ``x`` without a mask.
    xa : ndarray of shape (N, r)
        ``xm @ A.T``.
    weight, A, B : ndarray
        The caller's arrays, referenced, not copied.
    scaling : float
    mask : ndarray or None
        The dropout mask as given (broadcastable to the input's shape).
    has_bias : bool
    x_shape : tuple of int
        The input's shape, restored on ``dx``.
    """

    x: np.ndarray
    xm: np.ndarray
    xa: np.ndarray
    weight: np.ndarray
    A: np.ndarray
    B: np.ndarray
    scaling: float
    mask: np.ndarray | None
    has_bias: bool
    x_shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoRAGrads:
    """Gradients of a LoRA layer; ``weight``/``bias`` are None unless the base is trainable."""

    x: np.ndarray
    A: np.ndarray
    B: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None


def lora_linear(
    x: Any,
    weight: Any,
    bias: Any,
    A: Any,
    B: Any,
    scaling: float,
    dropout_mask: Any = None,
) -> tuple[np.ndarray, LoRACache]:
    """``y = x @ W.T + b + scaling * ((x * mask) @ A.T) @ B.T``.

    Dropout acts on the input of the LoRA path only, as in PEFT and loralib.

    Parameters
    ----------
    x : ndarray of shape (..., in_features)
    weight : ndarray of shape (out_features, in_features)
        The base weight ``W``, same dtype as ``x``.
    bias : ndarray of shape (out_features,) or None
    A : ndarray of shape (r, in_features)
    B : ndarray of shape (out_features, r)
    scaling : float
        ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
    dropout_mask : ndarray broadcastable to x's shape, optional
        Inverted-dropout mask holding 0 or ``1/(1-p)`` (see :func:`dropout_mask`);
        None means no dropout.

    Returns
    -------
    y : ndarray of shape (..., out_features), C-contiguous
    cache : LoRACache

    Notes
    -----
    The low-rank term is evaluated as ``(xm @ A.T) @ (scaling * B).T``, costing
    ``N * r * (in + out)`` multiply-adds, never by forming ``B @ A`` for a small
    batch; without dropout and with more rows than ``in_features`` the update
    is folded into the weight instead (:func:`lora_linear_folded`). The orders
    agree to rounding. A fresh adapter (``B = 0``) adds nothing and skips the
    low-rank term, so its output is the base output bit for bit.
    """
    x = as_input(x)
    weight = check_weight(weight, x.dtype)
    check_fits(x, weight)
    bias = check_bias(bias, weight, x.dtype)
    A, B = check_lora_factors(A, B, weight, x.dtype)
    scaling = check_real(scaling, "scaling")
    mask = None if dropout_mask is None else as_mask(dropout_mask, x, "dropout_mask")
    return lora_linear_core(x, weight, bias, A, B, scaling, mask)


def lora_linear_core(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
    dropout_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, LoRACache]:
    """:func:`lora_linear` without validation: the caller guarantees shapes and dtypes.

    ``dropout_mask``, if given, broadcasts to ``x``'s shape and has its dtype.
    """
    out_features, in_features = weight.shape
    n = math.prod(x.shape[:-1])
    x2 = x.reshape(n, in_features)  # (N, in)
    mask = dropout_mask
    xm = x2 if mask is None else (x * mask).reshape(n, in_features)  # (N, in)
    if not B.any():
        # a fresh adapter (B = 0) adds exactly nothing: the base output, bit for bit
        xa = xm @ A.T  # (N, r): the backward pass needs it all the same
        y = x2 @ weight.T  # (N, out)
    elif mask is None and fold_pays(n, in_features):
        y, xa = lora_linear_folded(x2, weight, A, B, scaling)  # (N, out), (N, r)
    else:
        xa = xm @ A.T  # (N, r)
        y = x2 @ weight.T  # (N, out)
        y += xa @ (scaling * B).T  # (N, out); scaling applied to the small B
    if bias is not None:
        y += bias  # (N, out)
    cache = LoRACache(
        x=x2, xm=xm, xa=xa, weight=weight, A=A, B=B, scaling=scaling, mask=mask,
        has_bias=bias is not None, x_shape=x.shape,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features), cache


def lora_linear_backward(dy: Any, cache: LoRACache, base_trainable: bool = False) -> LoRAGrads:
    """Gradients of :func:`lora_linear` (batch dimensions flattened, so products sum over them).

    ``dB = scaling * dy.T @ xa``, ``dxa = scaling * dy @ B``, ``dA = dxa.T @ xm`` with
    ``xm = x * mask``, ``dx = dy @ W + (dxa @ A) * mask``; ``dW = dy.T @ x`` and
    ``db = Σ_batch dy`` only when ``base_trainable`` (a frozen base's are never computed).
    Derivation: ``docs/lora.md``.

    Parameters
    ----------
    dy : ndarray of shape (..., out_features)
    cache : LoRACache
    base_trainable : bool, default False

    Returns
    -------
    LoRAGrads
        ``.x`` (..., in_features), C-contiguous, ``.A`` (r, in_features), ``.B``
        (out_features, r); ``.weight`` (out_features, in_features) and
        ``.bias`` (out_features,) or None.
    """
    check_cache(cache, LoRACache, "lora_linear")
    base_trainable = check_bool(base_trainable, "base_trainable")
    shape = (*cache.x_shape[:-1], cache.weight.shape[0])
    dy = as_grad(dy, shape, cache.x.dtype, "the output y")
    return lora_linear_backward_core(dy, cache, base_trainable=base_trainable)


def lora_linear_backward_core(dy: np.ndarray, cache: LoRACache, base_trainable: bool = False) -> LoRAGrads:
    """:func:`lora_linear_backward` without validation: ``dy`` has the output's shape and dtype."""
    x, xm, xa, W, A, B = cache.x, cache.xm, cache.xa, cache.weight, cache.A, cache.B
    scaling, mask = cache.scaling, cache.mask
    n, (out_features, in_features) = x.shape[0], W.shape
    dy = dy.reshape(n, out_features)  # (N, out)

    dB = scaling * (dy.T @ xa)  # (out, r)
    if mask is None and fold_pays(n, out_features):
        dx, dxa = lora_linear_backward_folded(dy, W, A, B, scaling)  # (N, in), (N, r)
    else:
        dxa = dy @ (scaling * B)  # (N, r): the gradient reaching xa
        dxm = (dxa @ A).reshape(cache.x_shape)  # (..., in): the gradient reaching xm = x * mask
        if mask is not None:
            dxm *= mask  # in place: no second (..., in) temporary
        dx = dy @ W  # (N, in): the base path's share
        dx += dxm.reshape(n, in_features)
    # dA = dxa.T @ xm, computed as (xm.T @ dxa).T: the same sums, but OpenBLAS
    # runs an (in, N) @ (N, r) product faster than (r, N) @ (N, in) with its
    # long inner dimension (3.4 against 4.9 ms at N = 8192, in = 1024, r = 8);
    # copied into C order, which costs nothing at (r, in).
    dA = (xm.T @ dxa).T.copy()  # (r, in)

    dW = db = None
    if base_trainable:
        dW = dy.T @ x  # (out, in): the product a frozen base never pays for
        db = dy.sum(axis=0) if cache.has_bias else None  # (out,)
    return LoRAGrads(x=dx.reshape(cache.x_shape), A=dA, B=dB, weight=dW, bias=db)


# ---------------------------------------------------------------- the folded fast path


def fold_pays(n: int, other_side: int) -> bool:
    """Whether folding ``scaling * B @ A`` into a temporary ``W + scaling * B @ A`` is cheaper.

    Folding replaces an ``(N, r) @ (r, k)`` product and an add pass over its
    ``(N, k)`` result (the forward's ``xa @ B.T`` with ``k = out``, the
    backward's ``dxa @ A`` with ``k = in``) by an ``(out, r) @ (r, in)`` product
    and an add pass over an ``(out, in)`` temporary. Both costs are ``k * (r + 1)``
    times either ``N`` or the other side of ``W``, so folding pays exactly when
    ``N`` exceeds that other side: ``in`` in the forward, ``out`` in the backward.
    """
    return n > other_side


def folded_weight(weight: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """``W + scaling * B @ A``, ndarray of shape (out_features, in_features): a temporary, never cached."""
    merged = (scaling * B) @ A  # (out, in)
    merged += weight
    return merged


def lora_linear_folded(
    x: np.ndarray, weight: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float
) -> tuple[np.ndarray, np.ndarray]:
    """The forward's fast path for a large batch: ``y = x @ (W + scaling * B @ A).T`` and ``xa = x @ A.T``.

    Without dropout the LoRA term is a linear map of ``x`` too, so it can be
    folded into a temporary weight: ``out * r * in`` multiply-adds and an add
    pass over an ``(out, in)`` array, once, instead of ``xa @ B.T`` and an add
    pass over the ``(N, out)`` result. That pays when ``N > in_features``
    (:func:`fold_pays`); :func:`lora_linear_core` makes the choice. ``xa`` is
    still needed, for ``dB`` in the backward pass.

    Parameters
    ----------
    x : ndarray of shape (N, in_features)
    weight, A, B, scaling
        As :func:`lora_linear`, checked by the caller.

    Returns
    -------
    y : ndarray of shape (N, out_features), C-contiguous, without the bias
    xa : ndarray of shape (N, r), C-contiguous
    """
    # Stacking A under the folded weight (one product x @ [W + sBA ; A].T) reads x once
    # instead of twice, but then y is a strided view of an (N, out + r) array. Measured
    # (N = 8192, in = out = 1024, r = 8, float32, 2 BLAS threads, a busy machine, interleaved
    # medians of the whole step over bare x @ W.T + dy @ W): stacked views 1.06-1.23x,
    # these separate products 1.18-1.33x, stacked plus a copy of y and dx 1.39-1.47x. Each
    # thin product or (N, out) copy costs about 12 ms; the separate products are the fastest
    # way found that returns C-contiguous arrays.
    y = x @ folded_weight(weight, A, B, scaling).T  # (N, out)
    xa = x @ A.T  # (N, r)
    return y, xa


def lora_linear_backward_folded(
    dy: np.ndarray, weight: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float
) -> tuple[np.ndarray, np.ndarray]:
    """The backward's fast path for a large batch: ``dx = dy @ (W + scaling * B @ A)`` and ``dxa = scaling * dy @ B``.

    Without dropout ``dx = dy @ W + dxa @ A = dy @ (W + scaling * B @ A)``;
    folding costs ``out * r * in`` once instead of ``N * r * in`` and an add
    pass over ``(N, in)``, so it pays when ``N > out_features``
    (:func:`fold_pays`); :func:`lora_linear_backward_core` makes the choice.

    Parameters
    ----------
    dy : ndarray of shape (N, out_features)
    weight, A, B, scaling
        As :func:`lora_linear`, checked by the caller.

    Returns
    -------
    dx : ndarray of shape (N, in_features), C-contiguous
    dxa : ndarray of shape (N, r), C-contiguous
    """
    dx = dy @ folded_weight(weight, A, B, scaling)  # (N, in); C-contiguous: see lora_linear_folded
    dxa = dy @ (scaling * B)  # (N, r)
    return dx, dxa
