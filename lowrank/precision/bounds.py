"""A priori bounds on the rounding error of LoRA layers in a low-precision format.

The standard model of floating-point arithmetic, with underflow (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., §2.2 and §3.1):

- rounding to the format: ``|R(z) - z| <= u·|z| + h``, with ``u`` its unit
  roundoff and ``h`` half its smallest subnormal;
- a float32 dot product of ``k`` terms, in any order of summation (and with
  or without fused multiply-adds): ``|fl32(Σ aᵢbᵢ) - Σ aᵢbᵢ| <= γ_k Σ|aᵢ||bᵢ|
  + (1 + γ_k)·k·h32``, ``γ_k = k·v / (1 - k·v)``, ``v = 2**-24``;
- a float32 sum or product of two numbers: relative error at most ``v``
  (a sum never underflows; a product adds at most ``h32``).

Every quantity ``q`` of :mod:`lowrank.precision.kernels` gets a pair ``(M, E)``:
``M >= |q|`` bounds the exact value, ``E >= |q̂ - q|`` the error of the
computed one, so ``|q̂| <= M + E``. Four rules carry the pairs through the
layer, elementwise and with magnitudes as matrices (``|x| @ |W|.T``); they
are written out in ``docs/precision.md`` with the same names. A bound
therefore depends only on the magnitudes of the data, never on the computed
result, and holds whatever order the float32 sums run in. It assumes no
overflow: a result that is ±inf is outside every bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.precision.rounding import FORMATS, smallest_subnormal, unit_roundoff
from lowrank.utils.validation import as_float_array, check_choice, check_real

__all__ = ["Bounded", "dora_linear_bound", "gamma", "lora_linear_bound", "lora_merge_bound"]

_V = 2.0**-24  # float32's unit roundoff: every product accumulates in float32
_H32 = 2.0**-150  # half float32's smallest subnormal


def gamma(k: int, u: float = _V) -> float:
    """``γ_k = k·u / (1 - k·u)``: the relative error bound of a ``k``-term dot product (``k·u < 1``)."""
    if k * u >= 1:
        raise ValueError(f"k * u must be below 1 for gamma_k, got k = {k}, u = {u}")
    return k * u / (1 - k * u)


@dataclass(frozen=True)
class Bounded:
    """A quantity's magnitude bound ``M >= |q|`` and error bound ``E >= |q̂ - q|``, elementwise."""

    M: np.ndarray
    E: np.ndarray


def _data(q: np.ndarray, fmt: str) -> Bounded:
    """An input rounded to ``fmt``: ``E = u·|q| + h``."""
    mag = np.abs(q)
    return Bounded(mag, unit_roundoff(fmt) * mag + smallest_subnormal(fmt) / 2)


def _rounded(exact_mag: np.ndarray, err32: np.ndarray, fmt: str) -> Bounded:
    """``R(q̃)`` of a float32 result ``q̃`` with ``|q̃ - q| <= err32``, ``|q| <= exact_mag``.

    ``|R(q̃) - q| <= |q̃ - q| + u·|q̃| + h <= (1 + u)·err32 + u·exact_mag + h``.
    """
    u = unit_roundoff(fmt)
    return Bounded(exact_mag, (1 + u) * err32 + u * exact_mag + smallest_subnormal(fmt) / 2)


def _product(a: Bounded, b: Bounded, fmt: str, extra: Bounded | None = None) -> Bounded:
    """``R(fl32(â @ b̂.T [+ extra]))`` for ``q = a @ b.T [+ extra]``; ``a`` (N, k), ``b`` (m, k), extra (m,).

    ``|â·b̂ - a·b| <= |a|·E_b + E_a·|b| + E_a·E_b`` (the operands' errors), then
    the float32 sum's ``γ_k·(|a| + E_a)·(|b| + E_b) + (1 + γ_k)·k·h32``; the
    bias, when there is one, is a (k+1)-th term with the exact factor 1.
    """
    k = a.M.shape[-1] + (extra is not None)
    g = gamma(k)
    mag = a.M @ b.M.T  # (N, m)
    operands = a.M @ b.E.T + a.E @ b.M.T + a.E @ b.E.T  # (N, m)
    computed = (a.M + a.E) @ (b.M + b.E).T  # (N, m)
    if extra is not None:
        mag = mag + extra.M
        operands = operands + extra.E
        computed = computed + extra.M + extra.E
    return _rounded(mag, operands + g * computed + (1 + g) * k * _H32, fmt)


def _scaled(s: float, q: Bounded, fmt: str) -> Bounded:
    """``R(fl32(s32 * q̂))`` for ``s·q``: ``s32`` and the product each add a relative ``v``."""
    s = abs(s)
    err32 = s * ((1 + _V) ** 2 - 1) * (q.M + q.E) + s * q.E + _H32
    return _rounded(s * q.M, err32, fmt)


def _sum(p: Bounded, q: Bounded, fmt: str) -> Bounded:
    """``R(fl32(p̂ ± q̂))`` for ``p ± q``: the float32 sum adds ``v·|p̂ ± q̂|``, never an underflow."""
    err32 = p.E + q.E + _V * (p.M + p.E + q.M + q.E)
    return _rounded(p.M + q.M, err32, fmt)


def _delta(A: Bounded, B: Bounded, s: float, fmt: str) -> Bounded:
    """``Δ = R(fl32(s32 * R(fl32(B̂ @ Â))))`` for ``s·B @ A`` (out, in)."""
    At = Bounded(A.M.T, A.E.T)  # (in, r): B @ A = B @ (A.T).T
    return _scaled(s, _product(B, At, fmt), fmt)


def _check_layer(weight: Any, A: Any, B: Any, scaling: Any, fmt: Any) -> tuple[np.ndarray, ...]:
    check_choice(fmt, "fmt", FORMATS)
    check_real(scaling, "scaling")
    w = as_float_array(weight, "weight", np.dtype(np.float64))
    a = as_float_array(A, "A", np.dtype(np.float64))
    b = as_float_array(B, "B", np.dtype(np.float64))
    if w.ndim != 2 or a.ndim != 2 or a.shape[1] != w.shape[1] or b.shape != (w.shape[0], a.shape[0]):
        raise ValueError(
            f"weight (out, in), A (r, in) and B (out, r) must fit, got {w.shape}, {a.shape} and {b.shape}"
        )
    return w, a, b


def lora_merge_bound(weight: Any, A: Any, B: Any, scaling: float, fmt: str, unmerge: bool = False) -> np.ndarray:
    """A bound on ``|Ŵ' - (W + s·B @ A)|`` after :func:`~lowrank.precision.kernels.lora_merge`.

    With ``unmerge=True``: a bound on ``|Ŵ'' - W|`` after merging then
    unmerging (the drift a merge-unmerge round trip leaves in the weight).

    Parameters
    ----------
    weight : array_like of shape (out_features, in_features)
    A : array_like of shape (r, in_features)
    B : array_like of shape (out_features, r)
    scaling : float
    fmt : {"bfloat16", "float16", "float32"}
    unmerge : bool, default False

    Returns
    -------
    ndarray of shape (out_features, in_features), float64
    """
    w, a, b = _check_layer(weight, A, B, scaling, fmt)
    merged, delta = _merge(_data(w, fmt), _data(a, fmt), _data(b, fmt), float(scaling), fmt)
    if unmerge:
        return _sum(merged, delta, fmt).E  # W'' = W' - Δ, with M bounding |W + sBA| + |sBA| >= |W|
    return merged.E


def _merge(w: Bounded, a: Bounded, b: Bounded, s: float, fmt: str) -> tuple[Bounded, Bounded]:
    delta = _delta(a, b, s, fmt)  # (out, in)
    return _sum(w, delta, fmt), delta


def lora_linear_bound(
    x: Any, weight: Any, bias: Any, A: Any, B: Any, scaling: float, fmt: str, form: str = "unmerged"
) -> np.ndarray:
    """A per-element bound on ``|ŷ - y|`` for ``y = x @ W.T + b + s·(x @ A.T) @ B.T`` computed in ``fmt``.

    ``ŷ`` is what :mod:`lowrank.precision.kernels` computes (or any
    implementation that rounds at the same places, whatever the order of its
    float32 sums); ``y`` is exact, from the unrounded inputs.

    Parameters
    ----------
    x : array_like of shape (..., in_features)
    weight : array_like of shape (out_features, in_features)
    bias : array_like of shape (out_features,) or None
    A : array_like of shape (r, in_features)
    B : array_like of shape (out_features, r)
    scaling : float
    fmt : {"bfloat16", "float16", "float32"}
    form : {"unmerged", "merged", "remerged"}, default "unmerged"
        ``"unmerged"``: :func:`~lowrank.precision.kernels.lora_linear`;
        ``"merged"``: :func:`~lowrank.precision.kernels.linear` with the
        weight of ``lora_merge``; ``"remerged"``: ``linear`` with the weight
        of ``lora_unmerge(lora_merge(...))`` and ``y = x @ W.T + b``.

    Returns
    -------
    ndarray of shape (..., out_features), float64

    Notes
    -----
    To first order in ``u`` and ``v`` the unmerged bound is
    ``(4u + (k+2)v)·(|x| @ |W|.T) + (3u + (k+2)v)·|b| + (7u + (k+r+3)v)·|s|·(|x| @ |A|.T) @ |B|.T``
    (``docs/precision.md``).
    """
    form = check_choice(form, "form", ("unmerged", "merged", "remerged"))
    w, a, b = _check_layer(weight, A, B, scaling, fmt)
    xs = as_float_array(x, "x", np.dtype(np.float64))
    if xs.ndim < 1 or xs.shape[-1] != w.shape[1]:
        raise ValueError(f"x must have shape (..., {w.shape[1]}) to fit weight {w.shape}, got {xs.shape}")
    n = math.prod(xs.shape[:-1])
    X = _data(xs.reshape(n, w.shape[1]), fmt)  # (N, in)
    W, Af, Bf = _data(w, fmt), _data(a, fmt), _data(b, fmt)
    bias_b = None
    if bias is not None:
        bias_b = _data(as_float_array(bias, "bias", np.dtype(np.float64)), fmt)
        if bias_b.M.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {bias_b.M.shape}")
    s = float(scaling)
    if form == "unmerged":
        base = _product(X, W, fmt, bias_b)  # (N, out)
        t = _product(X, Af, fmt)  # (N, r)
        u = _product(t, Bf, fmt)  # (N, out)
        y = _sum(base, _scaled(s, u, fmt), fmt)  # (N, out)
    else:
        merged, delta = _merge(W, Af, Bf, s, fmt)  # (out, in)
        if form == "remerged":
            merged = _sum(merged, delta, fmt)
            merged = Bounded(W.M, merged.E)  # the exact weight is W again: |W| bounds it
        y = _product(X, merged, fmt, bias_b)
    return y.E.reshape(*xs.shape[:-1], w.shape[0])


def _times(p: Bounded, q: Bounded, fmt: str) -> Bounded:
    """``R(fl32(p̂ * q̂))`` elementwise (broadcasting) for ``p * q``: the operands' errors, then ``v`` and ``h32``."""
    err32 = p.M * q.E + p.E * q.M + p.E * q.E + _V * (p.M + p.E) * (q.M + q.E) + _H32
    return _rounded(p.M * q.M, err32, fmt)


def dora_linear_bound(
    x: Any, weight: Any, bias: Any, A: Any, B: Any, magnitude: Any, scaling: float, fmt: str
) -> np.ndarray:
    """A per-element bound on ``|ŷ - y|`` for PEFT's DoRA forward (eval, no dropout) computed in ``fmt``.

    The exact ``y = x @ W.T + b + (c - 1)·(x @ W.T) + c·s·(x @ A.T) @ B.T``
    with ``c = m / ‖W + s·B @ A‖_row``; ``ŷ`` rounds where PEFT's
    ``DoraLinearLayer`` does in a 16-bit model, each operation a float32
    result rounded to ``fmt``: ``base = R(x W^T + b)``, ``L = R(B A)``,
    ``V = R(W + R(s L))``, ``n = R(sqrt(fl32(Σ V²)))``, ``c = R(m / n)``,
    ``t = R(x A^T)``, ``u = R(t B^T)``, ``z = R(base - b)``, then
    ``R(R(R(c - 1)·z) + R(R(c·u)·s))`` added to ``base``
    (``docs/precision.md``).

    Parameters
    ----------
    x : array_like of shape (..., in_features)
    weight : array_like of shape (out_features, in_features)
    bias : array_like of shape (out_features,) or None
    A : array_like of shape (r, in_features)
    B : array_like of shape (out_features, r)
    magnitude : array_like of shape (out_features,)
    scaling : float
    fmt : {"bfloat16", "float16", "float32"}

    Returns
    -------
    ndarray of shape (..., out_features), float64
        ``inf`` in the columns whose row norm is not larger than its own
        error bound (the computed norm could be 0).

    Raises
    ------
    ValueError
        Shapes that do not fit.
    """
    w, a, b = _check_layer(weight, A, B, scaling, fmt)
    xs = as_float_array(x, "x", np.dtype(np.float64))
    m = as_float_array(magnitude, "magnitude", np.dtype(np.float64))
    if xs.ndim < 1 or xs.shape[-1] != w.shape[1]:
        raise ValueError(f"x must have shape (..., {w.shape[1]}) to fit weight {w.shape}, got {xs.shape}")
    if m.shape != (w.shape[0],):
        raise ValueError(f"magnitude must have shape ({w.shape[0]},), got {m.shape}")
    u_f, h = unit_roundoff(fmt), smallest_subnormal(fmt) / 2
    s, k = float(scaling), w.shape[1]
    n_rows = math.prod(xs.shape[:-1])
    X = _data(xs.reshape(n_rows, k), fmt)  # (N, in)
    W, Af, Bf, M = _data(w, fmt), _data(a, fmt), _data(b, fmt), _data(m, fmt)
    bias_b = None
    if bias is not None:
        bias_b = _data(as_float_array(bias, "bias", np.dtype(np.float64)), fmt)
        if bias_b.M.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {bias_b.M.shape}")
    base = _product(X, W, fmt, bias_b)  # (N, out): x W^T + b
    V, _ = _merge(W, Af, Bf, s, fmt)  # (out, in): R(W + R(s R(B A)))
    # the exact row norms, in float64 (their own error, ~k·2**-53 relative, is the 1e-12 taken off)
    n = np.sqrt(np.sum(np.square(w + s * (b @ a)), axis=1)) * (1 - 1e-12)  # (out,)
    # n̂ = R(sqrt32(fl32(Σ V̂²))) = ‖V̂‖(1 + η) (+ underflow), and |‖V̂‖ - n| <= ‖E_V‖_row
    eta = (1 + gamma(k)) * (1 + _V) * (1 + u_f) - 1
    E_n = np.sqrt(np.sum(np.square(V.E), axis=1)) * (1 + eta) + n * eta + k * _H32 + h  # (out,)
    n_low = n - E_n  # (out,): > 0 where the norm is resolved
    resolved = n_low > 0
    safe_n, safe_low = np.where(resolved, n, 1.0), np.where(resolved, n_low, 1.0)  # the others: inf below
    div = M.E / safe_low + M.M * E_n / (safe_n * safe_low)  # (out,): |m̂/n̂ - m/n|
    c_mag = M.M / safe_n  # (out,)
    c = _rounded(c_mag, div + _V * (c_mag + div) + _H32, fmt)  # R(fl32(m̂ / n̂))
    one = Bounded(np.ones_like(c.M), np.zeros_like(c.E))
    c_minus_1 = _sum(c, one, fmt)  # (out,): R(ĉ - 1)
    z = base if bias_b is None else _sum(base, bias_b, fmt)  # (N, out): R(base - b), exact x W^T
    t = _product(X, Af, fmt)  # (N, r)
    lora = _product(t, Bf, fmt)  # (N, out)
    dora = _sum(_times(c_minus_1, z, fmt), _scaled(s, _times(c, lora, fmt), fmt), fmt)  # (N, out)
    y = _sum(base, dora, fmt)  # (N, out)
    E = np.where(resolved, y.E, np.inf)  # (N, out): an unresolved norm leaves its column unbounded
    return E.reshape(*xs.shape[:-1], w.shape[0])
