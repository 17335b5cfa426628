"""The kernels' argument checks: the shell of every public kernel.

Each helper enforces one rule, returns the checked array and raises with a
message that names the argument, the rule and the value received: a
TypeError for an argument of the wrong kind or dtype, a ValueError for the
right kind with a wrong shape or value. The public kernels call them once;
the ``*_core`` functions never do (see :mod:`lowrank.nn.functional`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowrank.utils.validation import as_float_array

__all__ = [
    "as_grad",
    "as_input",
    "as_mask",
    "as_param",
    "check_bias",
    "check_cache",
    "check_fits",
    "check_lora_factors",
    "check_nonempty",
    "check_weight",
]


def as_input(x: Any, name: str = "x") -> np.ndarray:
    """``x`` as a float array of at least one dimension (the feature axis), under the dtype rule."""
    arr = as_float_array(x, name)
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (..., features), got a scalar")
    return arr


def as_param(value: Any, name: str, dtype: np.dtype, like: str = "x") -> np.ndarray:
    """A parameter array, which must already have the ``dtype`` of the argument ``like``: never cast silently."""
    arr = as_float_array(value, name)
    if arr.dtype != dtype:
        raise TypeError(
            f"{name} must have the same dtype as {like}, got {name} {arr.dtype} and {like} {dtype}; "
            f"cast one of them with .astype"
        )
    return arr


def as_mask(mask: Any, x: np.ndarray, name: str) -> np.ndarray:
    """A dropout mask that broadcasts to ``x.shape``, cast to ``x``'s dtype."""
    arr = as_float_array(mask, name)
    try:
        fits = np.broadcast_shapes(arr.shape, x.shape) == x.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{name} must broadcast to x's shape {x.shape}, got shape {arr.shape}")
    return arr.astype(x.dtype, copy=False)


def as_grad(dy: Any, shape: tuple[int, ...], dtype: np.dtype, what: str, name: str = "dy") -> np.ndarray:
    """An upstream gradient of exactly ``shape`` (the shape of ``what``), cast to the forward's ``dtype``."""
    arr = as_float_array(dy, name)
    if arr.shape != shape:
        raise ValueError(f"{name} must have the shape of {what}, {shape}, got shape {arr.shape}")
    return arr.astype(dtype, copy=False)


def check_cache(cache: Any, cls: type, forward: str) -> None:
    """Refuse (TypeError) a cache that is not the ``cls`` returned by the forward kernel ``forward``."""
    if not isinstance(cache, cls):
        raise TypeError(f"cache must be the {cls.__name__} returned by {forward}(), got {type(cache).__name__}")


def check_weight(weight: Any, dtype: np.dtype) -> np.ndarray:
    """A non-empty 2-D weight of shape (out_features, in_features) in ``x``'s ``dtype``."""
    weight = as_param(weight, "weight", dtype)
    if weight.ndim != 2 or weight.size == 0:
        raise ValueError(
            f"weight must be a non-empty 2-D array of shape (out_features, in_features), got shape {weight.shape}"
        )
    return weight


def check_fits(x: np.ndarray, weight: np.ndarray) -> None:
    """Refuse (ValueError) an ``x`` whose last dimension is not ``weight``'s in_features."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x of shape {x.shape} does not fit weight of shape {weight.shape}: "
            f"x's last dimension must be in_features = {weight.shape[1]}"
        )


def check_bias(bias: Any, weight: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """None, or a bias of shape (out_features,) in ``x``'s ``dtype``."""
    if bias is None:
        return None
    bias = as_param(bias, "bias", dtype)
    if bias.shape != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape (out_features,) = ({weight.shape[0]},) to fit weight of shape "
            f"{weight.shape}, got shape {bias.shape}"
        )
    return bias


def check_lora_factors(A: Any, B: Any, weight: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """LoRA's factors ``A`` (r, in_features) with r >= 1 and ``B`` (out_features, r), in ``dtype``."""
    A = as_param(A, "A", dtype)
    B = as_param(B, "B", dtype)
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
    return A, B


def check_nonempty(arr: np.ndarray, name: str) -> None:
    """Refuse (ValueError) an empty array where a mean is taken."""
    if arr.size == 0:
        raise ValueError(f"{name} must hold at least one element for the mean, got shape {arr.shape}")
