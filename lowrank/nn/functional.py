"""Forward/backward kernel pairs: linear, LoRA, activations, dropout and losses.

Every forward returns ``(out, cache)``; every backward takes ``(dout, cache)``
and returns fresh arrays. A cache is a small frozen dataclass holding what the
backward pass needs: references to the caller's arrays (not copies) and the
small intermediates, never a new ``(out, in)``-sized array. Do not modify the
forward's inputs in place before calling the backward.

``x`` may have any number of leading batch dimensions ``(..., features)``; the
kernels flatten them to ``N = prod(batch dims)`` rows for the matrix products
(a reshape, so no copy for contiguous input) and restore them on the way out.
float32 in gives float32 out and float32 gradients. Parameters must share
``x``'s dtype; masks, targets and upstream gradients are cast to it.

The symbols are those of ``docs/lora.md``: ``x``, ``weight`` (``W``),
``bias`` (``b``), ``A``, ``B``, ``scaling``, ``mask``, ``xm = x * mask``,
``xa = xm @ A.T``, the upstream gradient ``dy``, and ``dxa``/``dxm`` for the
gradients with respect to ``xa``/``xm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.utils.validation import (
    RandomState,
    as_float_array,
    check_bool,
    check_choice,
    check_float_dtype,
    check_int,
    check_random_state,
    check_real,
)

__all__ = [
    "DropoutCache",
    "GELUCache",
    "LinearCache",
    "LinearGrads",
    "LoRACache",
    "LoRAGrads",
    "ReLUCache",
    "SigmoidCache",
    "TanhCache",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "dropout",
    "dropout_backward",
    "dropout_mask",
    "gelu",
    "gelu_backward",
    "linear",
    "linear_backward",
    "lora_linear",
    "lora_linear_backward",
    "mse_loss",
    "relu",
    "relu_backward",
    "sigmoid",
    "sigmoid_backward",
    "tanh",
    "tanh_backward",
]


# ---------------------------------------------------------------- validation


def _as_input(x: Any, name: str = "x") -> np.ndarray:
    """``x`` as a float array of at least one dimension (the feature axis)."""
    arr = as_float_array(x, name)
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (..., features), got a scalar")
    return arr


def _as_param(value: Any, name: str, dtype: np.dtype) -> np.ndarray:
    """A parameter array, which must compute in ``x``'s dtype (no silent casts of weights)."""
    arr = as_float_array(value, name)
    if arr.dtype != dtype:
        raise TypeError(
            f"{name} must have the same dtype as x, got {name} {arr.dtype} and x {dtype}; "
            f"cast one of them with .astype"
        )
    return arr


def _as_mask(mask: Any, x: np.ndarray, name: str) -> np.ndarray:
    """A dropout mask that broadcasts to ``x.shape``, cast to ``x``'s dtype."""
    arr = as_float_array(mask, name)
    try:
        fits = np.broadcast_shapes(arr.shape, x.shape) == x.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{name} must broadcast to x's shape {x.shape}, got shape {arr.shape}")
    return arr.astype(x.dtype, copy=False)


def _as_grad(dy: Any, shape: tuple[int, ...], dtype: np.dtype, what: str, name: str = "dy") -> np.ndarray:
    """An upstream gradient of exactly ``shape``, cast to the forward's dtype."""
    arr = as_float_array(dy, name)
    if arr.shape != shape:
        raise ValueError(f"{name} must have the shape of {what}, {shape}, got shape {arr.shape}")
    return arr.astype(dtype, copy=False)


def _check_cache(cache: Any, cls: type, forward: str) -> None:
    if not isinstance(cache, cls):
        raise TypeError(
            f"cache must be the {cls.__name__} returned by {forward}(), got {type(cache).__name__}"
        )



def _check_weight(weight: Any, dtype: np.dtype) -> np.ndarray:
    weight = _as_param(weight, "weight", dtype)
    if weight.ndim != 2 or weight.size == 0:
        raise ValueError(
            f"weight must be a non-empty 2-D array of shape (out_features, in_features), "
            f"got shape {weight.shape}"
        )
    return weight


def _check_fits(x: np.ndarray, weight: np.ndarray) -> None:
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x of shape {x.shape} does not fit weight of shape {weight.shape}: "
            f"x's last dimension must be in_features = {weight.shape[1]}"
        )


def _check_bias(bias: Any, weight: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    if bias is None:
        return None
    bias = _as_param(bias, "bias", dtype)
    if bias.shape != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape (out_features,) = ({weight.shape[0]},) to fit weight of shape "
            f"{weight.shape}, got shape {bias.shape}"
        )
    return bias


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
    x = _as_input(x)
    weight = _check_weight(weight, x.dtype)
    _check_fits(x, weight)
    bias = _check_bias(bias, weight, x.dtype)
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
    _check_cache(cache, LinearCache, "linear")
    trainable = check_bool(trainable, "trainable")
    x, W = cache.x, cache.weight
    out_features, in_features = W.shape
    dy = _as_grad(dy, (*cache.batch_shape, out_features), x.dtype, "the output y")
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


def _fold_pays(n: int, other_side: int) -> bool:
    """Whether folding ``scaling * B @ A`` into a temporary ``W + scaling * B @ A`` is cheaper.

    Folding replaces an ``(N, r) @ (r, k)`` product and an add pass over its
    ``(N, k)`` result (the forward's ``xa @ B.T`` with ``k = out``, the
    backward's ``dxa @ A`` with ``k = in``) by an ``(out, r) @ (r, in)`` product
    and an add pass over an ``(out, in)`` temporary. Both costs are ``k * (r + 1)``
    times either ``N`` or the other side of ``W``, so folding pays exactly when
    ``N`` exceeds that other side: ``in`` in the forward, ``out`` in the backward.
    """
    return n > other_side


def _merged_with(weight: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float, extra: np.ndarray,
                 axis: int) -> np.ndarray:
    """``W + scaling * B @ A`` with the thin ``extra`` appended along ``axis``: a temporary, never cached.

    One large product with this stacked matrix gives two results in a single
    pass over ``x`` (or ``dy``): the thin products are memory-bound, so
    reading the batch once instead of twice is what keeps a LoRA step within
    10 % of the two products it cannot avoid (1.08× instead of 1.14×,
    measured). Each output entry is the same sum either way, in the BLAS's
    order for the stacked shape.
    """
    out_features, in_features = weight.shape
    if axis == 0:  # rows: [W + scaling B A ; A], shape (out + r, in)
        stacked = np.empty_like(weight, shape=(out_features + extra.shape[0], in_features))
        stacked[out_features:] = extra
    else:  # columns: [W + scaling B A | scaling B], shape (out, in + r)
        stacked = np.empty_like(weight, shape=(out_features, in_features + extra.shape[1]))
        stacked[:, in_features:] = extra
    merged = stacked[:out_features, :in_features]  # a view: the fold is written in place
    np.matmul(scaling * B, A, out=merged)  # (out, in)
    merged += weight
    return stacked


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
    y : ndarray of shape (..., out_features)
        On the stacked path (below) a view of an ``(N, out + r)`` array, so
        not C-contiguous; ``np.ascontiguousarray(y)`` if that matters.
    cache : LoRACache

    Notes
    -----
    The low-rank term is evaluated as ``(xm @ A.T) @ (scaling * B).T``, costing
    ``N * r * (in + out)`` multiply-adds, never by forming ``B @ A`` for a small
    batch. Without dropout and when ``N > in_features``, ``scaling * B @ A``
    is instead folded into a temporary ``W + scaling * B @ A`` (``out * r * in``
    multiply-adds), stacked above ``A``, and one large product gives both
    ``y`` and ``xa`` (which the backward pass needs). The orders agree to
    rounding. A fresh adapter (``B = 0``) adds nothing and skips the low-rank
    term, so its output is the base output bit for bit.
    """
    x = _as_input(x)
    weight = _check_weight(weight, x.dtype)
    _check_fits(x, weight)
    bias = _check_bias(bias, weight, x.dtype)
    A = _as_param(A, "A", x.dtype)
    B = _as_param(B, "B", x.dtype)
    out_features, in_features = weight.shape
    if A.ndim != 2 or A.shape[0] == 0 or A.shape[1] != in_features:
        raise ValueError(
            f"A must have shape (r, in_features) with r >= 1 and in_features = {in_features} "
            f"from weight of shape {weight.shape}, got A of shape {A.shape}"
        )
    r = A.shape[0]
    if B.shape != (out_features, r):
        raise ValueError(
            f"B must have shape (out_features, r) = ({out_features}, {r}) to fit weight of shape "
            f"{weight.shape} and A of shape {A.shape}, got B of shape {B.shape}"
        )
    scaling = check_real(scaling, "scaling")
    mask = None if dropout_mask is None else _as_mask(dropout_mask, x, "dropout_mask")

    n = math.prod(x.shape[:-1])
    x2 = x.reshape(n, in_features)  # (N, in)
    xm = x2 if mask is None else (x * mask).reshape(n, in_features)  # (N, in)
    if not B.any():
        # A fresh adapter (B = 0) adds exactly nothing: the base output, bit for bit.
        xa = xm @ A.T  # (N, r): the backward pass needs it all the same
        y = x2 @ weight.T  # (N, out)
    elif mask is None and _fold_pays(n, in_features):
        # x @ [W + scaling B A ; A].T gives y and xa in one pass over x
        y_xa = x2 @ _merged_with(weight, A, B, scaling, A, axis=0).T  # (N, out + r)
        y = y_xa[:, :out_features]  # (N, out), a view
        xa = y_xa[:, out_features:].copy()  # (N, r): a copy, so the cache does not keep y alive
    else:
        xa = xm @ A.T  # (N, r)
        y = x2 @ weight.T  # (N, out)
        y += xa @ (scaling * B).T  # (N, out); scaling applied to the small B
    if bias is not None:
        y += bias
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
        ``.x`` (..., in_features; on the stacked path a view of an
        ``(N, in + r)`` array), ``.A`` (r, in_features), ``.B``
        (out_features, r); ``.weight`` (out_features, in_features) and
        ``.bias`` (out_features,) or None.
    """
    _check_cache(cache, LoRACache, "lora_linear")
    base_trainable = check_bool(base_trainable, "base_trainable")
    x, xm, xa, W, A, B = cache.x, cache.xm, cache.xa, cache.weight, cache.A, cache.B
    scaling, mask = cache.scaling, cache.mask
    n, (out_features, in_features) = x.shape[0], W.shape
    dy = _as_grad(dy, (*cache.x_shape[:-1], out_features), x.dtype, "the output y")
    dy = dy.reshape(n, out_features)  # (N, out)

    dB = scaling * (dy.T @ xa)  # (out, r)
    if mask is None and _fold_pays(n, out_features):
        # dx = dy @ W + dxa @ A = dy @ (W + scaling B A), and dxa = dy @ (scaling B):
        # dy @ [W + scaling B A | scaling B] gives both in one pass over dy
        dx_dxa = dy @ _merged_with(W, A, B, scaling, scaling * B, axis=1)  # (N, in + r)
        dx, dxa = dx_dxa[:, :in_features], dx_dxa[:, in_features:]  # views
    else:
        dxa = dy @ (scaling * B)  # (N, r): the gradient reaching xa
        dxm = (dxa @ A).reshape(cache.x_shape)  # (..., in): the gradient reaching xm = x * mask
        if mask is not None:
            dxm *= mask  # in place: no second (..., in) temporary
        dx = (dy @ W).reshape(cache.x_shape)  # (..., in): the base path's share
        dx += dxm
    dx = dx.reshape(cache.x_shape)
    # dA = dxa.T @ xm, computed as (xm.T @ dxa).T: the same sums, but OpenBLAS
    # runs an (in, N) @ (N, r) product faster than (r, N) @ (N, in) with its
    # long inner dimension (3.4 against 4.9 ms at N = 8192, in = 1024, r = 8).
    dA = (xm.T @ dxa).T  # (r, in)

    dW = db = None
    if base_trainable:
        dW = dy.T @ x  # (out, in): the product a frozen base never pays for
        db = dy.sum(axis=0) if cache.has_bias else None  # (out,)
    return LoRAGrads(x=dx, A=dA, B=dB, weight=dW, bias=db)


# ---------------------------------------------------------------- activations


@dataclass(frozen=True, slots=True)
class ReLUCache:
    """``x``, the input of :func:`relu`."""

    x: np.ndarray


@dataclass(frozen=True, slots=True)
class TanhCache:
    """``y = tanh(x)``, the output of :func:`tanh`."""

    y: np.ndarray


@dataclass(frozen=True, slots=True)
class SigmoidCache:
    """``y = sigmoid(x)``, the output of :func:`sigmoid`."""

    y: np.ndarray


@dataclass(frozen=True, slots=True)
class GELUCache:
    """The input ``x`` of :func:`gelu`, its ``cdf`` (``gelu(x) = x * cdf``) and the form used."""

    x: np.ndarray
    cdf: np.ndarray
    approximate: str


def relu(x: Any) -> tuple[np.ndarray, ReLUCache]:
    """``y = max(x, 0)``, elementwise.

    Parameters
    ----------
    x : ndarray of any shape

    Returns
    -------
    y : ndarray of x's shape
    cache : ReLUCache
    """
    x = as_float_array(x, "x")
    return np.maximum(x, 0), ReLUCache(x)


def relu_backward(dy: Any, cache: ReLUCache) -> np.ndarray:
    """``dx = dy * (x > 0)``; the derivative at 0 is taken as 0, as PyTorch does."""
    _check_cache(cache, ReLUCache, "relu")
    dy = _as_grad(dy, cache.x.shape, cache.x.dtype, "x")
    return dy * (cache.x > 0)


def tanh(x: Any) -> tuple[np.ndarray, TanhCache]:
    """``y = tanh(x)``, elementwise. Shapes as in :func:`relu`."""
    x = as_float_array(x, "x")
    y = np.tanh(x)
    return y, TanhCache(y)


def tanh_backward(dy: Any, cache: TanhCache) -> np.ndarray:
    """``dx = dy * (1 - y**2)`` with ``y = tanh(x)``."""
    _check_cache(cache, TanhCache, "tanh")
    dy = _as_grad(dy, cache.y.shape, cache.y.dtype, "x")
    return dy * (1 - cache.y * cache.y)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` without overflow: ``exp`` only ever sees ``-|x|``."""
    z = np.exp(-np.abs(x))  # in (0, 1]
    return np.where(x >= 0, 1 / (1 + z), z / (1 + z))


def sigmoid(x: Any) -> tuple[np.ndarray, SigmoidCache]:
    """``y = 1 / (1 + exp(-x))``, elementwise and overflow-free. Shapes as in :func:`relu`."""
    x = as_float_array(x, "x")
    y = _sigmoid(x)
    return y, SigmoidCache(y)


def sigmoid_backward(dy: Any, cache: SigmoidCache) -> np.ndarray:
    """``dx = dy * y * (1 - y)`` with ``y = sigmoid(x)``."""
    _check_cache(cache, SigmoidCache, "sigmoid")
    dy = _as_grad(dy, cache.y.shape, cache.y.dtype, "x")
    return dy * cache.y * (1 - cache.y)


# erfc by W. J. Cody's rational Chebyshev approximations ("Rational Chebyshev
# approximations for the error function", Math. Comp. 23 (1969) 631-638; the
# coefficients of netlib specfun CALERF), accurate to double precision. NumPy has
# no erf, and the runtime may depend on nothing else. Each tuple is highest power first.
_ERF_SMALL_P = (0.185777706184603153, 3.16112374387056560, 113.864154151050156,
                377.485237685302021, 3209.37758913846947)  # fmt: skip
_ERF_SMALL_Q = (1.0, 23.6012909523441209, 244.024637934444173, 1282.61652607737228,
                2844.23683343917062)  # fmt: skip
_ERFC_MID_P = (2.15311535474403846e-8, 0.564188496988670089, 8.88314979438837594,
               66.1191906371416295, 298.635138197400131, 881.952221241769090,
               1712.04761263407058, 2051.07837782607147, 1230.33935479799725)  # fmt: skip
_ERFC_MID_Q = (1.0, 15.7449261107098347, 117.693950891312499, 537.181101862009858,
               1621.38957456669019, 3290.79923573345963, 4362.61909014324716,
               3439.36767414372164, 1230.33935480374942)  # fmt: skip
_ERFC_BIG_P = (0.0163153871373020978, 0.305326634961232344, 0.360344899949804439,
               0.125781726111229246, 0.0160837851487422766, 6.58749161529837803e-4)  # fmt: skip
_ERFC_BIG_Q = (1.0, 2.56852019228982242, 1.87295284992346047, 0.527905102951428412,
               0.0605183413124413191, 0.00233520497626869185)  # fmt: skip
_ERFC_ZERO_FROM = 26.543  # erfc(y) underflows to 0 in float64 for y >= this


def _exp_minus_square(y: np.ndarray) -> np.ndarray:
    """``exp(-y**2)``, split as Cody does so that the rounding of ``y**2`` does not cost digits."""
    y16 = np.trunc(y * 16) / 16  # y**2 = y16**2 + (y - y16) * (y + y16), the first term exact
    return np.exp(-y16 * y16) * np.exp(-(y - y16) * (y + y16))


def _erfc(z: np.ndarray) -> np.ndarray:
    """The complementary error function of a float64 array, to double precision (Cody 1969)."""
    y = np.abs(z)
    out = np.empty_like(z)
    small = y <= 0.46875  # erf(z) = z * P(z²) / Q(z²)
    mid = (y > 0.46875) & (y <= 4.0)  # erfc(y) = exp(-y²) * P(y) / Q(y)
    big = ~(small | mid)  # erfc(y) = exp(-y²) / y * (1/sqrt(pi) - t P(t) / Q(t)), t = 1/y²; NaN too
    zs = z[small]
    ysq = zs * zs
    out[small] = 1.0 - zs * np.polyval(_ERF_SMALL_P, ysq) / np.polyval(_ERF_SMALL_Q, ysq)
    ym = y[mid]
    out[mid] = np.polyval(_ERFC_MID_P, ym) / np.polyval(_ERFC_MID_Q, ym) * _exp_minus_square(ym)
    yb = np.minimum(y[big], _ERFC_ZERO_FROM)  # keeps 1/y² and exp away from overflow warnings
    t = 1.0 / (yb * yb)
    tail = (1 / math.sqrt(math.pi) - t * np.polyval(_ERFC_BIG_P, t) / np.polyval(_ERFC_BIG_Q, t)) / yb
    out[big] = np.where(y[big] >= _ERFC_ZERO_FROM, 0.0, tail * _exp_minus_square(yb))
    far = ~small & (z < 0)
    out[far] = 2.0 - out[far]  # erfc(-y) = 2 - erfc(y)
    return out


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_TANH_K = 0.044715


def gelu(x: Any, approximate: str = "none") -> tuple[np.ndarray, GELUCache]:
    """``y = x * Φ(x)``, Φ the standard normal CDF, as ``torch.nn.functional.gelu``.

    Parameters
    ----------
    x : ndarray of any shape
    approximate : {"none", "tanh"}, default "none"
        ``"none"``: ``Φ(x) = erfc(-x / sqrt(2)) / 2`` (the erf form, computed
        through erfc so that large negative ``x`` keeps its relative accuracy);
        ``"tanh"``: ``Φ(x) ≈ (1 + tanh(sqrt(2/π) * (x + 0.044715 x³))) / 2``.

    Returns
    -------
    y : ndarray of x's shape
    cache : GELUCache
    """
    x = as_float_array(x, "x")
    approximate = check_choice(approximate, "approximate", ("none", "tanh"))
    if approximate == "none":
        # float64 for erfc, whatever x's dtype; cast once
        cdf = (0.5 * _erfc(x.astype(np.float64) * -math.sqrt(0.5))).astype(x.dtype, copy=False)
    else:
        cdf = 0.5 * (1 + np.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_K * x**3)))
    return x * cdf, GELUCache(x=x, cdf=cdf, approximate=approximate)


def gelu_backward(dy: Any, cache: GELUCache) -> np.ndarray:
    """``dx = dy * (cdf + x * cdf')``.

    ``cdf' = exp(-x²/2) / sqrt(2π)`` for the erf form; for the tanh form
    ``cdf' = 2 cdf (1 - cdf) sqrt(2/π) (1 + 3 * 0.044715 x²)``, using
    ``1 - tanh² = 4 cdf (1 - cdf)``.
    """
    _check_cache(cache, GELUCache, "gelu")
    x, cdf = cache.x, cache.cdf
    dy = _as_grad(dy, x.shape, x.dtype, "x")
    if cache.approximate == "none":
        dcdf = np.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    else:
        dcdf = 2 * cdf * (1 - cdf) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_K * x * x)
    return dy * (cdf + x * dcdf)


# ---------------------------------------------------------------- dropout


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
    mask = _as_mask(mask, x, "mask")
    return x * mask, DropoutCache(mask=mask, shape=x.shape)


def dropout_backward(dy: Any, cache: DropoutCache) -> np.ndarray:
    """``dx = dy * mask``."""
    _check_cache(cache, DropoutCache, "dropout")
    dy = _as_grad(dy, cache.shape, cache.mask.dtype, "x")
    return dy * cache.mask


# ---------------------------------------------------------------- losses
# Each returns (loss, gradient): the loss a Python float accumulated in float64,
# the gradient with respect to the prediction in its dtype. Reduction: the mean.


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not np.isfinite(arr).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise ValueError(f"{name} must be finite, got {arr[index]} at index {index}")


def _check_nonempty(arr: np.ndarray, name: str) -> None:
    if arr.size == 0:
        raise ValueError(f"{name} must hold at least one element for the mean, got shape {arr.shape}")


def mse_loss(pred: Any, target: Any) -> tuple[float, np.ndarray]:
    """Mean squared error ``mean((pred - target)**2)`` and ``dpred = 2 (pred - target) / n``.

    Parameters
    ----------
    pred : ndarray of any non-empty shape
    target : ndarray of pred's shape
        Cast to ``pred``'s float computation.

    Returns
    -------
    loss : float
    dpred : ndarray of pred's shape and dtype
    """
    pred = as_float_array(pred, "pred")
    target = as_float_array(target, "target")
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {pred.shape}, got shape {target.shape}")
    _check_nonempty(pred, "pred")
    _check_finite(pred, "pred")
    _check_finite(target, "target")
    diff = pred.astype(np.float64) - target  # float64
    loss = float(np.mean(diff * diff))
    return loss, (diff * (2.0 / diff.size)).astype(pred.dtype)


def cross_entropy(logits: Any, target: Any) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy with integer class targets, mean over all leading dims.

    ``loss = mean(logsumexp(logits) - logits[target])`` and
    ``dlogits = (softmax(logits) - onehot(target)) / n``, computed in float64
    after subtracting each row's maximum, so large logits stay finite.

    Parameters
    ----------
    logits : ndarray of shape (..., C)
    target : ndarray of int of shape (...)
        Class indices in ``[0, C)``.

    Returns
    -------
    loss : float
    dlogits : ndarray of logits' shape and dtype
    """
    logits = _as_input(logits, "logits")
    target = np.asarray(target)
    if target.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target must have shape logits.shape[:-1] = {logits.shape[:-1]} for logits of shape "
            f"{logits.shape}, got target of shape {target.shape}"
        )
    _check_nonempty(target, "target")
    n_classes = logits.shape[-1]
    bad = (target < 0) | (target >= n_classes)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"target must hold class indices in [0, C-1] = [0, {n_classes - 1}], "
            f"got {target[index]} at index {index}"
        )
    _check_finite(logits, "logits")
    n = target.size
    z = logits.reshape(n, n_classes).astype(np.float64)  # (n, C), a float64 copy
    z -= z.max(axis=1, keepdims=True)  # each row's max is 0: exp never overflows
    lse = np.log(np.exp(z).sum(axis=1))  # (n,)
    rows, t = np.arange(n), target.reshape(n)
    loss = float(np.mean(lse - z[rows, t]))
    dz = np.exp(z - lse[:, None])  # softmax, (n, C)
    dz[rows, t] -= 1.0
    dz /= n
    return loss, dz.astype(logits.dtype).reshape(logits.shape)


def binary_cross_entropy_with_logits(logits: Any, target: Any) -> tuple[float, np.ndarray]:
    """Binary cross-entropy on logits, mean reduction, in the stable form.

    ``loss_i = max(z, 0) - z t + log1p(exp(-|z|))`` (equal to
    ``-t log σ(z) - (1 - t) log(1 - σ(z))`` without overflow) and
    ``dlogits = (σ(z) - t) / n``.

    Parameters
    ----------
    logits : ndarray of any non-empty shape
    target : ndarray of logits' shape
        Values in [0, 1] (soft labels allowed).

    Returns
    -------
    loss : float
    dlogits : ndarray of logits' shape and dtype
    """
    logits = as_float_array(logits, "logits")
    target = as_float_array(target, "target")
    if target.shape != logits.shape:
        raise ValueError(f"target must have logits' shape {logits.shape}, got shape {target.shape}")
    _check_nonempty(logits, "logits")
    _check_finite(logits, "logits")
    if not ((target >= 0) & (target <= 1)).all():
        index = tuple(int(i) for i in np.argwhere(~((target >= 0) & (target <= 1)))[0])
        raise ValueError(f"target must hold values in [0, 1], got {target[index]} at index {index}")
    z = logits.astype(np.float64)
    t = target.astype(np.float64)
    loss = float(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
    return loss, ((_sigmoid(z) - t) / z.size).astype(logits.dtype)
