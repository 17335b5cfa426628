"""``LowRank``: a matrix stored as the product of two thin factors."""

from __future__ import annotations

from typing import Any

import numpy as np

from lowrank.utils.validation import as_float_array, check_int, check_matrix

__all__ = ["LowRank", "lora_param_count"]


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

        Parameters
        ----------
        M : array_like of shape (m, n)
        relative : bool, default False
        """
        M = check_matrix(M, "M")
        if M.shape != self.shape:
            raise ValueError(f"M must have the factorization's shape {self.shape}, got {M.shape}")
        err = float(np.linalg.norm(M - self.to_dense()))
        if relative:
            norm = float(np.linalg.norm(M))
            return err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))
        return err

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
