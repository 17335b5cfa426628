"""Mixed-precision LoRA kernels, emulated: operands in a 16-bit format, products accumulated in float32.

Each operation is modelled the way PyTorch runs a bfloat16 or float16 LoRA
layer (PEFT's ``Linear.forward``, CPU and GPU alike): the operands of every
matrix product are values of the format, the product accumulates in float32,
and its result is rounded back to the format before the next operation reads
it. Elementwise operations (the scaling, the sum of the two paths) compute in
float32 and round once. The sequence, with ``R`` the rounding to the format
and ``fl32`` a float32 evaluation::

    x̂, Ŵ, b̂, Â, B̂ = R(x), R(W), R(b), R(A), R(B)
    base = R(fl32(x̂ @ Ŵ.T + b̂))          # the bias joins the float32 sum
    t    = R(fl32(x̂ @ Â.T))              # (N, r)
    u    = R(fl32(t @ B̂.T))              # (N, out)
    v    = R(fl32(s32 * u))               # s32: the scaling as a float32
    y    = R(fl32(base + v))

The order of the float32 sums inside a product is the BLAS's (NumPy's float32
``matmul``): PyTorch's is its own and differs by shape and machine, so the
emulation matches PyTorch within a few units in the last place, not bit for
bit. The bounds of :mod:`lowrank.precision.bounds` hold for every order.

Merging follows PEFT's ``get_delta_weight`` and ``merge``: ``Δ = R(fl32(s32 *
R(fl32(B̂ @ Â))))``, ``W' = R(fl32(Ŵ + Δ))``; unmerging subtracts the same
``Δ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from lowrank.precision.rounding import FORMATS, round_to_core
from lowrank.utils.validation import as_float_array, check_choice, check_real

__all__ = [
    "PrecisionLoRACache",
    "PrecisionLoRAGrads",
    "linear",
    "lora_linear",
    "lora_linear_backward",
    "lora_merge",
    "lora_unmerge",
]


def _round32(x: np.ndarray, fmt: str) -> np.ndarray:
    """Round float32 values computed in float32 to ``fmt`` (float32 out)."""
    return round_to_core(np.asarray(x, np.float32), fmt)


def _operand(x: Any, name: str, fmt: str) -> np.ndarray:
    """A float array rounded to ``fmt``, held as float32 (rounded once, from float64 if given float64)."""
    return round_to_core(as_float_array(x, name), fmt).astype(np.float32, copy=False)


def _check(fmt: str, scaling: Any) -> tuple[str, np.float32]:
    check_choice(fmt, "fmt", FORMATS)
    return fmt, np.float32(check_real(scaling, "scaling"))


def _check_shapes(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {weight.shape}")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have shape (..., {weight.shape[1]}) to fit weight {weight.shape}, got {x.shape}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")


def _check_factors(weight: np.ndarray, A: np.ndarray, B: np.ndarray) -> None:
    out_features, in_features = weight.shape
    if A.ndim != 2 or A.shape[1] != in_features:
        raise ValueError(f"A must have shape (r, {in_features}), got {A.shape}")
    if B.shape != (out_features, A.shape[0]):
        raise ValueError(f"B must have shape ({out_features}, {A.shape[0]}), got {B.shape}")


def linear(x: Any, weight: Any, bias: Any = None, fmt: str = "bfloat16") -> np.ndarray:
    """``y = R(fl32(x̂ @ Ŵ.T + b̂))``: a linear layer in ``fmt`` with float32 accumulation.

    Parameters
    ----------
    x : array_like of shape (..., in_features)
    weight : array_like of shape (out_features, in_features)
    bias : array_like of shape (out_features,), optional
    fmt : {"bfloat16", "float16", "float32"}

    Returns
    -------
    ndarray of shape (..., out_features), float32 holding values of ``fmt``
    """
    check_choice(fmt, "fmt", FORMATS)
    xr, wr = _operand(x, "x", fmt), _operand(weight, "weight", fmt)
    br = None if bias is None else _operand(bias, "bias", fmt)
    _check_shapes(xr, wr, br)
    return _linear_core(xr, wr, br, fmt)


def _linear_core(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, fmt: str) -> np.ndarray:
    y = x @ weight.T  # (..., out), float32 accumulation
    if bias is not None:
        y += bias  # the last term of the float32 sum
    return _round32(y, fmt)


@dataclass(frozen=True)
class PrecisionLoRACache:
    """What :func:`lora_linear_backward` needs: the rounded operands and ``t``, all float32."""

    x: np.ndarray  # (N, in)
    weight: np.ndarray  # (out, in)
    A: np.ndarray  # (r, in)
    B: np.ndarray  # (out, r)
    t: np.ndarray  # (N, r)
    scaling: np.float32
    fmt: str
    x_shape: tuple[int, ...]


class PrecisionLoRAGrads(NamedTuple):
    """Gradients of :func:`lora_linear`, float32 holding values of the format.

    ``x`` (..., in_features), ``A`` (r, in_features), ``B`` (out_features, r).
    """

    x: np.ndarray
    A: np.ndarray
    B: np.ndarray


def lora_linear(
    x: Any, weight: Any, bias: Any, A: Any, B: Any, scaling: float, fmt: str = "bfloat16"
) -> tuple[np.ndarray, PrecisionLoRACache]:
    """``y = x @ W.T + b + scaling * (x @ A.T) @ B.T`` in ``fmt``, unmerged, as PEFT evaluates it.

    The sequence of roundings is the module docstring's: ``base``, ``t``,
    ``u``, ``v``, ``y``, each a float32 result rounded to ``fmt``.

    Parameters
    ----------
    x : array_like of shape (..., in_features)
    weight : array_like of shape (out_features, in_features)
    bias : array_like of shape (out_features,) or None
    A : array_like of shape (r, in_features)
    B : array_like of shape (out_features, r)
    scaling : float
    fmt : {"bfloat16", "float16", "float32"}

    Returns
    -------
    y : ndarray of shape (..., out_features), float32 holding values of ``fmt``
    cache : PrecisionLoRACache
    """
    fmt, s32 = _check(fmt, scaling)
    xr, wr = _operand(x, "x", fmt), _operand(weight, "weight", fmt)
    br = None if bias is None else _operand(bias, "bias", fmt)
    ar, b_r = _operand(A, "A", fmt), _operand(B, "B", fmt)
    _check_shapes(xr, wr, br)
    _check_factors(wr, ar, b_r)
    x_shape = xr.shape
    x2 = xr.reshape(math.prod(x_shape[:-1]), x_shape[-1])  # (N, in)
    base = _linear_core(x2, wr, br, fmt)  # (N, out)
    t = _round32(x2 @ ar.T, fmt)  # (N, r)
    u = _round32(t @ b_r.T, fmt)  # (N, out)
    v = _round32(s32 * u, fmt)  # (N, out)
    y = _round32(base + v, fmt)  # (N, out)
    cache = PrecisionLoRACache(x2, wr, ar, b_r, t, s32, fmt, x_shape)
    return y.reshape(*x_shape[:-1], wr.shape[0]), cache


def lora_linear_backward(dy: Any, cache: PrecisionLoRACache) -> PrecisionLoRAGrads:
    """Gradients of :func:`lora_linear` in its format, as PyTorch's autograd computes them.

    With ``dŷ = R(dy)`` and every product accumulated in float32 then rounded:
    ``du = R(s32 * dŷ)``, ``dB = R(du.T @ t)``, ``dt = R(du @ B̂)``,
    ``dA = R(dt.T @ x̂)``, ``dx = R(R(dŷ @ Ŵ) + R(dt @ Â))`` (autograd sums
    the two paths' gradients of ``x`` in float32). In exact arithmetic these
    are ``dB = s dyᵀ(xAᵀ)``, ``dA = s (dy B)ᵀ x``, ``dx = dy W + s dy B A``
    (derivation: ``docs/lora.md``).

    Parameters
    ----------
    dy : array_like of shape (..., out_features)
    cache : PrecisionLoRACache

    Returns
    -------
    PrecisionLoRAGrads
    """
    if not isinstance(cache, PrecisionLoRACache):
        raise TypeError(f"cache must be the PrecisionLoRACache lora_linear returned, got {type(cache).__name__}")
    fmt = cache.fmt
    shape = (*cache.x_shape[:-1], cache.weight.shape[0])
    dyr = _operand(dy, "dy", fmt)
    if dyr.shape != shape:
        raise ValueError(f"dy must have the output's shape {shape}, got {dyr.shape}")
    dy2 = dyr.reshape(cache.x.shape[0], shape[-1])  # (N, out)
    du = _round32(cache.scaling * dy2, fmt)  # (N, out)
    dB = _round32(du.T @ cache.t, fmt)  # (out, r)
    dt = _round32(du @ cache.B, fmt)  # (N, r)
    dA = _round32(dt.T @ cache.x, fmt)  # (r, in)
    dx = _round32(_round32(dy2 @ cache.weight, fmt) + _round32(dt @ cache.A, fmt), fmt)  # (N, in)
    return PrecisionLoRAGrads(dx.reshape(cache.x_shape), dA, dB)


def lora_merge(weight: Any, A: Any, B: Any, scaling: float, fmt: str = "bfloat16") -> np.ndarray:
    """PEFT's merge in ``fmt``: ``W' = R(fl32(Ŵ + Δ))`` with ``Δ = R(fl32(s32 * R(fl32(B̂ @ Â))))``.

    Parameters
    ----------
    weight : array_like of shape (out_features, in_features)
    A : array_like of shape (r, in_features)
    B : array_like of shape (out_features, r)
    scaling : float
    fmt : {"bfloat16", "float16", "float32"}

    Returns
    -------
    ndarray of shape (out_features, in_features), float32 holding values of ``fmt``
    """
    fmt, s32 = _check(fmt, scaling)
    wr, ar, b_r = _operand(weight, "weight", fmt), _operand(A, "A", fmt), _operand(B, "B", fmt)
    if wr.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {wr.shape}")
    _check_factors(wr, ar, b_r)
    return _round32(wr + _delta(ar, b_r, s32, fmt), fmt)


def lora_unmerge(merged: Any, A: Any, B: Any, scaling: float, fmt: str = "bfloat16") -> np.ndarray:
    """PEFT's unmerge in ``fmt``: ``W'' = R(fl32(Ŵ' - Δ))``, the same ``Δ`` :func:`lora_merge` added.

    Parameters are :func:`lora_merge`'s, with ``merged`` the merged weight.
    """
    fmt, s32 = _check(fmt, scaling)
    wr, ar, b_r = _operand(merged, "merged", fmt), _operand(A, "A", fmt), _operand(B, "B", fmt)
    if wr.ndim != 2:
        raise ValueError(f"merged must be 2-D (out_features, in_features), got shape {wr.shape}")
    _check_factors(wr, ar, b_r)
    return _round32(wr - _delta(ar, b_r, s32, fmt), fmt)


def _delta(A: np.ndarray, B: np.ndarray, s32: np.float32, fmt: str) -> np.ndarray:
    """``Δ = R(fl32(s32 * R(fl32(B @ A))))`` (out, in), PEFT's ``get_delta_weight``."""
    return _round32(s32 * _round32(B @ A, fmt), fmt)  # (out, in)
