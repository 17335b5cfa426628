"""Certificates: how far factors computed elsewhere (Spark, ``implicit``, a GPU SVD) are from optimal.

Each check reads the input and the factors, never recomputes the
factorization, and reports numbers that would be 0 at an exact optimum:

- :func:`check_svd`: the residuals of the singular triplets, the
  orthogonality of ``U`` and ``V``, and how far the approximation's error is
  above the Eckart–Young optimum (exact when ``M``'s spectrum can be computed,
  a randomized upper bound with a stated probability when it cannot).
- :func:`check_als` and :func:`check_implicit_als`: the objective the ALS
  solvers of this package minimize, the relative gradient of every row and
  column factor, and the relative decrease one more exact half-step would
  still give.

Everything is computed in float64, whatever the input's dtype, streaming
over blocks of rows of ``M`` (a scipy.sparse matrix is never densified). The
maths, and what each number proves, is in ``docs/factorization.md``
("Certificates").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowrank.factor.als import is_scipy_sparse, solve_min_norm
from lowrank.factor.implicit_als import implicit_als_objective
from lowrank.utils.validation import (
    RandomState,
    as_float_array,
    check_bool,
    check_int,
    check_mask,
    check_matrix,
    check_random_state,
    check_real,
    first_non_finite,
    float_dtype_of,
    non_finite_message,
)

__all__ = [
    "ALSCertificate",
    "SVDCertificate",
    "SideSummary",
    "check_als",
    "check_implicit_als",
    "check_svd",
    "factors_from_id_tables",
]

# Rows of M are read this many stored entries at a time (dense input: this
# many entries), so the scratch memory is O(block · r), not O(nnz · r).
_BLOCK_ENTRIES = 1 << 18

# Column systems are solved this many at a time: O(chunk · r²) scratch.
_SOLVE_CHUNK = 1 << 13

# Quantiles of the stationarity reported by the summaries.
QUANTILES = (0.5, 0.9, 0.99)

# Dixon's bound (Halko, Martinsson and Tropp 2011, Lemma 4.1):
# ‖B‖ <= ALPHA sqrt(2/π) max_i ‖B ω_i‖ except with probability ALPHA**-PROBES.
_DIXON_ALPHA = 10.0


# ---------------------------------------------------------------- summaries and reports


@dataclass(frozen=True)
class SideSummary:
    """The stationarity of one factor's rows: max, quantiles, and the worst rows by index.

    Attributes
    ----------
    name : str
        ``"rows"`` (the left factor) or ``"columns"`` (the right factor).
    max : float
    quantiles : tuple of (float, float)
        ``(q, value)`` for ``q`` in :data:`QUANTILES`.
    worst : tuple of (int, float)
        ``(index, value)`` of the worst entries, worst first.
    above : int
        How many exceed the tolerance.
    """

    name: str
    max: float
    quantiles: tuple[tuple[float, float], ...]
    worst: tuple[tuple[int, float], ...]
    above: int


def _summarize(name: str, values: np.ndarray, tol: float, worst: int) -> SideSummary:
    order = np.argsort(-values, kind="stable")[:worst]
    return SideSummary(
        name=name,
        max=float(values.max()),
        quantiles=tuple((q, float(np.quantile(values, q))) for q in QUANTILES),
        worst=tuple((int(i), float(values[i])) for i in order),
        above=int(np.count_nonzero(values > tol)),
    )


@dataclass(frozen=True, repr=False)
class ALSCertificate:
    """The outcome of :func:`check_als` or :func:`check_implicit_als` (see ``docs/factorization.md``).

    Attributes
    ----------
    kind : str
        ``"als"`` or ``"implicit-als"``.
    shape : tuple of int
        ``(m, n)``.
    rank : int
    n_observed : int
        Observed entries (implicit: positive entries).
    objective : float
        The objective at the factors, in float64.
    row_stationarity : ndarray of shape (m,)
        ``‖A_u x_u − b_u‖ / max(‖A_u x_u‖ + ‖b_u‖, STATIONARITY_FLOOR · S)`` for
        every row ``u``: the norm of the objective's gradient with respect to
        ``left[u]`` relative to the two terms it is the difference of (0
        where both are 0); ``S`` is the largest such sum over all rows and
        columns, ``STATIONARITY_FLOOR = sqrt(eps64) ≈ 1.5e-8``.
    col_stationarity : ndarray of shape (n,)
        The same for every column of ``right``.
    row_gain, col_gain : float
        The exact decrease of the objective that one half-step solving for
        every row (column) would give from these factors, relative to the
        objective (or to ``GAIN_FLOOR`` times the data's size, when larger).
    sweep_gain : float
        ``max(row_gain, col_gain)``: one exact sweep that starts with the
        less converged side decreases the objective by at least this
        fraction.
    tol : float
    worst : int
        How many of the worst rows and columns the summaries name.
    """

    kind: str
    shape: tuple[int, int]
    rank: int
    n_observed: int
    objective: float
    row_stationarity: np.ndarray
    col_stationarity: np.ndarray
    row_gain: float
    col_gain: float
    tol: float
    worst: int = 5
    rows: SideSummary = field(init=False)
    cols: SideSummary = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", _summarize("rows", self.row_stationarity, self.tol, self.worst))
        object.__setattr__(self, "cols", _summarize("columns", self.col_stationarity, self.tol, self.worst))

    @property
    def sweep_gain(self) -> float:
        """``max(row_gain, col_gain)``."""
        return max(self.row_gain, self.col_gain)

    @property
    def not_converged(self) -> tuple[str, ...]:
        """The sides that fail: ``"left"`` (rows) and/or ``"right"`` (columns); empty when passed."""
        sides = []
        if self.rows.max > self.tol or self.row_gain > self.tol:
            sides.append("left")
        if self.cols.max > self.tol or self.col_gain > self.tol:
            sides.append("right")
        return tuple(sides)

    @property
    def passed(self) -> bool:
        """Every row and column stationary to ``tol``, and ``sweep_gain <= tol``."""
        return not self.not_converged

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (the per-row arrays summarized, not listed; an infinite gain ``None``)."""
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "rank": self.rank,
            "n_observed": self.n_observed,
            "objective": self.objective,
            "row_gain": _json_float(self.row_gain),
            "col_gain": _json_float(self.col_gain),
            "sweep_gain": _json_float(self.sweep_gain),
            "tol": self.tol,
            "passed": self.passed,
            "not_converged": list(self.not_converged),
            "row_stationarity": _summary_dict(self.rows),
            "col_stationarity": _summary_dict(self.cols),
        }

    def format(self) -> str:
        """A readable report: the numbers, then the verdict naming the side and the rows that fail."""
        m, n = self.shape
        lines = [
            f"{self.kind} certificate: {m}×{n}, rank {self.rank}, {self.n_observed:,} observed entries",
            f"objective            {self.objective:.10g}",
            _format_side(self.rows, "left", m),
            _format_side(self.cols, "right", n),
            f"sweep gain           {self.sweep_gain:.3e} (solving the rows: {self.row_gain:.3e}, "
            f"the columns: {self.col_gain:.3e})",
        ]
        if self.passed:
            lines.append(f"verdict              PASSED: stationary to tol={self.tol:g}")
        else:
            parts = []
            for side, summary, gain in (("left", self.rows, self.row_gain), ("right", self.cols, self.col_gain)):
                if side in self.not_converged:
                    worst = ", ".join(f"{i}" for i, v in summary.worst if v > self.tol)
                    where = (f"{summary.above:,} {summary.name} above tol, worst {summary.name} {worst}; "
                             if summary.above else "")  # fmt: skip
                    parts.append(f"the {side} factor is not converged ({where}half-step gain {gain:.3e})")
            lines.append(f"verdict              FAILED at tol={self.tol:g}: " + "; ".join(parts))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, shape={self.shape}, rank={self.rank}, "
            f"objective={self.objective:.6g}, row_max={self.rows.max:.3e}, col_max={self.cols.max:.3e}, "
            f"sweep_gain={self.sweep_gain:.3e}, passed={self.passed})"
        )


def _json_float(value: float) -> float | None:
    """``value``, or ``None`` when it is infinite or NaN: JSON has no such numbers."""
    return value if math.isfinite(value) else None


def _summary_dict(summary: SideSummary) -> dict[str, Any]:
    return {
        "max": summary.max,
        "quantiles": {f"q{round(q * 100)}": v for q, v in summary.quantiles},
        "worst": [{"index": i, "value": v} for i, v in summary.worst],
        "above_tol": summary.above,
    }


def _format_side(summary: SideSummary, side: str, count: int) -> str:
    quantiles = "  ".join(f"q{round(q * 100)} {v:.2e}" for q, v in summary.quantiles)
    worst = ", ".join(f"{i} ({v:.2e})" for i, v in summary.worst)
    label = f"{summary.name} ({side}, {count:,})"
    return f"stationarity {label:<22} max {summary.max:.3e}  {quantiles}  worst {worst}"


# ---------------------------------------------------------------- the factors


def _check_als_factors(left: Any, right: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Finite ``left (m, r)`` and ``right (r, n)`` of one rank; returned as float64 ``left`` and ``right.T``."""
    left = check_matrix(left, "left", dtype=np.dtype(np.float64))
    right = check_matrix(right, "right", dtype=np.dtype(np.float64))
    m, n = shape
    r = left.shape[1]
    if left.shape != (m, r) or right.shape != (r, n):
        raise ValueError(
            f"left and right must have shapes (m, r) and (r, n) with (m, n) = {shape} the matrix's shape and one "
            f"rank r, got {left.shape} and {right.shape}"
        )
    return np.ascontiguousarray(left), np.ascontiguousarray(right.T)


def factors_from_id_tables(
    row_ids: Any, row_vectors: Any, col_ids: Any, col_vectors: Any, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``left (m, r)`` and ``right (r, n)`` from id→vector tables, as Spark's ``ALSModel`` exports them.

    Spark MLlib's ``userFactors`` and ``itemFactors`` are tables of
    ``(id, features)``, one row per user or item seen in training. Ids
    index the rows and columns of the matrix; an id absent from its table
    gets a zero vector (what ALS gives a row with nothing observed).

    Parameters
    ----------
    row_ids : array_like of int, shape (k,)
        Distinct ids in ``[0, m)``.
    row_vectors : array_like of shape (k, r)
    col_ids : array_like of int, shape (l,)
        Distinct ids in ``[0, n)``.
    col_vectors : array_like of shape (l, r)
    shape : tuple of int
        ``(m, n)``, the matrix's shape.

    Returns
    -------
    left : ndarray of shape (m, r), float64
    right : ndarray of shape (r, n), float64

    Raises
    ------
    TypeError
        Ids that are not integers.
    ValueError
        Ids out of range or repeated, vectors of the wrong shape or not finite.
    """
    m, n = shape
    left = _scatter(row_ids, row_vectors, m, "row")
    right = _scatter(col_ids, col_vectors, n, "column")
    if left.shape[1] != right.shape[1]:
        raise ValueError(
            f"row_vectors and col_vectors must have one rank r, got {left.shape[1]} and {right.shape[1]}"
        )
    return left, np.ascontiguousarray(right.T)


def _scatter(ids: Any, vectors: Any, size: int, what: str) -> np.ndarray:
    name = f"{what}_ids" if what == "row" else "col_ids"
    vname = "row_vectors" if what == "row" else "col_vectors"
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {ids.dtype}")
    vectors = check_matrix(vectors, vname, dtype=np.dtype(np.float64))
    if ids.ndim != 1 or ids.shape[0] != vectors.shape[0]:
        raise ValueError(
            f"{name} must be 1-D with one id per row of {vname} ({vectors.shape[0]}), got shape {ids.shape}"
        )
    bad = (ids < 0) | (ids >= size)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(
            f"{name} must be in [0, {size}) (the matrix has {size} {what}s), got {ids[k]} at position {k} "
            f"({int(np.count_nonzero(bad))} out of range)"
        )
    unique, counts = np.unique(ids, return_counts=True)
    if unique.size != ids.size:
        raise ValueError(f"{name} must be distinct, got {unique[np.argmax(counts > 1)]} repeated")
    out = np.zeros((size, vectors.shape[1]))
    out[ids.astype(np.int64)] = vectors
    return out


# ---------------------------------------------------------------- the data, in row blocks


class _Entries:
    """The observed entries of a matrix, read in blocks of rows.

    Each block gives the weights ``w`` and targets ``t`` of its observed
    entries (float64), so that the objective's row ``u`` is
    ``xᵀQx + Σ_{j obs} w_uj (x·f_j)² − 2 Σ_{j obs} t_uj (x·f_j) + const``:
    explicit ALS has ``w = 1``, ``t = M_uj`` and ``Q = 0``; implicit ALS
    ``w = α r``, ``t = 1 + α r`` and ``Q = FᵀF``. Blocks are dense
    ``(k, n)`` arrays (zero where unobserved) or scipy CSR matrices.
    """

    def __init__(self, M: Any, pattern: np.ndarray | None, sparse: bool) -> None:
        self.M = M  # canonical CSR (sparse) or a 2-D float array
        self.pattern = pattern  # dense only: bool (m, n), or None for all observed
        self.sparse = sparse
        self.shape: tuple[int, int] = (int(M.shape[0]), int(M.shape[1]))
        if sparse:
            self.row_counts = np.diff(M.indptr).astype(np.int64)  # (m,)
            self.col_counts = np.bincount(M.indices, minlength=self.shape[1]).astype(np.int64)  # (n,)
        elif pattern is None:
            self.row_counts = np.full(self.shape[0], self.shape[1], dtype=np.int64)
            self.col_counts = np.full(self.shape[1], self.shape[0], dtype=np.int64)
        else:
            self.row_counts = np.count_nonzero(pattern, axis=1).astype(np.int64)
            self.col_counts = np.count_nonzero(pattern, axis=0).astype(np.int64)
        self.n_observed = int(self.row_counts.sum())

    def blocks(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of consecutive row blocks of about :data:`_BLOCK_ENTRIES` entries."""
        m, n = self.shape
        if not self.sparse:
            step = max(1, _BLOCK_ENTRIES // n)
            for start in range(0, m, step):
                yield start, min(start + step, m)
            return
        indptr = self.M.indptr
        start = 0
        while start < m:  # the first row whose end passes start's first entry plus the budget
            stop = int(np.searchsorted(indptr, indptr[start] + _BLOCK_ENTRIES, side="right")) - 1
            stop = min(max(stop, start + 1), m)
            yield start, stop
            start = stop


def _sparse_block(entries: _Entries, start: int, stop: int) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of sparse ``M``: a CSR maker, and each entry's local row, column and value (float64)."""
    import scipy.sparse

    M = entries.M
    a, b = int(M.indptr[start]), int(M.indptr[stop])
    indptr = M.indptr[start : stop + 1] - a  # (k + 1,)
    cols = M.indices[a:b]  # (e,)
    values = M.data[a:b].astype(np.float64)  # (e,)
    local = np.repeat(np.arange(stop - start), np.diff(indptr))  # (e,)
    shape = (stop - start, entries.shape[1])

    def csr(data: np.ndarray) -> Any:
        return scipy.sparse.csr_matrix((data, cols, indptr), shape=shape, copy=False)

    return csr, local, cols, values


def _scores(X: np.ndarray, rows: np.ndarray, Y: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``X[rows[e]] · Y[cols[e]]`` for every entry ``e``, gathered 2¹⁶ entries at a time: shape (e,)."""
    out = np.empty(rows.shape[0])
    step = 1 << 16
    for a in range(0, rows.shape[0], step):
        out[a : a + step] = np.einsum("er,er->e", X[rows[a : a + step]], Y[cols[a : a + step]])
    return out


@dataclass
class _ColumnSums:
    """What the column side needs, accumulated over the row blocks."""

    wsx: np.ndarray  # (n, r): Σ_u w_uj s_uj x_u
    tx: np.ndarray  # (n, r): Σ_u t_uj x_u = b_j
    gram: np.ndarray  # (n, q): Σ_u w_uj (x_u ⊗ x_u), upper triangle


def _upper(F: np.ndarray) -> np.ndarray:
    """The upper triangles of the outer products ``f ⊗ f`` of the rows of ``F`` (k, r): shape (k, r(r+1)/2)."""
    iu, ju = np.triu_indices(F.shape[1])
    return F[:, iu] * F[:, ju]


def _full(Gq: np.ndarray, r: int) -> np.ndarray:
    """Symmetric (k, r, r) matrices from their upper triangles (k, r(r+1)/2)."""
    iu, ju = np.triu_indices(r)
    G = np.empty((Gq.shape[0], r, r))
    G[:, iu, ju] = Gq
    G[:, ju, iu] = Gq
    return G


# A row's gradient is judged against its own terms, or against this fraction
# of the largest row's or column's terms when its own are smaller: factors
# correct to rounding are correct relative to the whole problem's scale, and
# a row whose terms are at that rounding level has a gradient of the same
# size. sqrt(eps64) keeps such rows below any tolerance above 1e-8 while a
# row with terms a thousandth of the largest is still judged on its own.
STATIONARITY_FLOOR = float(np.sqrt(np.finfo(np.float64).eps))


def _stationarity(Ax: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``g = Ax − b`` (k, r), ``‖g‖`` (k,) and the scale ``‖Ax‖ + ‖b‖`` (k,)."""
    g = Ax - b
    return g, np.linalg.norm(g, axis=1), np.linalg.norm(Ax, axis=1) + np.linalg.norm(b, axis=1)


def _relative_gradients(grad: np.ndarray, scale: np.ndarray, largest: float) -> np.ndarray:
    """``‖g_u‖ / max(‖A_u x_u‖ + ‖b_u‖, floor · largest)``, 0 where both are 0."""
    denominator = np.maximum(scale, STATIONARITY_FLOOR * largest)
    return grad / np.where(denominator > 0, denominator, 1.0)


def _gains(G: np.ndarray, Q: np.ndarray, lam: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``g_uᵀ A_u⁺ g_u`` for ``A_u = G_u + Q + λ_u I`` (k, r, r): each row's exact half-step decrease, (k,)."""
    r = g.shape[1]
    A = G + Q
    A[:, np.arange(r), np.arange(r)] += lam[:, None]
    scale = np.max(np.abs(A), axis=(1, 2))  # (k,)
    w_min = np.linalg.eigvalsh(A)[:, 0] if r > 1 else A[:, 0, 0]
    posed = w_min > r * np.finfo(np.float64).eps * scale
    x = np.zeros_like(g)
    if posed.any():
        x[posed] = np.linalg.solve(A[posed], g[posed][..., None])[..., 0]
    if not posed.all():  # singular (reg = 0, fewer observations than r): g lies in A's range
        x[~posed] = solve_min_norm(A[~posed], g[~posed][..., None])[..., 0]
    return np.einsum("kr,kr->k", g, x)


def _certify(
    entries: _Entries,
    weights: Any,
    targets: Any,
    X: np.ndarray,
    Y: np.ndarray,
    lam_rows: np.ndarray,
    lam_cols: np.ndarray,
    implicit: bool,
) -> tuple[np.ndarray, np.ndarray, float, float, float, float]:
    """Both sides' stationarity and half-step decreases; and the explicit data term (implicit: 0).

    ``weights(values)`` and ``targets(values)`` map the observed values of a
    block to ``w`` and ``t`` (see :class:`_Entries`). ``X (m, r)``, ``Y (n, r)``.
    Returns ``row_eta (m,)``, ``col_eta (n,)``, ``Σ row gains``,
    ``Σ column gains``, ``Σ_observed (t − s)²`` and the data's size
    (``Σ_observed t²`` explicit, ``Σ_observed t = Σ_observed c`` implicit).
    """
    m, n = entries.shape
    r = X.shape[1]
    Q_rows = Y.T @ Y if implicit else np.zeros((r, r))  # (r, r): YᵀY in the row systems
    Q_cols = X.T @ X if implicit else np.zeros((r, r))
    Y_upper = _upper(Y)  # (n, q)
    sums = _ColumnSums(np.zeros((n, r)), np.zeros((n, r)), np.zeros((n, Y_upper.shape[1])))
    row_grad, row_scale = np.empty(m), np.empty(m)
    row_gain, data, size = 0.0, 0.0, 0.0
    for start, stop in entries.blocks():
        Xb = X[start:stop]  # (k, r)
        if entries.sparse:
            csr, local, cols, values = _sparse_block(entries, start, stop)
            s = _scores(Xb, local, Y, cols)  # (e,): the scores x_u·y_j
            w, t = weights(values), targets(values)  # (e,)
            W, WS, T = csr(w), csr(w * s), csr(t)  # (k, n)
            if not implicit:
                data += float(np.sum(np.square(t - s)))
            size += float(np.sum(t if implicit else np.square(t)))
        else:
            block = entries.M[start:stop].astype(np.float64)  # (k, n)
            seen = None if entries.pattern is None else entries.pattern[start:stop]
            S = Xb @ Y.T  # (k, n)
            W, T = weights(block, seen), targets(block, seen)  # (k, n), 0 where unobserved
            WS = W * S
            if not implicit:
                data += float(np.sum(np.square(T - WS)))  # w = 1 where observed, 0 elsewhere
            size += float(np.sum(T if implicit else np.square(T)))
        lam = lam_rows[start:stop]
        Ax = np.asarray(WS @ Y) + Xb @ Q_rows + lam[:, None] * Xb  # (k, r)
        b = np.asarray(T @ Y)  # (k, r)
        g, row_grad[start:stop], row_scale[start:stop] = _stationarity(Ax, b)
        G = _full(np.asarray(W @ Y_upper), r)  # (k, r, r)
        row_gain += float(np.sum(_gains(G, Q_rows, lam, g)))
        sums.wsx += np.asarray(WS.T @ Xb)
        sums.tx += np.asarray(T.T @ Xb)
        sums.gram += np.asarray(W.T @ _upper(Xb))

    col_grad, col_scale = np.empty(n), np.empty(n)
    col_gain = 0.0
    for start in range(0, n, _SOLVE_CHUNK):
        part = slice(start, min(start + _SOLVE_CHUNK, n))
        Yc, lam = Y[part], lam_cols[part]
        Ay = sums.wsx[part] + Yc @ Q_cols + lam[:, None] * Yc  # (c, r)
        g, col_grad[part], col_scale[part] = _stationarity(Ay, sums.tx[part])
        col_gain += float(np.sum(_gains(_full(sums.gram[part], r), Q_cols, lam, g)))
    largest = max(float(row_scale.max()), float(col_scale.max()))
    row_eta = _relative_gradients(row_grad, row_scale, largest)
    col_eta = _relative_gradients(col_grad, col_scale, largest)
    return row_eta, col_eta, row_gain, col_gain, data, size


def _penalties(
    entries: _Entries, reg: float, weighted_reg: bool, rows_counts: np.ndarray, cols_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    m, n = entries.shape
    if weighted_reg:
        return reg * rows_counts.astype(np.float64), reg * cols_counts.astype(np.float64)
    return np.full(m, reg), np.full(n, reg)


# The gains are relative to the objective, or to this fraction of the data's
# own size (Σ_observed M² explicit, Σ_observed c implicit) when the objective
# is smaller: an exact fit's objective is rounding noise, and so is its gain.
GAIN_FLOOR = float(np.finfo(np.float64).eps)


def _relative(gain: float, objective: float, size: float) -> float:
    denominator = max(objective, GAIN_FLOOR * size)
    if denominator > 0:
        return max(gain, 0.0) / denominator
    return 0.0 if gain <= 0 else math.inf


def _check_tol(tol: Any, worst: Any) -> tuple[float, int]:
    return check_real(tol, "tol", 0.0), check_int(worst, "worst", 1)


def _finite_result(*values: float) -> None:
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(
            "the certificate overflowed float64: the matrix's entries or the factors are too large; scale them down"
        )


# ---------------------------------------------------------------- explicit ALS


def _explicit_entries(M: Any, mask: Any) -> _Entries:
    """Validate ``M`` (and ``mask``) as :func:`lowrank.als` does; sparse input is copied only if not canonical CSR."""
    if is_scipy_sparse(M):
        if mask is not None:
            raise ValueError(
                "mask must be None when M is a scipy.sparse matrix (its stored entries are the observed ones), "
                "got a mask"
            )
        float_dtype_of(np.asarray(M.data), "M")  # TypeError for a non-real dtype
        csr = M if M.format == "csr" and M.has_canonical_format else M.tocsr(copy=True)
        if not csr.has_canonical_format:
            csr.sum_duplicates()  # repeated (i, j) pairs add up, as scipy's own conversion does
        if csr.ndim != 2 or 0 in csr.shape:
            raise ValueError(f"M must be a non-empty 2-D matrix, got shape {csr.shape}")
        if csr.nnz == 0:
            raise ValueError("M must observe at least one entry, got a sparse matrix with no stored entries")
        _check_sparse_finite(csr, "M", observed=True)
        return _Entries(csr, None, True)
    if mask is None:
        return _Entries(check_matrix(M, "M"), None, False)
    arr = as_float_array(M, "M")
    if arr.ndim == 2 and arr.size:
        mask = check_mask(mask, arr.shape)
    arr = check_matrix(arr, "M", mask=mask)
    return _Entries(np.where(mask, arr, 0).astype(arr.dtype, copy=False), mask, False)


def _check_sparse_finite(csr: Any, name: str, observed: bool = False) -> None:
    bad = first_non_finite(csr.data)
    if bad is not None:
        k = bad[0]
        row = int(np.searchsorted(csr.indptr, k, side="right")) - 1
        count = int(np.count_nonzero(~np.isfinite(csr.data)))
        raise ValueError(non_finite_message(name, csr.data[k], (row, int(csr.indices[k])), count, observed=observed))


def check_als(
    M: Any,
    left: Any,
    right: Any,
    *,
    mask: Any = None,
    reg: float = 0.0,
    weighted_reg: bool = False,
    tol: float = 1e-4,
    worst: int = 5,
) -> ALSCertificate:
    """Certify factors ``left @ right`` of ``M`` against the objective :func:`lowrank.als` minimizes.

    The objective is ``f = Σ_{(u,j) observed} (M_uj − x_u·y_j)² + Σ_u λ_u ‖x_u‖² + Σ_j λ_j ‖y_j‖²``
    with ``x_u = left[u]``, ``y_j = right[:, j]``, ``λ = reg`` (or, with
    ``weighted_reg``, ``reg`` times the row's or column's observation count).
    Its gradient with respect to ``x_u`` is ``2 (A_u x_u − b_u)`` with
    ``A_u = Σ_{j ∈ Ω_u} y_j y_jᵀ + λ_u I`` and ``b_u = Σ_{j ∈ Ω_u} M_uj y_j``
    (ALS's normal equations), and the same for columns.

    Parameters
    ----------
    M : array_like of shape (m, n), or scipy.sparse matrix
        As for :func:`lowrank.als`: a sparse matrix's stored entries
        (explicit zeros included) are the observed ones.
    left : array_like of shape (m, r)
    right : array_like of shape (r, n)
        Factors computed anywhere. Any float dtype; checked in float64.
    mask : ndarray of bool of shape (m, n), optional
        True where ``M`` is observed; entries where it is False are never read.
    reg : float >= 0, default 0.0
    weighted_reg : bool, default False
        As for :func:`lowrank.als` (Spark MLlib's explicit ``regParam`` is
        ``reg`` with ``weighted_reg=True``).
    tol : float >= 0, default 1e-4
        Passed when every row's and column's stationarity and the sweep gain
        are at most ``tol``.
    worst : int >= 1, default 5
        How many of the worst rows and columns the report names.

    Returns
    -------
    ALSCertificate
        ``objective``, ``row_stationarity (m,)``, ``col_stationarity (n,)``,
        ``row_gain``, ``col_gain``, ``sweep_gain``, ``passed``, ``format()``.

    Raises
    ------
    TypeError
        ``M`` or the factors of a non-real dtype, ``mask`` not boolean.
    ValueError
        ``M`` not 2-D, empty, or non-finite where observed; factors of the
        wrong shapes or ranks, or non-finite; an option out of range.
    FloatingPointError
        The objective or a gradient overflows float64.

    Notes
    -----
    One pass over the row blocks of ``M`` computes the scores ``x_u·y_j`` at
    the observed entries, both sides' gradients and the Gram matrices
    ``Σ y_j y_jᵀ`` (upper triangles), then solves one ``r × r`` system per
    row and column: the work of one ALS sweep. Memory beyond the input:
    O((n + block) r²).
    """
    entries = _explicit_entries(M, mask)
    X, Y = _check_als_factors(left, right, entries.shape)
    reg = check_real(reg, "reg", 0.0)
    weighted_reg = check_bool(weighted_reg, "weighted_reg")
    tol, worst = _check_tol(tol, worst)
    lam_rows, lam_cols = _penalties(entries, reg, weighted_reg, entries.row_counts, entries.col_counts)

    def weights(values: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        if entries.sparse:
            return np.ones_like(values)
        return np.ones_like(values) if seen is None else seen.astype(np.float64)

    def targets(values: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        return values  # unobserved entries of a dense block are 0 already

    with np.errstate(over="ignore", invalid="ignore"):
        certified = _certify(entries, weights, targets, X, Y, lam_rows, lam_cols, implicit=False)
    penalty = float(lam_rows @ np.einsum("ur,ur->u", X, X)) + float(lam_cols @ np.einsum("jr,jr->j", Y, Y))
    data = certified[4]  # the data term of the objective, summed while streaming
    return _als_certificate("als", entries, X, data + penalty, certified, tol, worst)


def _als_certificate(
    kind: str, entries: _Entries, X: np.ndarray, objective: float,
    certified: tuple[np.ndarray, np.ndarray, float, float, float, float], tol: float, worst: int,
) -> ALSCertificate:
    """The certificate of either ALS from :func:`_certify`'s numbers, once they are checked finite."""
    row_eta, col_eta, row_gain, col_gain, _, size = certified
    _finite_result(objective, row_gain, col_gain, float(row_eta.max()), float(col_eta.max()))
    return ALSCertificate(
        kind=kind,
        shape=entries.shape,
        rank=X.shape[1],
        n_observed=entries.n_observed,
        objective=objective,
        row_stationarity=row_eta,
        col_stationarity=col_eta,
        row_gain=_relative(row_gain, objective, size),
        col_gain=_relative(col_gain, objective, size),
        tol=tol,
        worst=worst,
    )


# ---------------------------------------------------------------- implicit ALS


def check_implicit_als(
    R: Any,
    left: Any,
    right: Any,
    *,
    alpha: float = 1.0,
    reg: float = 0.01,
    weighted_reg: bool = False,
    tol: float = 1e-4,
    worst: int = 5,
) -> ALSCertificate:
    """Certify factors ``left @ right`` of implicit feedback ``R`` against :func:`lowrank.implicit_als`'s objective.

    The objective is :func:`lowrank.factor.implicit_als_objective`:
    ``Σ_{all u,i} c_ui (p_ui − x_u·y_i)² + Σ_u λ_u ‖x_u‖² + Σ_i λ_i ‖y_i‖²`` with
    ``c = 1 + alpha·r`` and ``p = 1[r > 0]``. Its gradient with respect to
    ``x_u`` is ``2 (A_u x_u − b_u)`` with
    ``A_u = YᵀY + Σ_{r_ui > 0} alpha r_ui y_i y_iᵀ + λ_u I`` and
    ``b_u = Σ_{r_ui > 0} c_ui y_i``; the same for columns.

    Parameters
    ----------
    R : array_like of shape (m, n), or scipy.sparse matrix
        Non-negative interaction strengths; a 0 is not observed.
    left : array_like of shape (m, r)
    right : array_like of shape (r, n)
    alpha, reg, weighted_reg
        As for :func:`lowrank.implicit_als` (``docs/factorization.md`` maps
        them onto Spark's and ``implicit``'s).
    tol : float >= 0, default 1e-4
    worst : int >= 1, default 5

    Returns
    -------
    ALSCertificate
        As for :func:`check_als`, with ``kind="implicit-als"``.

    Raises
    ------
    TypeError, ValueError, FloatingPointError
        As for :func:`check_als`; ``R`` with a negative entry is a ValueError.
    """
    objective = implicit_als_objective(R, left, right, alpha=alpha, reg=reg, weighted_reg=weighted_reg)
    alpha, reg = float(alpha), float(reg)  # checked by implicit_als_objective
    tol, worst = _check_tol(tol, worst)
    if is_scipy_sparse(R):
        csr = R.tocsr(copy=True)
        csr.sum_duplicates()
        csr.eliminate_zeros()  # a stored 0 is an entry not observed
        entries = _Entries(csr, None, True)
    else:
        dense = check_matrix(R, "R")
        entries = _Entries(dense, dense > 0, False)
    X, Y = _check_als_factors(left, right, entries.shape)
    lam_rows, lam_cols = _penalties(entries, reg, bool(weighted_reg), entries.row_counts, entries.col_counts)

    def weights(values: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        return alpha * values  # 0 where unobserved

    def targets(values: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        if seen is None:
            return 1.0 + alpha * values
        return np.where(seen, 1.0 + alpha * values, 0.0)

    with np.errstate(over="ignore", invalid="ignore"):
        certified = _certify(entries, weights, targets, X, Y, lam_rows, lam_cols, implicit=True)
    return _als_certificate("implicit-als", entries, X, objective, certified, tol, worst)


# ---------------------------------------------------------------- SVD

# Above this many flops of a full SVD (m · n · min(m, n)), check_svd's
# default is the randomized bound: 4e9 is a 1600 × 1600 matrix, a few
# seconds of LAPACK.
_EXACT_FLOPS = 4e9


@dataclass(frozen=True, repr=False)
class SVDCertificate:
    """The outcome of :func:`check_svd` (see ``docs/factorization.md``, "Certificates").

    Attributes
    ----------
    shape : tuple of int
        ``(m, n)``.
    rank : int
        ``k``, the number of singular triplets given.
    residual_right : float
        ``‖M V − U diag(s)‖_F / ‖s‖₂``.
    residual_left : float
        ``‖Mᵀ U − V diag(s)‖_F / ‖s‖₂``.
    orthogonality_U, orthogonality_V : float
        ``‖UᵀU − I‖_F`` and ``‖VᵀV − I‖_F``.
    descending : bool
        Whether ``s`` is sorted in descending order.
    error : float
        ``‖M − U diag(s) Vᵀ‖_F / ‖M‖_F``.
    optimum : float
        The Eckart–Young optimum ``sqrt(Σ_{j>k} σ_j²) / ‖M‖_F`` (exact), or a
        lower bound on it (estimated).
    eckart_young_gap : float
        ``error − optimum``: exact, or an upper bound that holds with
        probability ``probability``.
    exact : bool
        Whether ``optimum`` comes from ``M``'s full spectrum.
    probability : float
        1 when exact; else ``1 − 10**-probes``, the probability that the
        randomized bound holds.
    tail_bound : float
        Estimated only (else NaN): an upper bound on the largest singular
        value of ``M`` outside the span of the triplets, relative to ``‖M‖_F``.
    tol : float
    """

    shape: tuple[int, int]
    rank: int
    residual_right: float
    residual_left: float
    orthogonality_U: float
    orthogonality_V: float
    descending: bool
    error: float
    optimum: float
    eckart_young_gap: float
    exact: bool
    probability: float
    tail_bound: float
    tol: float

    @property
    def failures(self) -> tuple[str, ...]:
        """The names of the checks that fail, empty when passed."""
        failed = [
            name
            for name in ("residual_right", "residual_left", "orthogonality_U", "orthogonality_V", "eckart_young_gap")
            if not getattr(self, name) <= self.tol
        ]
        if not self.descending:
            failed.append("descending")
        return tuple(failed)

    @property
    def passed(self) -> bool:
        """Residuals, orthogonality and the Eckart–Young gap at most ``tol``, and ``s`` descending."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values; an infinite or NaN number is ``None`` (JSON has neither)."""
        out: dict[str, Any] = {"kind": "svd", "shape": list(self.shape), "rank": self.rank}
        for name in (
            "residual_right", "residual_left", "orthogonality_U", "orthogonality_V", "descending", "error",
            "optimum", "eckart_young_gap", "exact", "probability", "tol", "tail_bound",
        ):  # fmt: skip
            value = getattr(self, name)
            out[name] = None if isinstance(value, float) and not math.isfinite(value) else value
        out["passed"] = self.passed
        out["failures"] = list(self.failures)
        return out

    def format(self) -> str:
        """A readable report: each number, then the verdict naming what fails."""
        m, n = self.shape
        how = "exact" if self.exact else f"upper bound, holds with probability ≥ 1 − {1 - self.probability:.0e}"
        optimum = "optimum" if self.exact else "optimum ≥"
        lines = [
            f"svd certificate: {m}×{n}, rank {self.rank}",
            f"residual  ‖M V − U S‖_F / ‖s‖      {self.residual_right:.3e}",
            f"residual  ‖Mᵀ U − V S‖_F / ‖s‖     {self.residual_left:.3e}",
            f"orthogonality ‖UᵀU − I‖_F          {self.orthogonality_U:.3e}",
            f"orthogonality ‖VᵀV − I‖_F          {self.orthogonality_V:.3e}",
            f"s descending                       {'yes' if self.descending else 'NO'}",
            f"error     ‖M − U S Vᵀ‖_F / ‖M‖_F   {self.error:.6e}   ({optimum} {self.optimum:.6e})",
            f"Eckart–Young gap                   {self.eckart_young_gap:.3e}   ({how})",
        ]
        if not self.exact:
            lines.append(f"largest singular value left out    ≤ {self.tail_bound:.6e} ‖M‖_F")
        if self.passed:
            lines.append(f"verdict   PASSED at tol={self.tol:g}")
        else:
            lines.append(f"verdict   FAILED at tol={self.tol:g}: {', '.join(self.failures)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, rank={self.rank}, residual_right={self.residual_right:.3e}, "
            f"residual_left={self.residual_left:.3e}, eckart_young_gap={self.eckart_young_gap:.3e}, "
            f"exact={self.exact}, passed={self.passed})"
        )


def _matrix_blocks(M: Any, sparse: bool) -> Iterator[tuple[int, int, Any]]:
    """Row blocks ``(start, stop, block)`` of ``M`` in float64: dense arrays, or CSR for sparse ``M``."""
    m, n = M.shape
    if not sparse:
        step = max(1, _BLOCK_ENTRIES // n)
        for start in range(0, m, step):
            stop = min(start + step, m)
            yield start, stop, M[start:stop].astype(np.float64)
        return
    entries = _Entries(M, None, True)
    for start, stop in entries.blocks():
        csr, _, _, values = _sparse_block(entries, start, stop)
        yield start, stop, csr(values)


def _svd_input(M: Any) -> tuple[Any, bool]:
    if is_scipy_sparse(M):
        float_dtype_of(np.asarray(M.data), "M")
        csr = M if M.format == "csr" and M.has_canonical_format else M.tocsr(copy=True)
        if not csr.has_canonical_format:
            csr.sum_duplicates()
        if csr.ndim != 2 or 0 in csr.shape:
            raise ValueError(f"M must be a non-empty 2-D matrix, got shape {csr.shape}")
        _check_sparse_finite(csr, "M")
        return csr, True
    return check_matrix(M, "M"), False


def _check_triplets(U: Any, s: Any, Vt: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    U = check_matrix(U, "U", dtype=np.dtype(np.float64))
    Vt = check_matrix(Vt, "Vt", dtype=np.dtype(np.float64))
    s = as_float_array(s, "s", np.dtype(np.float64))
    m, n = shape
    k = U.shape[1]
    if s.ndim != 1 or U.shape != (m, k) or s.shape != (k,) or Vt.shape != (k, n):
        raise ValueError(
            f"U, s and Vt must have shapes (m, k), (k,) and (k, n) with (m, n) = {shape} the matrix's shape and "
            f"one rank k, got {U.shape}, {s.shape} and {Vt.shape}"
        )
    if k > min(m, n):
        raise ValueError(f"the rank k of U, s and Vt must be in [1, min(m, n)] = [1, {min(m, n)}], got {k}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"s must hold finite non-negative singular values, got min {np.min(s)}")
    return U, s, np.ascontiguousarray(Vt.T)


def check_svd(
    M: Any,
    U: Any,
    s: Any,
    Vt: Any,
    *,
    tol: float = 1e-4,
    exact: bool | None = None,
    probes: int = 10,
    power: int = 10,
    random_state: RandomState = None,
) -> SVDCertificate:
    """Certify a truncated SVD ``M ≈ U diag(s) Vt`` computed anywhere.

    Parameters
    ----------
    M : array_like of shape (m, n), or scipy.sparse matrix
    U : array_like of shape (m, k)
    s : array_like of shape (k,)
    Vt : array_like of shape (k, n)
        Any float dtype; the certificate is computed in float64.
    tol : float >= 0, default 1e-4
        Passed when both residuals, both orthogonality defects and the
        Eckart–Young gap are at most ``tol`` and ``s`` is descending.
    exact : bool, optional
        True: the optimum from ``M``'s full spectrum (``numpy.linalg.svd``;
        dense ``M`` only). False: a randomized bound. None (default): exact
        for dense ``M`` with ``m n min(m, n) <= 4e9``.
    probes : int >= 1, default 10
        Gaussian vectors of the randomized bound: it fails with probability
        at most ``10**-probes``.
    power : int >= 0, default 10
        Power iterations ``q`` of the randomized bound: its slack factor on the
        largest singular value left out is ``(10 sqrt(2/π))**(1/(2q+1))``
        (1.10 for q = 10).
    random_state : None, int or numpy.random.Generator
        Seeds the Gaussian vectors.

    Returns
    -------
    SVDCertificate

    Raises
    ------
    TypeError
        An input of a non-real dtype.
    ValueError
        Shapes that do not match, a rank above ``min(m, n)``, non-finite
        input, negative ``s``, ``exact=True`` with sparse ``M``, or an option
        out of range.
    FloatingPointError
        A norm overflows float64.
    """
    M, sparse = _svd_input(M)
    shape = (int(M.shape[0]), int(M.shape[1]))
    U, s, V = _check_triplets(U, s, Vt, shape)
    tol = check_real(tol, "tol", 0.0)
    probes = check_int(probes, "probes", 1)
    power = check_int(power, "power", 0)
    m, n = shape
    if exact is None:
        exact = not sparse and m * n * min(m, n) <= _EXACT_FLOPS
    exact = check_bool(exact, "exact")
    if exact and sparse:
        raise ValueError("exact must be False or None for a scipy.sparse M (its full spectrum is not computed)")
    rng = check_random_state(random_state)

    with np.errstate(over="ignore", invalid="ignore"):
        MV = np.zeros((m, U.shape[1]))  # (m, k)
        MtU = np.zeros((n, U.shape[1]))  # (n, k)
        norm_sq, error_sq = 0.0, 0.0
        US = U * s  # (m, k)
        for start, stop, block in _matrix_blocks(M, sparse):
            MV[start:stop] = np.asarray(block @ V)
            MtU += np.asarray(block.T @ U[start:stop])
            if sparse:
                norm_sq += float(np.sum(np.square(block.data)))
            else:
                norm_sq += float(np.sum(np.square(block)))
                error_sq += float(np.sum(np.square(block - US[start:stop] @ V.T)))
        s_norm = float(np.linalg.norm(s))
        defect_right, defect_left = float(np.linalg.norm(MV - US)), float(np.linalg.norm(MtU - V * s))
        _finite_result(s_norm, defect_right, defect_left, norm_sq, error_sq)
        residual_right = _ratio(defect_right, s_norm)  # inf when s = 0 and M V is not: a failure, not an error
        residual_left = _ratio(defect_left, s_norm)
        eye = np.eye(U.shape[1])
        orthogonality_U = float(np.linalg.norm(U.T @ U - eye))
        orthogonality_V = float(np.linalg.norm(V.T @ V - eye))
        if sparse:  # ‖M − U S Vᵀ‖² = ‖M‖² − 2 Σ s_k u_kᵀ M v_k + ‖U S Vᵀ‖²: rounding costs sqrt(eps) ‖M‖
            cross = float(np.sum(s * np.einsum("mk,mk->k", U, MV)))
            model = float(np.sum(np.outer(s, s) * (U.T @ U) * (V.T @ V)))
            error_sq = max(norm_sq - 2 * cross + model, 0.0)
        norm = math.sqrt(norm_sq)
        error = _ratio(math.sqrt(error_sq), norm)
        k = U.shape[1]
        if exact:
            sigma = np.linalg.svd(np.asarray(M, dtype=np.float64), compute_uv=False)  # (min(m, n),)
            optimum = _ratio(float(np.linalg.norm(sigma[k:])), norm)
            tail, probability = math.nan, 1.0
            gap = max(error - optimum, 0.0)
        else:
            tail = _ratio(_tail_bound(M, U, V, probes, power, rng), norm)
            probability = 1.0 - _DIXON_ALPHA**-probes
            # If the triplets are exact, M's singular values are s and those of the deflated
            # matrix, whose largest is at most `tail`: a better rank-k choice swaps in at most
            # (tail² − s_j²) for each kept s_j below tail.
            swaps = float(np.sum(np.clip(tail**2 - np.square(s / norm if norm > 0 else s), 0.0, None)))
            optimum = math.sqrt(max(error**2 - swaps, 0.0))
            gap = error - optimum
    _finite_result(orthogonality_U, orthogonality_V, error, optimum)
    return SVDCertificate(
        shape=shape,
        rank=k,
        residual_right=residual_right,
        residual_left=residual_left,
        orthogonality_U=orthogonality_U,
        orthogonality_V=orthogonality_V,
        descending=bool(np.all(np.diff(s) <= 0)),
        error=error,
        optimum=optimum,
        eckart_young_gap=gap,
        exact=exact,
        probability=probability,
        tail_bound=tail,
        tol=tol,
    )


def _ratio(a: float, b: float) -> float:
    """``a / b``, with ``0 / 0 = 0`` and ``a / 0 = inf``."""
    if b > 0:
        return a / b
    return 0.0 if a == 0 else math.inf


def _tail_bound(M: Any, U: np.ndarray, V: np.ndarray, probes: int, power: int, rng: np.random.Generator) -> float:
    """An upper bound on ‖D‖₂, ``D = (I − P_U) M (I − P_V)``, that holds with probability ``1 − 10**-probes``.

    Dixon's bound (Halko, Martinsson and Tropp 2011, Lemma 4.1) applied to
    ``B = (D Dᵀ)^q D``, whose norm is ``‖D‖^(2q+1)``:
    ``‖B‖ <= 10 sqrt(2/π) max_i ‖B ω_i‖`` except with probability ``10**-probes``
    for Gaussian ``ω_i``. Each column is renormalized after every product
    and its log-norm accumulated, so nothing over- or underflows.
    """
    Qu, _ = np.linalg.qr(U)  # (m, k): P_U = Qu Quᵀ, exact also for U not quite orthonormal
    Qv, _ = np.linalg.qr(V)  # (n, k)
    m, n = M.shape
    # A dense M of another dtype is multiplied a row block at a time: M @ X would cast all of M to float64.
    # (A sparse M's product casts only its stored values.)
    whole = not isinstance(M, np.ndarray) or M.dtype == np.float64

    def times(X: np.ndarray) -> np.ndarray:  # M X, (m, p), in float64 a row block at a time
        if whole:
            return np.asarray(M @ X, dtype=np.float64)
        out = np.empty((m, X.shape[1]))
        for start, stop, block in _matrix_blocks(M, False):
            out[start:stop] = block @ X
        return out

    def times_t(Y: np.ndarray) -> np.ndarray:  # Mᵀ Y, (n, p)
        if whole:
            return np.asarray(M.T @ Y, dtype=np.float64)
        out = np.zeros((n, Y.shape[1]))
        for start, stop, block in _matrix_blocks(M, False):
            out += block.T @ Y[start:stop]
        return out

    def apply(X: np.ndarray) -> np.ndarray:  # D X
        X = X - Qv @ (Qv.T @ X)
        Y = times(X)
        return Y - Qu @ (Qu.T @ Y)

    def apply_t(Y: np.ndarray) -> np.ndarray:  # Dᵀ Y
        Y = Y - Qu @ (Qu.T @ Y)
        X = times_t(Y)
        return X - Qv @ (Qv.T @ X)

    X = rng.standard_normal((M.shape[1], probes))  # (n, p)
    logs = np.zeros(probes)

    def step(Z: np.ndarray) -> np.ndarray:
        nonlocal logs
        norms = np.linalg.norm(Z, axis=0)  # (p,)
        with np.errstate(divide="ignore"):
            logs = logs + np.log(norms)
        return Z / np.where(norms > 0, norms, 1.0)

    X = step(apply(X))  # (m, p)
    for _ in range(power):
        X = step(apply(step(apply_t(X))))
    best = float(np.max(logs))
    if best == -math.inf:
        return 0.0
    return math.exp((math.log(_DIXON_ALPHA * math.sqrt(2 / math.pi)) + best) / (2 * power + 1))
