"""Truncated and randomized SVD, the randomized range finder, and the spectrum helpers built on Eckart–Young.

The randomized SVD comes in its two stages (Halko, Martinsson and Tropp, 2011),
each public: :func:`randomized_range_finder` (validated; its core
:func:`subspace_iteration` for callers that already validated, such as ALS's
spectral start on scipy.sparse input) finds ``Q`` with ``M ≈ Q Qᵀ M``, and
:func:`svd_in_range` takes the SVD of ``Q Qᵀ M``.

Eckart–Young–Mirsky: among all matrices of rank at most ``k``, the truncated
SVD ``U[:, :k] @ diag(s[:k]) @ Vt[:k]`` is closest to ``M`` in both the
Frobenius and the spectral norm, with errors

    ‖M − M_k‖_F = sqrt(s[k]² + s[k+1]² + …)        ‖M − M_k‖_2 = s[k]

so the singular values alone say how well every rank can do.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lowrank.factor.lowrank_matrix import LowRank, magnitude_exponent, times_power_of_two
from lowrank.utils.threads import blas_threads
from lowrank.utils.validation import (
    RandomState,
    as_float_array,
    check_int,
    check_matrix,
    check_random_state,
    check_rank,
    check_real,
    first_non_finite,
    float_dtype_of,
    is_scipy_sparse,
    non_finite_message,
)

__all__ = [
    "SVDResult",
    "check_operand",
    "eckart_young_errors",
    "energy_kept",
    "is_linear_operator",
    "orthonormalize",
    "randomized_range_finder",
    "randomized_svd",
    "rank_for_energy",
    "subspace_iteration",
    "svd_in_range",
    "truncated_svd",
]

# orthonormalize multiplies in place this many rows at a time: 4096 × 110 float64 is 3.6 MB,
# large enough for BLAS to run at full speed.
_ROW_BLOCK = 4096

# Energies are sums of squares, accurate to a few ulps of the total: a rank
# whose kept energy falls short of the target by less than this still counts.
_ENERGY_RTOL = 1e-12


@dataclass(frozen=True, repr=False)
class SVDResult:
    """A rank-``r`` SVD ``M ≈ U @ diag(s) @ Vt``, from :func:`truncated_svd` or :func:`randomized_svd`.

    Attributes
    ----------
    U : ndarray of shape (m, r)
        Orthonormal columns; the largest-magnitude entry of each is positive.
    s : ndarray of shape (r,)
        Singular values, descending.
    Vt : ndarray of shape (r, n)
        Orthonormal rows.
    """

    U: np.ndarray
    s: np.ndarray
    Vt: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``, the shape of the approximated matrix."""
        return self.U.shape[0], self.Vt.shape[1]

    @property
    def rank(self) -> int:
        """``r``, the number of singular triplets kept."""
        return self.s.shape[0]

    def to_dense(self) -> np.ndarray:
        """``U @ diag(s) @ Vt``, of shape (m, n)."""
        return (self.U * self.s) @ self.Vt

    def to_lowrank(self) -> LowRank:
        """The factorization as ``LowRank(U * s, Vt)``."""
        return LowRank(self.U * self.s, self.Vt)

    def __repr__(self) -> str:
        m, n = self.shape
        return f"SVDResult(shape=({m}, {n}), rank={self.rank}, dtype={self.s.dtype})"


def _sign_rule(U: np.ndarray) -> np.ndarray:
    """The signs, shape (r,), that make each column of ``U`` have a positive largest-magnitude entry.

    On ties the first largest entry decides; an all-zero column keeps its
    sign. Found from each column's largest and smallest entry, so no
    ``|U|`` temporary the size of ``U`` is formed.
    """
    cols = np.arange(U.shape[1])
    top, bottom = np.argmax(U, axis=0), np.argmin(U, axis=0)  # (r,), (r,)
    high, low = U[top, cols], -U[bottom, cols]  # the largest positive and negative magnitudes
    rows = np.where(high > low, top, np.where(low > high, bottom, np.minimum(top, bottom)))  # (r,)
    signs = np.sign(U[rows, cols])  # (r,)
    signs[signs == 0] = 1
    return signs


def _flip_signs(U: np.ndarray, Vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make each column of ``U`` have a positive largest-magnitude entry, flipping ``Vt`` to match.

    Returns new arrays; the inputs are not modified (:func:`_sign_rule`).
    """
    signs = _sign_rule(U)
    return U * signs, Vt * signs[:, None]


def _check_spectrum(s: Any) -> np.ndarray:
    s = as_float_array(s, "s")
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"s must be a non-empty 1-D array of singular values, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"s must hold finite non-negative singular values, got min {s.min()}")
    if np.any(np.diff(s) > 0):
        raise ValueError("s must be sorted in descending order, as numpy.linalg.svd returns it")
    return s


def eckart_young_errors(s: Any, ord: Literal["fro", 2] = "fro") -> np.ndarray:
    """The error of the best rank-``k`` approximation, for every ``k``.

    The squares are summed on ``s / 2**e`` with ``2**e`` near ``s[0]`` and
    the sums scaled back (exact), so nothing overflows or underflows before
    the result does: the errors of ``c * s`` are ``c`` times those of ``s``.

    Parameters
    ----------
    s : array_like of shape (p,)
        All singular values of the matrix, descending.
    ord : {"fro", 2}, default "fro"
        Frobenius or spectral norm.

    Returns
    -------
    ndarray of shape (p + 1,)
        Entry ``k`` is ``sqrt(sum(s[k:]**2))`` ("fro") or ``s[k]`` (2), and
        entry ``p`` is 0, in float64.

    Raises
    ------
    ValueError
        ``s`` is not a finite, non-negative, descending 1-D array, or ``ord``
        is neither "fro" nor 2.
    FloatingPointError
        ``sqrt(sum(s**2))`` exceeds the float64 range (``s`` near 1e308).

    Examples
    --------
    >>> eckart_young_errors([4.0, 3.0])
    array([5., 3., 0.])
    """
    s = _check_spectrum(s).astype(np.float64)
    if ord == "fro":
        e = magnitude_exponent(s[:1])
        t = times_power_of_two(s, -e)  # (p,), t[0] in [0.5, 1)
        tail = np.sqrt(np.cumsum(np.square(t)[::-1])[::-1])  # tail[k] = sqrt(sum(t[k:]**2)), <= sqrt(p)
        with np.errstate(over="ignore"):  # an overflow is refused just below
            errors = times_power_of_two(np.append(tail, 0.0), e)  # (p + 1,)
        if not np.isfinite(errors[0]):
            raise FloatingPointError(
                f"the Frobenius error of rank 0, ‖s‖_2 = {tail[0]:.6g} * 2**{e}, is too large for float64; "
                "scale s down"
            )
        return errors
    if ord == 2:
        return np.append(s, 0.0)
    raise ValueError(f"ord must be 'fro' or 2, got {ord!r}")


def energy_kept(s: Any) -> np.ndarray:
    """The fraction of ``‖M‖_F²`` that the best rank-``k`` approximation keeps, for every ``k``.

    Computed from ``s / 2**e`` with ``2**e`` near ``s[0]`` (a ratio does not
    depend on the scale), so singular values near the float limits do not
    overflow or underflow when squared.

    Parameters
    ----------
    s : array_like of shape (p,)
        All singular values of the matrix, descending.

    Returns
    -------
    ndarray of shape (p + 1,)
        Entry ``k`` is ``sum(s[:k]**2) / sum(s**2)``; entry 0 is 0. For the
        zero matrix every rank keeps everything (entries 1… are 1).
    """
    s = _check_spectrum(s).astype(np.float64)
    t = times_power_of_two(s, -magnitude_exponent(s[:1]))  # (p,), t[0] in [0.5, 1): t**2 cannot overflow
    kept = np.concatenate([[0.0], np.cumsum(np.square(t))])  # (p + 1,)
    total = float(kept[-1])
    if total == 0.0:
        kept[1:] = 1.0
        return kept
    return np.minimum(kept / total, 1.0)


def rank_for_energy(s: Any, energy: float) -> int:
    """The smallest rank ``k >= 1`` whose best approximation keeps ``energy`` of ``‖M‖_F²``.

    Parameters
    ----------
    s : array_like of shape (p,)
        All singular values of the matrix, descending.
    energy : float in (0, 1]
        A shortfall below ``1e-12`` (relative) is forgiven, so that
        ``energy=1.0`` is met by the full rank despite rounding.
    """
    energy = check_real(energy, "energy", 0.0, 1.0, low_open=True)
    kept = energy_kept(s)
    return int(np.argmax(kept[1:] >= energy - _ENERGY_RTOL)) + 1


def _largest_magnitude(A: Any) -> float:
    values = A if isinstance(A, np.ndarray) else A.data
    return float(np.max(np.abs(values))) if values.size else 0.0


def _overflowed(A: Any, what: str = "an SVD", why: str = "its singular values overflow") -> FloatingPointError:
    """The FloatingPointError for checked input ``A`` (array, scipy.sparse or operator) whose computation overflowed."""
    hint = " or pass float64" if A.dtype == np.float32 else ""
    if isinstance(A, _Operator):
        return FloatingPointError(
            f"{A.name}'s products are not finite in {A.dtype} during {what}: its matvec or rmatvec returned "
            f"NaN or inf, or {why}; scale the operator down{hint}"
        )
    return FloatingPointError(
        f"M's entries (largest magnitude {_largest_magnitude(A):.3g}) are too large for {what} in {A.dtype}: "
        f"{why}; scale M down{hint}"
    )


# ---------------------------------------------------------------- sparse and operator input

_OPERATOR_ATTRIBUTES = ("shape", "dtype", "matvec", "rmatvec")


class _Operator:
    """A linear operator seen only through its products with dense blocks, ``A @ X`` and ``A.T @ X``.

    Wraps anything with ``shape``, ``dtype``, ``matvec`` and ``rmatvec``
    (scipy's ``LinearOperator``, or a class of the user's), calling
    ``matmat``/``rmatmat`` instead when present: one call per block rather
    than one per column. :func:`subspace_iteration` and :func:`svd_in_range`
    multiply it as they multiply an array. Every product is checked for
    its shape and kind and cast to the working dtype.
    """

    def __init__(self, op: Any, shape: tuple[int, int], dtype: np.dtype, name: str, transposed: bool = False) -> None:
        self.op = op
        self.shape = shape  # as seen: (n, m) when transposed
        self.dtype = dtype
        self.name = name
        self.transposed = transposed

    @property
    def T(self) -> _Operator:
        """The transpose, whose products are the operator's ``rmatmat``/``rmatvec``."""
        return _Operator(self.op, (self.shape[1], self.shape[0]), self.dtype, self.name, not self.transposed)

    def __matmul__(self, X: np.ndarray) -> np.ndarray:
        """``A @ X`` for a dense block ``X`` of shape (shape[1], c); returns shape (shape[0], c)."""
        block, single = ("rmatmat", "rmatvec") if self.transposed else ("matmat", "matvec")
        expected = (self.shape[0], X.shape[1])
        if callable(getattr(self.op, block, None)):
            out = self._checked(getattr(self.op, block)(X), block, X.shape, expected)
        else:
            out = np.empty(expected, dtype=self.dtype)
            for j in range(X.shape[1]):
                column = self._checked(getattr(self.op, single)(X[:, j]), single, (X.shape[0],), (expected[0],))
                out[:, j] = column
        return out

    def _checked(self, out: Any, method: str, given: tuple[int, ...], expected: tuple[int, ...]) -> np.ndarray:
        out = np.asarray(out)
        vector = sum(d != 1 for d in expected) <= 1  # (m,), or a block of one column or one row
        if out.shape != expected and vector and out.size == math.prod(expected) and out.squeeze().ndim <= 1:
            out = out.reshape(expected)  # a vector returned as (m, 1), or a one-column block as (m,)
        if out.shape != expected:
            raise ValueError(
                f"{self.name}.{method} must return shape {expected} for an input of shape {given} "
                f"({self.name}.shape is {self._own_shape()}), got {out.shape}"
            )
        if out.dtype.kind not in "biuf":
            raise TypeError(f"{self.name}.{method} must return real numbers, got dtype {out.dtype}")
        return np.array(out, dtype=self.dtype, order="C")  # a copy: the caller may overwrite it

    def _own_shape(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape


def is_linear_operator(M: Any) -> bool:
    """Whether ``M`` presents itself as a linear operator (has ``matvec`` or ``rmatvec``) rather than an array.

    scipy.sparse matrices are told apart first (:func:`~lowrank.utils.validation.is_scipy_sparse`).
    """
    return not isinstance(M, np.ndarray) and (hasattr(M, "matvec") or hasattr(M, "rmatvec"))


def _check_operator(M: Any, name: str) -> _Operator:
    missing = [a for a in _OPERATOR_ATTRIBUTES if getattr(M, a, None) is None]
    if missing:
        raise TypeError(
            f"{name} must be an array, a scipy.sparse matrix or a linear operator with shape, dtype, matvec and "
            f"rmatvec (such as scipy.sparse.linalg.LinearOperator), got {type(M).__name__} without "
            + ", ".join(missing)
        )
    try:
        shape = tuple(M.shape)
        ok = len(shape) == 2 and all(isinstance(d, numbers.Integral) and int(d) >= 0 for d in shape)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}.shape must be a pair of non-negative integers, got {M.shape!r}")
    if 0 in shape:
        raise ValueError(f"{name} must be non-empty, got shape {shape}")
    try:
        dtype = np.dtype(M.dtype)
    except TypeError:
        raise TypeError(f"{name}.dtype must be a NumPy dtype, got {M.dtype!r}") from None
    dtype = float_dtype_of(np.empty(0, dtype.newbyteorder("=")), name)
    return _Operator(M, (int(shape[0]), int(shape[1])), dtype, name)


def _check_sparse(M: Any, name: str) -> Any:
    shape = tuple(M.shape)
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got a sparse array of shape {shape} ({len(shape)}-D)")
    if 0 in shape:
        raise ValueError(f"{name} must be non-empty, got shape {shape}")
    if M.format not in ("csr", "csc"):  # coo, dok, lil, bsr, dia: one O(nnz) copy into the format of fast products
        M = M.tocsr()
    dtype = as_float_array(M.data[:0], name).dtype  # the dtype rule; byte order normalised to native
    if M.dtype != dtype:
        M = M.astype(dtype)
    bad = first_non_finite(M.data)
    if bad is not None:  # name the entry by its (row, column)
        k = bad[0]
        outer = int(np.searchsorted(M.indptr, k, side="right")) - 1  # the row of CSR, the column of CSC
        index = (outer, int(M.indices[k])) if M.format == "csr" else (int(M.indices[k]), outer)
        count = int(np.count_nonzero(~np.isfinite(M.data)))
        raise ValueError(non_finite_message(name, M.data[k], index, count))
    return M


def check_operand(M: Any, name: str = "M") -> Any:
    """``M`` checked for the SVDs: a float ndarray, a scipy.sparse CSR/CSC matrix, or a checked linear operator.

    The one boundary check of :func:`randomized_svd`,
    :func:`randomized_range_finder` and :func:`truncated_svd`; what it
    returns has ``shape``, ``dtype``, ``.T`` and ``@`` with a dense block,
    which is all :func:`subspace_iteration` and :func:`svd_in_range` use.

    Parameters
    ----------
    M : array_like, scipy.sparse matrix or array (any format), or linear operator, of shape (m, n)
        Dense input goes through :func:`~lowrank.utils.validation.check_matrix`.
        A sparse matrix in a format other than CSR or CSC is converted to
        CSR (a copy of its stored entries, never a dense array); integer
        data becomes float64 (the dtype rule); its stored entries must be
        finite. A linear operator is anything with ``shape``, ``dtype``,
        ``matvec`` and ``rmatvec`` (``rmatvec(y) = Mᵀ y``); ``matmat`` and
        ``rmatmat`` are used when present. Its dtype follows the dtype
        rule; its products are checked for shape and kind as they happen.
    name : str
        The argument's name, for the messages.

    Returns
    -------
    ndarray, scipy.sparse matrix, or an operator wrapper of shape (m, n)

    Raises
    ------
    TypeError
        Not real, or an operator missing one of its four attributes (the
        message names them).
    ValueError
        Not 2-D, empty, a non-finite entry (named by its index), or an
        operator whose ``shape`` is not a pair of integers.
    """
    if is_scipy_sparse(M):
        return _check_sparse(M, name)
    if is_linear_operator(M):
        return _check_operator(M, name)
    return check_matrix(M, name)


def _blas_threads_for(A: Any) -> contextlib.AbstractContextManager[None]:
    """One BLAS thread for a scipy.sparse ``A``, else the BLAS's own count.

    scipy's sparse products run on one thread; the BLAS threads that the
    orthonormalizations between them woke spin-wait on the other core
    meanwhile. Measured on this project's 2-core machine (shared, load 2-3),
    the randomized SVD of a 100,000 × 50,000 matrix with 2.5 M stored entries
    at rank 100 took 10.7 s with one BLAS thread against 15.0 s with two
    (scikit-learn: 13.0 s). Dense input keeps every thread: its products
    are BLAS products.
    """
    return blas_threads(1) if is_scipy_sparse(A) else contextlib.nullcontext()


def _scaled(A: Any) -> tuple[Any, int]:
    """``(A / 2**e, e)`` when ``A``'s largest magnitude ``2**e`` lies outside ``2**±(maxexp/4)``, else ``(A, 0)``.

    Inside that window every product with an orthonormal block, and every
    Gram matrix of such products, stays inside the dtype's normal range
    (the largest is about ``4**(maxexp/4) · nnz · k``), so the iteration
    runs on ``A`` itself; multiplying by a power of two is exact, so
    the window changes no result beyond rounding, only what is copied.
    Outside it the iteration runs on a copy divided by ``2**e`` (largest
    magnitude in [0.5, 1)) and the singular values are scaled back. An
    operator's entries are unknown: it is used as it is, and an overflow
    is reported when its products are not finite.
    """
    if isinstance(A, _Operator):
        return A, 0
    values = A if isinstance(A, np.ndarray) else A.data
    e = magnitude_exponent(values)
    if abs(e) <= np.finfo(values.dtype).maxexp // 4:
        return A, 0
    if isinstance(A, np.ndarray):
        return times_power_of_two(A, -e), e
    scaled = A.copy()
    scaled.data = times_power_of_two(A.data, -e)
    return scaled, e


def _check_rank_or_energy(rank: Any, energy: Any) -> None:
    if (rank is None) == (energy is None):
        raise ValueError(
            "exactly one of rank and energy must be given, got "
            f"rank={rank!r} and energy={energy!r}"
        )


def truncated_svd(M: Any, rank: int | None = None, *, energy: float | None = None) -> SVDResult:
    """The best rank-``rank`` approximation of ``M``, exactly, through LAPACK (or ARPACK for sparse input).

    Computes the thin SVD with ``numpy.linalg.svd`` and keeps the leading
    ``rank`` triplets, which by Eckart–Young is optimal in the Frobenius and
    spectral norms.

    A scipy.sparse matrix or a linear operator is never densified: it goes
    through ``scipy.sparse.linalg.svds`` (ARPACK's implicitly restarted
    Lanczos on ``MᵀM`` or ``MMᵀ``, the smaller, to full working precision,
    ``tol=0``; then ``s`` from the SVD of ``M V``), with svds's contract:
    ``rank < min(m, n)`` and no ``energy`` (which needs every singular
    value). Its start vector is drawn from a fixed seed, so the result is
    the same on every call. For a large sparse matrix and a rank in the
    hundreds, :func:`randomized_svd` is usually much faster.

    Parameters
    ----------
    M : array_like, scipy.sparse matrix or linear operator, of shape (m, n)
        Finite real matrix. float32 stays float32, float64 stays float64,
        integer and bool become float64. Sparse and operator input as in
        :func:`check_operand` (needs scipy).
    rank : int in [1, min(m, n)], optional
        How many singular triplets to keep; in ``[1, min(m, n) - 1]`` for
        sparse or operator input.
    energy : float in (0, 1], optional
        Instead of ``rank``: keep the smallest rank whose approximation holds
        this fraction of ``‖M‖_F²`` (see :func:`rank_for_energy`). Exactly
        one of ``rank`` and ``energy`` must be given; dense input only.

    Returns
    -------
    SVDResult
        ``U (m, r)``, ``s (r,)`` descending, ``Vt (r, n)``, with the largest-
        magnitude entry of each column of ``U`` positive.

    Raises
    ------
    TypeError
        ``M`` is not a real matrix (complex, float16, strings, ragged), or
        ``rank`` is not an integer.
    ValueError
        ``M`` is not 2-D, is empty or holds NaN or inf; ``rank`` or
        ``energy`` is out of range, or both or neither are given; ``energy``
        with sparse or operator input.
    ImportError
        A linear operator that is not scipy's, and scipy is not installed.
    FloatingPointError
        ``M`` is finite but its singular values overflow ``M``'s dtype
        (float32 entries near 1e38); the message names the largest entry.

    Examples
    --------
    >>> import numpy as np
    >>> M = np.outer(np.arange(1.0, 10.0), np.ones(9))   # the 9×9 rank-1 example
    >>> svd = truncated_svd(M, 1)
    >>> svd.U.shape, svd.s.shape, svd.Vt.shape
    ((9, 1), (1,), (1, 9))
    >>> bool(np.allclose(svd.to_dense(), M)), svd.to_lowrank().n_params
    (True, 18)
    """
    _check_rank_or_energy(rank, energy)
    if is_scipy_sparse(M) or is_linear_operator(M):
        return _truncated_svd_arpack(check_operand(M, "M"), rank, energy)
    M = check_matrix(M, "M")
    if rank is not None:
        rank = check_rank(rank, M.shape)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
        U, s, Vt = np.linalg.svd(M, full_matrices=False)  # (m, p), (p,), (p, n); p = min(m, n)
    if not np.all(np.isfinite(s)):
        raise _overflowed(M)
    if energy is not None:
        rank = rank_for_energy(s, energy)
    U, Vt = _flip_signs(U[:, :rank], Vt[:rank])
    return SVDResult(U=U, s=s[:rank].copy(), Vt=Vt)


def _truncated_svd_arpack(A: Any, rank: Any, energy: Any) -> SVDResult:
    """:func:`truncated_svd` of a checked sparse matrix or operator, through ``scipy.sparse.linalg.svds``."""
    if energy is not None:
        raise ValueError(
            "energy needs every singular value, which sparse or operator input does not give without "
            f"densifying: pass rank instead, got energy={energy!r}"
        )
    rank = check_int(rank, "rank", 1, min(A.shape) - 1, rule="[1, min(m, n) - 1] (ARPACK, for sparse input)")
    try:
        from scipy.sparse.linalg import LinearOperator, svds
    except ImportError:  # only an operator of the user's own can get here without scipy
        raise ImportError("truncated_svd of a linear operator needs scipy: pip install scipy") from None
    scaled, e = _scaled(A)
    if isinstance(scaled, _Operator):
        op = scaled
        scaled = LinearOperator(
            op.shape,
            matvec=lambda x: (op @ x.reshape(-1, 1)).ravel(),
            rmatvec=lambda y: (op.T @ y.reshape(-1, 1)).ravel(),
            matmat=lambda X: op @ X,
            rmatmat=lambda Y: op.T @ Y,
            dtype=op.dtype,
        )
    # ARPACK's own start vector comes from a generator whose state persists between calls: fix it
    v0 = np.random.default_rng(0).standard_normal(min(A.shape)).astype(A.dtype)  # (min(m, n),)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
        try:
            U, s, Vt = svds(scaled, k=rank, v0=v0)  # (m, rank), (rank,), (rank, n), s in no promised order
        except np.linalg.LinAlgError:
            raise _overflowed(A) from None
        order = np.argsort(-s, kind="stable")
        s = times_power_of_two(s[order].astype(A.dtype), e)  # (rank,)
    U, Vt = U[:, order].astype(A.dtype), Vt[order].astype(A.dtype)
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(U)) and np.all(np.isfinite(Vt))):
        raise _overflowed(A)
    U, Vt = _flip_signs(U, Vt)
    return SVDResult(U=np.ascontiguousarray(U), s=s, Vt=np.ascontiguousarray(Vt))


def _resolve_n_iter(n_iter: Any, rank: int, shape: tuple[int, int]) -> int:
    if isinstance(n_iter, str):
        if n_iter != "auto":
            raise ValueError(f"n_iter must be a non-negative integer or 'auto', got {n_iter!r}")
        # Halko et al. (2011, §4.5): each power iteration raises the error
        # factor of the plain range finder to the power 1/(2q+1), so a slowly
        # decaying spectrum needs more iterations, and a small rank relative
        # to the matrix sees the slowest decay. scikit-learn measured 7 and 4
        # to be a good compromise between speed and accuracy (scikit-learn
        # issue #5299); we use the same rule so the two compare 1:1.
        return 7 if rank < 0.1 * min(shape) else 4
    return check_int(n_iter, "n_iter", 0)


def orthonormalize(Y: np.ndarray, *, refine: bool = True, overwrite: bool = False) -> np.ndarray:
    """An orthonormal basis of the columns of tall ``Y`` (m, k), ``m >= k``, of full column rank or not.

    CholeskyQR (``R`` the Cholesky factor of ``YᵀY``, ``Q = Y R⁻¹``), and
    with ``refine`` the second pass of CholeskyQR2 when the first left
    ``QᵀQ`` further than ``k · eps`` from the identity (Fukaya,
    Nakatsukasa, Yanagisawa and Yamamoto, "CholeskyQR2: a simple and
    communication-avoiding algorithm for computing a tall-skinny QR
    factorization", 2014). Their Theorem 3.3: when ``Y``'s condition number
    is below ``(11 (m k + k (k + 1)) u)^-1/2`` (``u`` the unit roundoff),
    CholeskyQR2's ``Q`` is orthonormal to ``O(u)``, like Householder QR's;
    one pass leaves an error of order ``cond(Y)² u``, harmless where only the
    span matters. Above that bound (a rank-deficient or ill-conditioned
    ``Y``, e.g. a matrix of exactly low rank; in float32 on all but small
    blocks) it is ``numpy.linalg.qr`` instead. Both give ``Q = Y R⁻¹`` with
    ``R`` upper triangular: the same columns up to sign and rounding.

    Why: NumPy's Householder QR takes 2.5–3.7 s on a 100,000 × 110 float64
    block on this project's 2-core machine, one CholeskyQR pass 0.2 s (a
    Gram product and a block product); the randomized SVD orthonormalizes
    after every product with ``M``, 15 times at the default 7 power
    iterations. ``Y R⁻¹`` is one block product with the inverse of the
    small, well-conditioned (checked) ``R``: 0.07 s, against 0.6 s for
    ``numpy.linalg.solve`` (NumPy has no triangular solve).

    Parameters
    ----------
    Y : ndarray of shape (m, k), float32 or float64, m >= k
    refine : bool, default True
        Make ``QᵀQ = I`` to rounding (``k · eps``). False stops after one
        pass: the same span, orthonormal to about ``cond(Y)² u``, as the
        power iterations need between two products.
    overwrite : bool, default False
        Compute ``Q`` in ``Y``'s own memory (C-ordered ``Y`` only), row
        block by row block: one ``(m, k)`` array less at the peak.

    Returns
    -------
    ndarray of shape (m, k)
        Orthonormal columns spanning the range of ``Y`` (completed to ``k``
        columns by Householder QR when ``Y`` is rank-deficient).
    """
    m, k = Y.shape
    eps = float(np.finfo(Y.dtype).eps)
    bound = 1.0 / math.sqrt(11.0 * (m * k + k * (k + 1)) * eps / 2)
    G = Y.T @ Y  # (k, k)
    # Y's condition number is sqrt(λ_max / λ_min) of G, accurate here: below the bound,
    # λ_min >> u λ_max. (eigvalsh, not the SVD of R: 0.5 ms against 2-20 ms under load.)
    w = np.linalg.eigvalsh(G)  # (k,), ascending
    if not (w[0] > 0 and w[-1] < w[0] * bound**2):  # also False for NaN
        return np.linalg.qr(Y)[0]
    Q = Y if overwrite and Y.flags.c_contiguous else None
    for sweep in range(2):
        try:
            R = np.linalg.cholesky(G).T  # (k, k), upper: G = Rᵀ R
        except np.linalg.LinAlgError:  # not numerically positive definite after all
            return np.linalg.qr(Y if Q is None else Q)[0]
        R_inv = np.linalg.inv(R)  # (k, k); R is well conditioned here, see above
        if Q is None:
            Q = Y @ R_inv  # (m, k), a new array
        else:  # in place, a block of rows at a time: the block's product is the only temporary
            for start in range(0, m, _ROW_BLOCK):
                rows = slice(start, start + _ROW_BLOCK)
                Q[rows] = Q[rows] @ R_inv
        if not refine or sweep == 1:
            break
        G = Q.T @ Q  # (k, k)
        if np.max(np.abs(G - np.eye(k, dtype=G.dtype))) <= k * eps:
            break
    assert Q is not None  # the first sweep always sets it
    return Q


def subspace_iteration(A: Any, size: int, n_iter: int, rng: np.random.Generator) -> np.ndarray:
    """The unchecked core of :func:`randomized_range_finder`: ``Q`` of shape (m, size).

    Validates nothing, for callers that already did (:func:`randomized_svd`,
    and :func:`~lowrank.factor.als`'s spectral start on scipy.sparse input):
    ``size`` must lie in ``[1, min(m, n)]`` and ``n_iter`` be ``>= 0``.
    ``A`` only needs ``shape``, ``dtype``, ``.T`` and products with dense
    blocks, so a scipy.sparse matrix and :func:`check_operand`'s operator
    work too. An overflow is not caught: it surfaces as NaN in ``Q`` or as
    ``numpy.linalg.LinAlgError``.

    Parameters
    ----------
    A : ndarray, scipy.sparse matrix or checked operator, of shape (m, n)
    size : int
    n_iter : int
    rng : numpy.random.Generator
        Draws the Gaussian test matrix, ``n * size`` normals.

    Returns
    -------
    ndarray of shape (m, size)
        Orthonormal columns (:func:`orthonormalize`), in ``A``'s dtype.
    """
    n = A.shape[1]
    omega = rng.standard_normal((n, size)).astype(A.dtype, copy=False)  # (n, size)
    Q = orthonormalize(np.asarray(A @ omega), refine=n_iter == 0, overwrite=True)  # (m, size)
    del omega
    for i in range(n_iter):
        # Orthonormalize after every product, not only at the end: in floating point the
        # columns of (A Aᵀ)^q A Ω all collapse onto the top singular vector. Between products
        # only the span matters (one CholeskyQR pass); the Q returned is orthonormal to rounding.
        Z = orthonormalize(np.asarray(A.T @ Q), refine=False, overwrite=True)  # (n, size)
        del Q  # one (m, size) block less at the peak
        Q = orthonormalize(np.asarray(A @ Z), refine=i == n_iter - 1, overwrite=True)  # (m, size)
    return Q


def randomized_range_finder(
    M: Any, size: int, *, n_iter: int, random_state: RandomState = None
) -> np.ndarray:
    """An orthonormal basis ``Q`` whose range approximates the range of ``M``.

    Randomized subspace iteration, Algorithm 4.4 of Halko, Martinsson and
    Tropp, "Finding structure with randomness", SIAM Review 53(2), 2011:
    ``Q`` spans ``(M Mᵀ)^q M Ω`` for a Gaussian test matrix ``Ω`` of shape
    (n, size), re-orthonormalized (:func:`orthonormalize`) after every
    product with ``M`` or ``Mᵀ``. Then ``M ≈ Q Qᵀ M``; with ``size`` a few
    columns above the rank of interest, the error is close to the best of
    that rank, and each power iteration brings it closer (see
    :func:`randomized_svd`). The same algorithm as scikit-learn's
    ``sklearn.utils.extmath.randomized_range_finder`` with
    ``power_iteration_normalizer="QR"``. :func:`randomized_svd` is this
    followed by :func:`svd_in_range`. ``M`` is touched only through products
    with dense blocks, so sparse and operator input work unchanged.

    Parameters
    ----------
    M : array_like, scipy.sparse matrix or linear operator, of shape (m, n)
        Finite real matrix; dtype rule as in :func:`truncated_svd`. Sparse
        and operator input as in :func:`check_operand`: never densified.
    size : int in [1, min(m, n)]
        Columns of ``Q``: the target rank plus some oversampling.
    n_iter : int >= 0
        Power iterations ``q``.
    random_state : None, int or numpy.random.Generator
        Seeds ``Ω``: the same seed gives the same bits.

    Returns
    -------
    Q : ndarray of shape (m, size)
        Orthonormal columns (``Qᵀ Q = I`` to rounding), in ``M``'s float dtype.

    Raises
    ------
    TypeError
        ``M`` is not a real matrix, or ``size``, ``n_iter`` or
        ``random_state`` is of the wrong kind.
    ValueError
        ``M`` is not 2-D, is empty or holds NaN or inf; ``size`` or
        ``n_iter`` is out of range.
    FloatingPointError
        ``M`` is finite but its products overflow ``M``'s dtype; the message
        names the largest entry.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> M = rng.standard_normal((50, 3)) @ rng.standard_normal((3, 40))   # rank 3
    >>> Q = randomized_range_finder(M, 5, n_iter=2, random_state=0)
    >>> Q.shape
    (50, 5)
    >>> bool(np.allclose(Q.T @ Q, np.eye(5))), bool(np.allclose(Q @ (Q.T @ M), M))
    (True, True)
    """
    A = check_operand(M, "M")
    size = check_int(size, "size", 1, min(A.shape), rule="[1, min(m, n)]")
    n_iter = check_int(n_iter, "n_iter", 0)
    rng = check_random_state(random_state)
    # Q spans the same space for M / 2**e: out of the safe window, iterate on that (see _scaled).
    scaled, _ = _scaled(A)  # (m, n)
    with np.errstate(over="ignore", invalid="ignore"), _blas_threads_for(A):  # an overflow is refused below
        try:
            Q = subspace_iteration(scaled, size, n_iter, rng)  # (m, size)
        except np.linalg.LinAlgError:  # NaN from an overflowed product reached LAPACK
            raise _overflowed(A, "a range finder", "the products overflowed") from None
    if not np.all(np.isfinite(Q)):
        raise _overflowed(A, "a range finder", "the products overflowed")
    return Q


def svd_in_range(A: Any, Q: np.ndarray, rank: int) -> SVDResult:
    """The rank-``rank`` SVD of ``Q Qᵀ A``, the part of ``A`` in the range of ``Q``.

    Stage B of Halko, Martinsson and Tropp (2011), Algorithm 5.1: the exact
    SVD of the small matrix ``B = Qᵀ A = Ub diag(s) Vt`` gives
    ``Q Qᵀ A = (Q Ub) diag(s) Vt``. It is taken as the SVD of the tall
    ``Bᵀ = Aᵀ Q = W diag(s) Xt`` (so ``Ub = Xtᵀ``, ``Vt = Wᵀ``), which
    LAPACK computes faster. With ``Q`` from
    :func:`randomized_range_finder` this is :func:`randomized_svd`.

    Validates nothing (like :func:`subspace_iteration`): ``A`` of shape
    (m, n), dense or scipy.sparse; ``Q`` of shape (m, k) with orthonormal
    columns in ``A``'s dtype; ``rank`` in ``[1, k]``.

    Returns
    -------
    SVDResult
        ``U (m, rank)``, ``s (rank,)``, ``Vt (rank, n)``, with the sign rule
        of :func:`truncated_svd`.
    """
    # The SVD of the tall Bᵀ = Aᵀ Q, not of the wide B: the same LAPACK routine, 1.4 s against 3.4-4.1 s
    # for (50,000 × 110) on this project's machine (NumPy copies the wide view into Fortran order first).
    Bt = np.asarray(A.T @ Q)  # (n, k) = (Qᵀ A)ᵀ
    W, s, Xt = np.linalg.svd(Bt, full_matrices=False)  # (n, k), (k,), (k, k): Bᵀ = W diag(s) Xt
    del Bt
    U = Q @ Xt[:rank].T  # (m, rank) = Q Ub with Ub = Xtᵀ, since B = Xtᵀ diag(s) Wᵀ
    signs = _sign_rule(U)  # the sign rule in place: U and Vt are this function's own arrays
    U *= signs
    Vt = np.ascontiguousarray(W[:, :rank].T)  # (rank, n) = Wᵀ
    Vt *= signs[:, None]
    return SVDResult(U=U, s=s[:rank].copy(), Vt=Vt)


def randomized_svd(
    M: Any,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int | Literal["auto"] = "auto",
    random_state: RandomState = None,
) -> SVDResult:
    """An approximate rank-``rank`` SVD by randomized subspace iteration.

    Algorithm 4.4 then 5.1 of Halko, Martinsson and Tropp, "Finding structure
    with randomness: probabilistic algorithms for constructing approximate
    matrix decompositions", SIAM Review 53(2), 2011: sketch the range of
    ``M`` with ``k = rank + oversample`` Gaussian test vectors and sharpen it
    with ``n_iter`` power iterations (:func:`randomized_range_finder`), then
    take the exact SVD of the small ``(k, n)`` matrix ``Qᵀ M``
    (:func:`svd_in_range`).

    Wide input (``m < n``) is transposed internally, so the sketch lives on
    the longer side; no dense array larger than ``M`` is ever formed.

    Sparse and operator input: ``M`` is only ever multiplied by dense
    blocks of ``k`` columns, ``M @ X`` and ``Mᵀ @ Y``, so a scipy.sparse
    matrix (the products cost O(nnz k)) or any linear operator with
    ``matvec``/``rmatvec`` (:func:`check_operand`) gives the same factors as
    its dense form with the same ``random_state``, to rounding, and is never
    densified: the memory is O(nnz + (m + n) k).

    Accuracy: on decaying spectra (tested with ``s_i`` = ``0.9**i``,
    ``1/i`` and ``1/sqrt(i)``, ranks up to ``min(m, n)/2``) the Frobenius
    error at the defaults stays within a factor 1.05 of the Eckart–Young
    optimum; the worst case measured is 1.005. In theory, Halko et al.'s
    bound (Corollary 10.10, §10.4) is for the range finder, not for the
    truncated result: with ``k = rank + oversample`` columns,
    ``oversample >= 2`` and ``q = n_iter``, the basis ``Q`` satisfies

        E ‖(I − Q Qᵀ) M‖_2 <= [(1 + sqrt(rank / (oversample − 1))) s[rank]^(2q+1)
                               + (e sqrt(k) / oversample) sqrt(Σ_{j>=rank} s[j]^(2(2q+1)))]^(1/(2q+1)),

    so each power iteration takes a root of the plain range finder's
    factor over the optimum ``s[rank]``. Truncating ``Q Qᵀ M`` to ``rank``
    adds at most ``s[rank]`` more (triangle inequality, and
    ``s_(rank+1)(Q Qᵀ M) <= s[rank]``): the spectral error of the result is
    at most that bound plus ``s[rank]``, within ``2 + ε`` of optimal when
    the range finder's bound is ``(1 + ε) s[rank]``.

    Parameters
    ----------
    M : array_like, scipy.sparse matrix or linear operator, of shape (m, n)
        Finite real matrix; dtype rule as in :func:`truncated_svd`. Sparse
        and operator input as in :func:`check_operand`.
    rank : int in [1, min(m, n)]
    oversample : int >= 0, default 10
        Extra test vectors beyond ``rank``; the sketch has
        ``min(rank + oversample, min(m, n))`` columns.
    n_iter : int >= 0 or "auto", default "auto"
        Power iterations. "auto" uses 7 when ``rank < 0.1 * min(m, n)``,
        else 4 (scikit-learn's rule).
    random_state : None, int or numpy.random.Generator
        Seeds the Gaussian test matrix: the same seed gives the same bits.

    Returns
    -------
    SVDResult
        Same layout and sign rule as :func:`truncated_svd`.

    Raises
    ------
    TypeError
        ``M`` is not a real matrix, an operator lacks ``shape``, ``dtype``,
        ``matvec`` or ``rmatvec`` (the message names which) or returns
        non-real products; ``rank``, ``oversample``, ``n_iter`` or
        ``random_state`` is of the wrong kind.
    ValueError
        ``M`` is not 2-D, is empty or holds NaN or inf (a sparse matrix's
        entry named by its index); an operator's product has the wrong
        shape; ``rank``, ``oversample`` or ``n_iter`` is out of range.
    FloatingPointError
        ``M`` is finite but the computation overflows ``M``'s dtype
        (float32 entries near 1e38); the message names the largest entry.
        For an operator: its products are not finite.

    Examples
    --------
    >>> import numpy as np, scipy.sparse
    >>> M = scipy.sparse.random(300, 200, density=0.05, format="csr", rng=np.random.default_rng(0))
    >>> svd = randomized_svd(M, 5, random_state=0)                     # never densified
    >>> dense = randomized_svd(M.toarray(), 5, random_state=0)
    >>> bool(np.allclose(svd.s, dense.s)), bool(np.allclose(svd.U, dense.U))
    (True, True)
    """
    checked = check_operand(M, "M")
    rank = check_rank(rank, checked.shape)
    oversample = check_int(oversample, "oversample", 0)
    n_iter = _resolve_n_iter(n_iter, rank, checked.shape)
    rng = check_random_state(random_state)
    transpose = checked.shape[0] < checked.shape[1]
    A = checked.T if transpose else checked  # (m, n) with m >= n: a view (CSR becomes CSC), not a copy
    k = min(rank + oversample, A.shape[1])
    # Out of the safe window, iterate on A / 2**e, largest magnitude in [0.5, 1): no product can
    # overflow or lose its small entries, and s * 2**e is exact (see _scaled).
    A, e = _scaled(A)  # (m, n)
    with np.errstate(over="ignore", invalid="ignore"), _blas_threads_for(A):  # an overflow is refused below
        try:
            Q = subspace_iteration(A, k, n_iter, rng)  # (m, k)
            svd = svd_in_range(A, Q, rank)
        except np.linalg.LinAlgError:  # NaN from a degenerate product reached LAPACK
            raise _overflowed(checked) from None
        s = times_power_of_two(svd.s, e)  # (rank,): only here can the result itself overflow
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(svd.U)) and np.all(np.isfinite(svd.Vt))):
        raise _overflowed(checked)
    svd = SVDResult(U=svd.U, s=s, Vt=svd.Vt)
    if transpose:  # Mᵀ = U s Vt, so M = Vtᵀ s Uᵀ: swap the factors and put the sign rule on the new U
        U, Vt = _flip_signs(svd.Vt.T, svd.U.T)
        svd = SVDResult(U=U, s=svd.s, Vt=Vt)
    return svd
