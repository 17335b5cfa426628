"""``LowRank``: a matrix stored as the product of two thin factors, and exact scaling by powers of two.

Sums of squares overflow or underflow long before the numbers they sum do
(``(1e160)**2`` is inf in float64, ``(1e-170)**2`` is 0). The factorizations
therefore work on ``M`` divided by a power of two near its largest magnitude
(:func:`magnitude_exponent`, :func:`times_power_of_two`) and scale the results
back: in binary floating point that is exact, so the scaled problem is the
same problem.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lowrank.utils.validation import as_float_array, check_int, check_matrix

__all__ = ["LowRank", "lora_param_count", "magnitude_exponent", "times_power_of_two"]


def magnitude_exponent(x: np.ndarray) -> int:
    """The exponent ``e`` of the largest magnitude of ``x``: ``max|x| = f * 2**e`` with ``0.5 <= f < 1``.

    Parameters
    ----------
    x : ndarray of any shape
        Finite float values (an empty or all-zero ``x`` gives 0).

    Returns
    -------
    int
        ``times_power_of_two(x, -e)`` has its largest magnitude in
        ``[0.5, 1)``. Costs two passes over ``x`` and no temporary.

    Examples
    --------
    >>> magnitude_exponent(np.array([3.0, -5.0])), magnitude_exponent(np.array([1e-300]))
    (3, -996)
    """
    if x.size == 0:
        return 0
    largest = max(float(np.max(x)), -float(np.min(x)))  # no |x| temporary
    return math.frexp(largest)[1]  # frexp(0.0) is (0.0, 0)


def times_power_of_two(x: np.ndarray, e: int) -> np.ndarray:
    """``x * 2**e`` in ``x``'s dtype: exact unless an entry leaves the dtype's range.

    Parameters
    ----------
    x : ndarray of float32 or float64
    e : int
        Any exponent, also one whose ``2**e`` is not itself representable
        (scaling a subnormal ``x`` up, say).

    Returns
    -------
    ndarray of x's shape and dtype
        ``x`` itself when ``e == 0``, else a new array. Entries beyond the
        range become inf and entries below it round to subnormals or 0,
        silently: the caller decides what an overflow means.
    """
    if e == 0:
        return x
    info = np.finfo(x.dtype)
    if info.minexp <= e < info.maxexp:  # 2**e is a normal number: one multiply, 3.5x faster than ldexp
        return x * x.dtype.type(2.0**e)
    with np.errstate(over="ignore"):
        return np.ldexp(x, e)


def _scaled_norm(x: np.ndarray) -> tuple[float, int]:
    """``(v, e)`` with ``‖x‖_F = v * 2**e``, the squares summed on ``x / 2**e`` (no over- or underflow).

    ``v`` is inf when ``x`` holds inf (an overflowed difference).
    """
    if not np.all(np.isfinite(x)):
        return math.inf, 0
    e = magnitude_exponent(x)
    return float(np.linalg.norm(times_power_of_two(x, -e))), e


def _ldexp_or_raise(value: float, e: int, what: str) -> float:
    """``value * 2**e`` as a float, or FloatingPointError naming ``what`` if it exceeds the float range."""
    try:
        result = math.ldexp(value, e)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise FloatingPointError(
            f"{what} is too large for a float: about {value:.6g} * 2**{e}; scale M and the factors down"
        )
    return result


class LowRank:
    """A matrix ``M = left @ right`` kept as its two factors.

    Stores ``r*(m+n)`` numbers instead of ``m*n``. Products with vectors and
    matrices go through the factors and never form the dense ``(m, n)`` array.

    Parameters
    ----------
    left : array_like of shape (m, r)
    right : array_like of shape (r, n)
        Both follow the dtype rule (float32/float64 kept, integers become
        float64); if their dtypes differ, both are promoted to float64.

    Examples
    --------
    The 9×9 example: a rank-1 matrix needs 18 numbers instead of 81.

    >>> import numpy as np
    >>> lr = LowRank(np.ones((9, 1)), np.arange(9.0)[None, :])
    >>> lr.dense_params, lr.n_params, lr.compression_ratio
    (81, 18, 4.5)
    >>> np.allclose(lr @ np.ones(9), lr.to_dense() @ np.ones(9))
    True
    """

    # NumPy arrays defer to our __rmatmul__ for ``X @ lr`` instead of trying
    # to treat a LowRank as an array themselves.
    __array_ufunc__ = None

    def __init__(self, left: Any, right: Any) -> None:
        left = as_float_array(left, "left")
        right = as_float_array(right, "right")
        for name, arr in (("left", left), ("right", right)):
            if arr.ndim != 2 or arr.size == 0:
                raise ValueError(f"{name} must be a non-empty 2-D array, got shape {arr.shape}")
        if left.shape[1] != right.shape[0]:
            raise ValueError(
                "left (m, r) and right (r, n) must share r, got "
                f"left {left.shape} and right {right.shape}"
            )
        dtype = np.result_type(left, right)
        self.left = left.astype(dtype, copy=False)  # (m, r)
        self.right = right.astype(dtype, copy=False)  # (r, n)

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``, the shape of the dense matrix."""
        return self.left.shape[0], self.right.shape[1]

    @property
    def dtype(self) -> np.dtype:
        """The float dtype of both factors."""
        return self.left.dtype

    @property
    def rank(self) -> int:
        """``r``, the inner dimension of the factors (an upper bound on the true rank)."""
        return self.left.shape[1]

    @property
    def n_params(self) -> int:
        """Numbers stored: ``r*(m+n)``."""
        m, n = self.shape
        return self.rank * (m + n)

    @property
    def dense_params(self) -> int:
        """Numbers the dense matrix would store: ``m*n``."""
        m, n = self.shape
        return m * n

    @property
    def compression_ratio(self) -> float:
        """``dense_params / n_params``: how many times smaller the factors are."""
        return self.dense_params / self.n_params

    def to_dense(self) -> np.ndarray:
        """The dense matrix ``left @ right``, of shape (m, n)."""
        return self.left @ self.right

    def __matmul__(self, X: Any) -> np.ndarray:
        """``M @ X`` for X of shape (n,) or (n, k), as ``left @ (right @ X)``."""
        X = as_float_array(X, "the right operand of LowRank @")
        if X.ndim not in (1, 2) or X.shape[0] != self.shape[1]:
            raise ValueError(f"cannot multiply LowRank of shape {self.shape} by an array of shape {X.shape}")
        return self.left @ (self.right @ X)  # (m,) or (m, k)

    def __rmatmul__(self, X: Any) -> np.ndarray:
        """``X @ M`` for X of shape (m,) or (k, m), as ``(X @ left) @ right``."""
        X = as_float_array(X, "the left operand of @ LowRank")
        if X.ndim not in (1, 2) or X.shape[-1] != self.shape[0]:
            raise ValueError(f"cannot multiply an array of shape {X.shape} by LowRank of shape {self.shape}")
        return (X @ self.left) @ self.right  # (n,) or (k, n)

    def error(self, M: Any, *, relative: bool = False) -> float:
        """Frobenius norm of ``M - left @ right``, divided by ``‖M‖_F`` if ``relative``.

        Right at every finite scale: ``M``, ``left`` and ``right`` are each
        divided by a power of two near their largest magnitude before any
        square is formed (as LAPACK's ``nrm2`` scales), so the answer for
        ``c * M`` is ``c`` times the answer for ``M`` (the relative one is
        the same) whenever it is representable.

        Parameters
        ----------
        M : array_like of shape (m, n)
        relative : bool, default False
            For a zero ``M``: 0 if the factors are zero too, else inf.

        Raises
        ------
        FloatingPointError
            The absolute error exceeds the largest float (``M`` and the
            product both near it); ``relative=True`` still works.
        """
        M = check_matrix(M, "M")
        if M.shape != self.shape:
            raise ValueError(f"M must have the factorization's shape {self.shape}, got {M.shape}")
        e_m, e_l, e_r = magnitude_exponent(M), magnitude_exponent(self.left), magnitude_exponent(self.right)
        dtype = np.result_type(M.dtype, self.dtype)
        product = times_power_of_two(self.left, -e_l) @ times_power_of_two(self.right, -e_r)  # (m, n), |.| <= r
        with np.errstate(over="ignore", invalid="ignore"):  # a difference beyond the range is refused below
            diff = times_power_of_two(M, -e_m) - times_power_of_two(product.astype(dtype), e_l + e_r - e_m)  # (m, n)
        err, e_d = _scaled_norm(diff)  # ‖M − L R‖_F = err * 2**(e_d + e_m)
        if relative:
            norm, _ = _scaled_norm(times_power_of_two(M, -e_m))  # ‖M‖_F / 2**e_m, no rescaling needed
            if norm == 0:
                return 0.0 if err == 0 else math.inf
            return _ldexp_or_raise(err / norm, e_d, "the relative error")
        return _ldexp_or_raise(err, e_d + e_m, "the error ‖M − left @ right‖_F")

    def __repr__(self) -> str:
        m, n = self.shape
        return f"LowRank(shape=({m}, {n}), rank={self.rank}, dtype={self.dtype})"


def lora_param_count(d_model: int, n_layers: int, n_matrices: int, r: int) -> int:
    """Trainable parameters of LoRA on square ``(d_model, d_model)`` matrices.

    Each adapted matrix gets ``A (r, d_model)`` and ``B (d_model, r)``:
    ``n_layers * n_matrices * r * (d_model + d_model)``. GPT-3 175B with W_q
    and W_v adapted at ``r = 1``:

    >>> lora_param_count(d_model=12288, n_layers=96, n_matrices=2, r=1)
    4718592
    """
    d_model = check_int(d_model, "d_model", 1)
    n_layers = check_int(n_layers, "n_layers", 1)
    n_matrices = check_int(n_matrices, "n_matrices", 1)
    r = check_int(r, "r", 1, d_model, rule="[1, d_model]")
    return n_layers * n_matrices * r * (d_model + d_model)
