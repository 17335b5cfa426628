"""DoRA linear layer: ``y = x @ ((m / n)[:, None] * V).T + b`` with ``V = W + scaling * B @ A``.

DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation", arXiv
2402.09353) splits the adapted weight into a direction ``V / n``, with
``n = ‖V‖`` the norm of each output row (over the ``in`` axis), and a
trainable magnitude ``m`` of shape ``(out,)``. Under dropout the forward is
PEFT's, ``y = (x - xm) @ W.T + (m / n) * (xm @ V.T) + b`` with ``xm = x *
mask``: the base path sees the whole input, the rescaled path the dropped
one. Without dropout (``xm = x``) that is the formula above.

Two gradients: ``detach_norm=True`` treats ``n`` as a constant (PEFT's and
the paper's §4.3), ``detach_norm=False`` is the exact gradient of the
forward. They agree on ``dx`` and ``dmagnitude`` and differ on ``dA``,
``dB`` (and ``dW``) by the projection of the gradient reaching ``V`` onto
each row's direction. The derivation, symbol for symbol, is in
``docs/dora.md``; the symbols here are its own: ``V``, ``n`` (``norm``),
``c = m / n`` (``scale``), ``z = xm @ V.T``, ``S = Σ_batch dy * z`` and
``k = -c * S / n**2``.

Each public kernel checks its arguments (:mod:`lowrank.nn.functional.checks`)
and calls its ``*_core``, which assumes them valid.
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
    as_param,
    check_bias,
    check_cache,
    check_fits,
    check_lora_factors,
    check_weight,
)
from lowrank.nn.functional.dense import folded_weight
from lowrank.utils.validation import as_float_array, check_bool, check_finite, check_real

__all__ = [
    "RECOVER_MIN_SCALE",
    "DoRACache",
    "DoRAGrads",
    "check_magnitude",
    "check_row_norm",
    "direction_products",
    "dora_linear",
    "dora_linear_backward",
    "dora_linear_backward_core",
    "dora_linear_core",
    "row_norm",
    "weight_norm",
    "weight_norm_core",
]

# Rows whose scale |m / n| is at least this have S = Σ_batch dy * z recovered from the
# output y (z = (y - b) / c: one extra rounding of at most |z| + 2|b|); the others,
# where dividing by c would amplify the rounding of y (or c = 0 left no trace of z in
# y), are recomputed as x @ V[rows].T. A fresh adapter has c = 1 on every row.
RECOVER_MIN_SCALE = 0.5


@dataclass(frozen=True, slots=True)
class DoRACache:
    """What :func:`dora_linear_backward` needs; nothing of shape (out, in), and (N, out) only under dropout.

    Attributes
    ----------
    x : ndarray of shape (N, in_features)
        The input, batch dimensions flattened (a view when possible).
    xm : ndarray of shape (N, in_features)
        ``x * mask``; the same array as ``x`` without a mask.
    xa : ndarray of shape (N, r)
        ``xm @ A.T``.
    weight, bias, A, B, magnitude : ndarray (bias may be None)
        The caller's arrays, referenced, not copied.
    scaling : float
    mask : ndarray or None
        The dropout mask as given (broadcastable to the input's shape).
    norm : ndarray of shape (out_features,)
        ``n = ‖V‖`` per output row.
    scale : ndarray of shape (out_features,)
        ``c = m / n``.
    y : ndarray of shape (N, out_features) or None
        Without dropout: the output the forward returned, referenced, not
        copied (``z = (y - b) / c``; do not modify it in place before the
        backward pass). None under dropout.
    z : ndarray of shape (N, out_features) or None
        Under dropout: ``xm @ V.T``, which the output does not determine. None without.
    detach_norm : bool
    x_shape : tuple of int
        The input's shape, restored on ``dx``.
    """

    x: np.ndarray
    xm: np.ndarray
    xa: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    A: np.ndarray
    B: np.ndarray
    magnitude: np.ndarray
    scaling: float
    mask: np.ndarray | None
    norm: np.ndarray
    scale: np.ndarray
    y: np.ndarray | None
    z: np.ndarray | None
    detach_norm: bool
    x_shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DoRAGrads:
    """Gradients of a DoRA layer; ``weight``/``bias`` are None unless the base is trainable."""

    x: np.ndarray
    A: np.ndarray
    B: np.ndarray
    magnitude: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None


# ---------------------------------------------------------------- the row norm


def weight_norm(weight: Any, A: Any, B: Any, scaling: float) -> np.ndarray:
    """``n = ‖W + scaling * B @ A‖`` per output row: the norm over the ``in`` axis.

    What DoRA's magnitude is initialised to (with the factors as initialised)
    and what its forward divides by. One ``(out, in)`` array is formed (``V``),
    the squares are summed row by row without a second one.

    Parameters
    ----------
    weight : ndarray of shape (out_features, in_features)
    A : ndarray of shape (r, in_features)
    B : ndarray of shape (out_features, r)
        Same dtype as ``weight``.
    scaling : float

    Returns
    -------
    ndarray of shape (out_features,), weight's dtype

    Examples
    --------
    >>> import numpy as np
    >>> W = np.array([[3.0, 4.0], [0.0, 1.0]])
    >>> weight_norm(W, np.zeros((1, 2)), np.zeros((2, 1)), 2.0)
    array([5., 1.])
    """
    weight = as_float_array(weight, "weight")
    weight = check_weight(weight, weight.dtype)
    A, B = check_lora_factors(A, B, weight, weight.dtype)
    return weight_norm_core(weight, A, B, check_real(scaling, "scaling"))


def weight_norm_core(weight: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """:func:`weight_norm` without validation: the caller guarantees shapes and dtypes."""
    return row_norm(folded_weight(weight, A, B, scaling))


def row_norm(V: np.ndarray) -> np.ndarray:
    """``sqrt(Σ_in V**2)`` per row of ``V`` (out, in) -> (out,), summed without a squared copy."""
    return np.sqrt(np.einsum("ij,ij->i", V, V))  # (out,)


def check_row_norm(norm: np.ndarray) -> np.ndarray:
    """Refuse a zero (ValueError) or non-finite (FloatingPointError) row norm; return ``norm``.

    A zero row of ``V`` has no direction: ``m / n`` is ``m / 0``, which PEFT
    (no epsilon) turns into inf or NaN outputs. lowrank refuses it rather than
    add an epsilon that would change the function everywhere else.
    """
    zero = np.flatnonzero(norm == 0)
    if zero.size:
        raise ValueError(
            f"DoRA needs every row of V = W + scaling * B @ A to have a nonzero norm (its direction V / ‖V‖ "
            f"is undefined otherwise), got ‖V‖ = 0 at rows {zero[:8].tolist()}"
            f"{' ...' if zero.size > 8 else ''} of {norm.size}"
        )
    bad = np.flatnonzero(~np.isfinite(norm))
    if bad.size:
        raise FloatingPointError(
            f"DoRA's row norm ‖W + scaling * B @ A‖ is not finite in {norm.dtype} at rows "
            f"{bad[:8].tolist()}{' ...' if bad.size > 8 else ''} (overflow, or non-finite W, A or B)"
        )
    return norm


def check_magnitude(magnitude: Any, weight: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """DoRA's magnitude: shape (out_features,), ``x``'s dtype, finite; else Type/ValueError."""
    magnitude = as_param(magnitude, "magnitude", dtype)
    if magnitude.shape != (weight.shape[0],):
        raise ValueError(
            f"magnitude must have shape (out_features,) = ({weight.shape[0]},) to fit weight of shape "
            f"{weight.shape}, got shape {magnitude.shape}"
        )
    return check_finite(magnitude, "magnitude")


# ---------------------------------------------------------------- forward


def dora_linear(
    x: Any,
    weight: Any,
    bias: Any,
    A: Any,
    B: Any,
    magnitude: Any,
    scaling: float,
    dropout_mask: Any = None,
    detach_norm: bool = True,
) -> tuple[np.ndarray, DoRACache]:
    """``y = (x - xm) @ W.T + (m / n) * (xm @ V.T) + b``; without dropout ``y = x @ ((m / n)[:, None] * V).T + b``.

    ``V = W + scaling * B @ A``, ``n = ‖V‖`` per output row, ``xm = x * mask``
    (``x`` without a mask). This is PEFT's DoRA on a Linear: its forward adds
    ``(m / n - 1) * (xm @ W.T) + (m / n) * (scaling * (xm @ A.T) @ B.T)`` to the
    base output ``x @ W.T + b``, which is the formula above (``docs/dora.md``).

    Parameters
    ----------
    x : ndarray of shape (..., in_features)
    weight : ndarray of shape (out_features, in_features)
        The base weight ``W``, same dtype as ``x``.
    bias : ndarray of shape (out_features,) or None
    A : ndarray of shape (r, in_features)
    B : ndarray of shape (out_features, r)
    magnitude : ndarray of shape (out_features,)
        ``m``, finite (PEFT's ``lora_magnitude_vector``).
    scaling : float
        ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
    dropout_mask : ndarray broadcastable to x's shape, optional
        Inverted-dropout mask holding 0 or ``1/(1-p)``; None means no dropout
        (PEFT's eval mode, or ``lora_dropout = 0``).
    detach_norm : bool, default True
        The gradient :func:`dora_linear_backward` computes: True treats ``n``
        as a constant (PEFT's), False is the exact gradient.

    Returns
    -------
    y : ndarray of shape (..., out_features), C-contiguous
    cache : DoRACache
        Without dropout it references ``y``: do not modify ``y`` in place
        before the backward pass.

    Raises
    ------
    ValueError
        A bad shape, a non-finite magnitude, or a row of ``V`` whose norm is 0
        (the direction is undefined; see :func:`check_row_norm`).
    FloatingPointError
        A row norm that overflows ``x``'s dtype.

    Notes
    -----
    Without dropout the rescaled weight ``W' = (m / n)[:, None] * V`` is
    formed once, in the one ``(out, in)`` array ``V`` occupies, and the output
    is one product ``x @ W'.T``. With ``B = 0`` and ``m`` the row norms of
    ``W`` (a fresh adapter: :func:`weight_norm` computes them as this forward
    does), ``m / n`` is exactly 1 and the product is the base layer's own
    ``x @ W.T``, so without dropout the output is the base output bit for bit.
    """
    x = as_input(x)
    weight = check_weight(weight, x.dtype)
    check_fits(x, weight)
    bias = check_bias(bias, weight, x.dtype)
    A, B = check_lora_factors(A, B, weight, x.dtype)
    magnitude = check_magnitude(magnitude, weight, x.dtype)
    scaling = check_real(scaling, "scaling")
    mask = None if dropout_mask is None else as_mask(dropout_mask, x, "dropout_mask")
    detach_norm = check_bool(detach_norm, "detach_norm")
    return dora_linear_core(x, weight, bias, A, B, magnitude, scaling, mask, detach_norm)


def dora_linear_core(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    magnitude: np.ndarray,
    scaling: float,
    dropout_mask: np.ndarray | None = None,
    detach_norm: bool = True,
) -> tuple[np.ndarray, DoRACache]:
    """:func:`dora_linear` without validation of the arguments: the caller guarantees shapes and dtypes.

    It still refuses a zero or non-finite row norm (:func:`check_row_norm`),
    which no check of the arguments alone can see.
    """
    out_features, in_features = weight.shape
    n = math.prod(x.shape[:-1])
    x2 = x.reshape(n, in_features)  # (N, in)
    mask = dropout_mask
    xm = x2 if mask is None else (x * mask).reshape(n, in_features)  # (N, in)
    V = folded_weight(weight, A, B, scaling)  # (out, in): the one (out, in) array
    norm = check_row_norm(row_norm(V))  # (out,)
    scale = magnitude / norm  # (out,): c = m / n
    xa = xm @ A.T  # (N, r): for dB in the backward pass
    z = None
    if mask is None and not B.any() and (scale == 1).all():
        # a fresh adapter (B = 0, m = n): W' is W, so the base product itself, bit for bit in any layout
        y = x2 @ weight.T  # (N, out)
    elif mask is None:
        V *= scale[:, None]  # in place: W' = c * V
        y = x2 @ V.T  # (N, out)
    else:
        z = xm @ V.T  # (N, out): the rescaled path before its scale, kept for dm
        y = (x2 - xm) @ weight.T  # (N, out): the base path's share of the dropped-out input
        y += scale * z  # (N, out)
    if bias is not None:
        y += bias  # (N, out)
    cache = DoRACache(
        x=x2, xm=xm, xa=xa, weight=weight, bias=bias, A=A, B=B, magnitude=magnitude, scaling=scaling,
        mask=mask, norm=norm, scale=scale, y=y if mask is None else None, z=z, detach_norm=detach_norm,
        x_shape=x.shape,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features), cache


# ---------------------------------------------------------------- backward


def dora_linear_backward(dy: Any, cache: DoRACache, base_trainable: bool = False) -> DoRAGrads:
    """Gradients of :func:`dora_linear` (batch dimensions flattened, so products sum over them).

    With ``c = m / n``, ``S = Σ_batch dy * z`` (``z = xm @ V.T``):
    ``dm = S / n``; ``dxa = dy @ (scaling * c * B)``, ``dA = dxa.T @ xm``,
    ``dB = scaling * c * (dy.T @ xa)``; ``dx = dy @ (c * V)`` without dropout,
    ``dx = dy @ W + (dy @ (c * V - W)) * mask`` with it. The exact gradient
    (``detach_norm=False``) adds ``k * V`` to the gradient reaching ``V``,
    ``k = -c * S / n**2``: ``dA += scaling * (k * B).T @ V``, ``dB += scaling *
    k * (V @ A.T)``. With ``base_trainable``, ``dW = dy.T @ x + (c - 1) *
    (dy.T @ xm)`` (plus ``k * V`` when exact) and ``db = Σ_batch dy``.
    Derivation: ``docs/dora.md``.

    Parameters
    ----------
    dy : ndarray of shape (..., out_features)
    cache : DoRACache
    base_trainable : bool, default False

    Returns
    -------
    DoRAGrads
        ``.x`` (..., in_features), ``.A`` (r, in_features), ``.B`` (out_features,
        r), ``.magnitude`` (out_features,); ``.weight`` (out_features,
        in_features) and ``.bias`` (out_features,) or None.
    """
    check_cache(cache, DoRACache, "dora_linear")
    base_trainable = check_bool(base_trainable, "base_trainable")
    shape = (*cache.x_shape[:-1], cache.weight.shape[0])
    dy = as_grad(dy, shape, cache.x.dtype, "the output y")
    return dora_linear_backward_core(dy, cache, base_trainable=base_trainable)


def dora_linear_backward_core(dy: np.ndarray, cache: DoRACache, base_trainable: bool = False) -> DoRAGrads:
    """:func:`dora_linear_backward` without validation: ``dy`` has the output's shape and dtype."""
    x, xm, xa, W, A, B = cache.x, cache.xm, cache.xa, cache.weight, cache.A, cache.B
    s, mask, norm, c = cache.scaling, cache.mask, cache.norm, cache.scale
    n, (out_features, in_features) = x.shape[0], W.shape
    dy = dy.reshape(n, out_features)  # (N, out)

    V = folded_weight(W, A, B, s)  # (out, in): the one (out, in) array, rebuilt as the forward built it
    S = direction_products(dy, cache, V)  # (out,): Σ_batch dy * z
    dm = S / norm  # (out,)
    sc = s * c  # (out,)
    dB = sc[:, None] * (dy.T @ xa)  # (out, r)
    dxa = dy @ (sc[:, None] * B)  # (N, r)
    dA = (xm.T @ dxa).T.copy()  # (r, in): the same sums as dxa.T @ xm, in OpenBLAS's faster order (dense.py)
    k = None
    if not cache.detach_norm:  # the norm's own gradient: k * V reaches V besides c * (dy.T @ xm)
        k = -(c * S) / (norm * norm)  # (out,)
        sk = s * k  # (out,)
        dB += sk[:, None] * (V @ A.T)  # (out, r)
        dA += (sk[:, None] * B).T @ V  # (r, in)

    dW = db = None
    if base_trainable:
        if mask is None:
            dW = dy.T @ x  # (out, in)
            dW *= c[:, None]
        else:
            dW = dy.T @ xm  # (out, in)
            dW *= (c - 1)[:, None]
            dW += dy.T @ x
        if k is not None:
            dW += k[:, None] * V
        db = dy.sum(axis=0) if cache.bias is not None else None  # (out,)

    V *= c[:, None]  # in place: W' = c * V
    if mask is None:
        dx = dy @ V  # (N, in)
    else:
        V -= W  # in place: W' - W, what the dropped-out input sees beyond the base
        dxm = (dy @ V).reshape(cache.x_shape)  # (..., in)
        dxm *= mask
        dx = dy @ W  # (N, in)
        dx += dxm.reshape(n, in_features)
    return DoRAGrads(x=dx.reshape(cache.x_shape), A=dA, B=dB, magnitude=dm, weight=dW, bias=db)


def direction_products(dy: np.ndarray, cache: DoRACache, V: np.ndarray) -> np.ndarray:
    """``S = Σ_batch dy * z`` per output row, ``z = xm @ V.T``, ndarray of shape (out_features,).

    Under dropout ``z`` is in the cache. Without it the forward kept only its
    output ``y = c * z + b``, so ``S = (Σ_batch dy * y - b * Σ_batch dy) / c``
    for the rows with ``|c| >= RECOVER_MIN_SCALE``; the other rows are
    recomputed from ``x @ V[rows].T``.

    Parameters
    ----------
    dy : ndarray of shape (N, out_features)
    cache : DoRACache
    V : ndarray of shape (out_features, in_features)
        ``W + scaling * B @ A``, unscaled.
    """
    if cache.z is not None:
        return np.einsum("ij,ij->j", dy, cache.z)  # (out,)
    y, c = cache.y, cache.scale
    assert y is not None  # set by the forward whenever z is not
    S = np.einsum("ij,ij->j", dy, y)  # (out,)
    if cache.bias is not None:
        S -= cache.bias * dy.sum(axis=0)
    small = np.flatnonzero(np.abs(c) < RECOVER_MIN_SCALE)
    safe = np.where(np.abs(c) < RECOVER_MIN_SCALE, 1.0, c).astype(c.dtype)
    S /= safe
    if small.size:
        zr = cache.x @ V[small].T  # (N, k): the few rows y cannot give back
        S[small] = np.einsum("ij,ij->j", dy[:, small], zr)
    return S
