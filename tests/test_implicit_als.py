"""implicit_als: each half-step against a by-hand weighted least squares, the objective by hand, monotone loss,
CG against exact, seeds, sparse and dense input, every error path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_arrays, interactions, legacy_global_state

from lowrank.factor.implicit_als import ImplicitALSResult, implicit_als, implicit_als_objective

sparse = pytest.importorskip("scipy.sparse")


# ---------------------------------------------------------------- references, written out in full


def dense_objective(R, left, right, alpha, reg, weighted_reg=False) -> float:
    """Σ_all c (p − x·y)² + penalty, with every m×n entry formed, in float64 (Hu, Koren, Volinsky 2008)."""
    R, L, Rt = (np.asarray(a, dtype=np.float64) for a in (R, left, right))
    P = (R > 0).astype(np.float64)
    C = 1.0 + alpha * R
    data = float(np.sum(C * (P - L @ Rt) ** 2))
    if weighted_reg:
        n_u, n_i = (R > 0).sum(axis=1), (R > 0).sum(axis=0)
        return data + reg * float(n_u @ np.sum(L**2, axis=1) + n_i @ np.sum(Rt**2, axis=0))
    return data + reg * float(np.sum(L**2) + np.sum(Rt**2))


def solve_rows_by_hand(R, F, alpha, reg, weighted_reg) -> np.ndarray:
    """Row u minimizes ‖C_u^½ (p_u − F x)‖² + λ_u ‖x‖²: lstsq on [C_u^½ F; √λ_u I] x = [C_u^½ p_u; 0], float64.

    ``F`` (l, r) holds the other side's factors, one per column of ``R`` (k, l).
    """
    R, F = np.asarray(R, dtype=np.float64), np.asarray(F, dtype=np.float64)
    k, r = R.shape[0], F.shape[1]
    X = np.zeros((k, r))
    for u in range(k):
        C_u = np.diag(1.0 + alpha * R[u])  # (l, l), the confidence of every entry of row u
        p_u = (R[u] > 0).astype(np.float64)
        lam = reg * np.count_nonzero(R[u]) if weighted_reg else reg
        root = np.sqrt(C_u)
        A = np.vstack([root @ F, np.sqrt(lam) * np.eye(r)])  # (l + r, r)
        b = np.concatenate([root @ p_u, np.zeros(r)])
        X[u] = np.linalg.lstsq(A, b, rcond=None)[0]
    return X


def as_format(R, fmt):
    """Dense R as itself or as a scipy matrix holding its positive entries."""
    if fmt == "dense":
        return R
    i, j = np.nonzero(R)
    coo = sparse.coo_matrix((R[i, j], (i, j)), shape=R.shape)
    return {"coo": coo, "csr": coo.tocsr(), "csc": coo.tocsc(), "csr_array": sparse.csr_array(coo)}[fmt]


def fit_every_sweep(problem, fmt, cg_steps, max_iter):
    """implicit_als on a problem drawn by ``interactions``, R in format ``fmt``, ``tol=0``: all ``max_iter`` sweeps."""
    R, rank, alpha, reg, weighted_reg, seed = problem
    return implicit_als(as_format(R, fmt), rank, alpha=alpha, reg=reg, weighted_reg=weighted_reg,
                        cg_steps=cg_steps, max_iter=max_iter, tol=0.0, random_state=seed)  # fmt: skip


def loss_tol(dtype) -> float:
    return 1e-9 if np.dtype(dtype) == np.float64 else 1e-4


# ---------------------------------------------------------------- each half-step is the exact weighted least squares


@given(interactions(dtypes=st.just(np.float64)), st.sampled_from(["dense", "csr", "coo"]))
def test_each_half_step_solves_every_row_by_hand(problem, fmt):
    R, rank, alpha, reg, weighted_reg, seed = problem
    reg = max(reg, 1e-3)  # without a penalty a rank-deficient row's minimizer is not unique
    kw = dict(alpha=alpha, reg=reg, weighted_reg=weighted_reg, tol=0.0, random_state=seed)
    one = implicit_als(as_format(R, fmt), rank, max_iter=1, **kw)
    two = implicit_als(as_format(R, fmt), rank, max_iter=2, **kw)
    # sweep 2 solves left given sweep 1's right (the same seed replays sweep 1), then right given that left
    want_left = solve_rows_by_hand(R, one.right.T, alpha, reg, weighted_reg)
    np.testing.assert_allclose(two.left, want_left, rtol=1e-7, atol=1e-9)
    want_right = solve_rows_by_hand(R.T, two.left, alpha, reg, weighted_reg)
    np.testing.assert_allclose(two.right.T, want_right, rtol=1e-7, atol=1e-9)


@given(interactions(dtypes=st.just(np.float64)))
def test_without_penalty_the_half_step_is_a_least_squares_minimizer(problem):
    R, rank, alpha, _, _, seed = problem
    fit = implicit_als(R, rank, alpha=alpha, reg=0.0, max_iter=2, tol=0.0, random_state=seed)
    # right is optimal for the final left: the by-hand minimizer (minimum norm) reaches the same objective
    by_hand = solve_rows_by_hand(R.T, fit.left, alpha, 0.0, False).T
    ours = dense_objective(R, fit.left, fit.right, alpha, 0.0)
    best = dense_objective(R, fit.left, by_hand, alpha, 0.0)
    assert ours <= best * (1 + 1e-8) + 1e-10


# ---------------------------------------------------------------- the objective


@given(interactions(), st.sampled_from(["dense", "csr", "csc"]), st.sampled_from([None, 1, 3]))
def test_losses_are_the_objective_at_the_returned_factors(problem, fmt, cg_steps):
    R, _, alpha, reg, weighted_reg, _ = problem
    fit = fit_every_sweep(problem, fmt, cg_steps, max_iter=3)
    want = dense_objective(R, fit.left, fit.right, alpha, reg, weighted_reg)
    assert fit.losses[-1] == pytest.approx(want, rel=loss_tol(R.dtype), abs=1e-9)


@given(interactions(), st.sampled_from(["dense", "csr", "coo"]), float_arrays(np.float64, (2,), bound=2.0))
def test_implicit_als_objective_equals_the_dense_objective(problem, fmt, scale):
    R, rank, alpha, reg, weighted_reg, seed = problem
    rng = np.random.default_rng(seed)
    left = scale[0] * rng.standard_normal((R.shape[0], rank))
    right = scale[1] * rng.standard_normal((rank, R.shape[1])).astype(R.dtype)
    got = implicit_als_objective(as_format(R, fmt), left, right, alpha=alpha, reg=reg, weighted_reg=weighted_reg)
    want = dense_objective(R, left, right, alpha, reg, weighted_reg)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-10)


def test_the_objective_of_a_known_case():
    # R = [[2, 0]], left = [[1]], right = [[0.5, 1]], alpha = 1, reg = 0.1:
    # c = [3, 1], p = [1, 0], scores [0.5, 1]: 3 * 0.25 + 1 * 1 = 1.75; penalty 0.1 * (1 + 1.25) = 0.225
    R = np.array([[2.0, 0.0]])
    got = implicit_als_objective(R, [[1.0]], [[0.5, 1.0]], alpha=1.0, reg=0.1)
    assert got == pytest.approx(1.975, rel=1e-15)
    # Spark's penalty: n_u = 1, n_i = (1, 0): 0.1 * (1 * 1 + 1 * 0.25 + 0 * 1) = 0.125
    got = implicit_als_objective(R, [[1.0]], [[0.5, 1.0]], alpha=1.0, reg=0.1, weighted_reg=True)
    assert got == pytest.approx(1.875, rel=1e-15)


# ---------------------------------------------------------------- monotone, CG, seeds


@given(interactions(), st.sampled_from(["dense", "csr"]), st.sampled_from([None, 1, 2]))
def test_loss_never_increases(problem, fmt, cg_steps):
    # exact half-steps minimize; CG steps from the warm start only ever lower each row's quadratic
    R = problem[0]
    losses = fit_every_sweep(problem, fmt, cg_steps, max_iter=12).losses
    assert losses.dtype == np.float64 and np.all(np.isfinite(losses)) and np.all(losses >= 0)
    slack = loss_tol(R.dtype)
    for t in range(len(losses) - 1):
        assert losses[t + 1] <= losses[t] * (1 + slack) + 1e-12, f"sweep {t + 1}: {losses[t]} -> {losses[t + 1]}"


@given(interactions(dtypes=st.just(np.float64)), st.sampled_from(["dense", "csr"]), st.integers(0, 2))
def test_cg_with_rank_steps_is_the_exact_solve(problem, fmt, extra):
    R, rank, alpha, reg, weighted_reg, seed = problem
    reg = max(reg, 0.1)  # conditioning: CG in r steps is exact up to rounding times cond(A_u)
    kw = dict(alpha=alpha, reg=reg, weighted_reg=weighted_reg, max_iter=2, tol=0.0, random_state=seed)
    exact = implicit_als(as_format(R, fmt), rank, **kw)
    cg = implicit_als(as_format(R, fmt), rank, cg_steps=rank + extra, **kw)
    np.testing.assert_allclose(cg.left, exact.left, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cg.right, exact.right, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cg.losses, exact.losses, rtol=1e-10)


def test_one_cg_step_is_one_steepest_descent_step_from_the_warm_start():
    # With one step, CG is steepest descent on each row's quadratic: x + (rᵀr / rᵀA r) r, r = b − A x.
    rng = np.random.default_rng(3)
    R = np.where(rng.random((5, 4)) < 0.5, rng.random((5, 4)) * 3, 0.0)
    R[0, 0] = 1.0
    alpha, reg = 2.0, 0.1
    left0, right0 = rng.random((5, 2)), rng.random((2, 4))
    fit = implicit_als(R, 2, alpha=alpha, reg=reg, max_iter=1, tol=0.0, cg_steps=1, init=(left0, right0))
    for u in range(5):
        C_u = np.diag(1.0 + alpha * R[u])
        A = right0 @ C_u @ right0.T + reg * np.eye(2)  # (r, r), written from the definition
        b = right0 @ C_u @ (R[u] > 0)
        x = left0[u] if R[u].any() else np.zeros(2)
        res = b - A @ x
        want = x + (res @ res) / (res @ A @ res) * res if res.any() else x
        np.testing.assert_allclose(fit.left[u], want, rtol=1e-12, atol=1e-14)


@given(interactions(), st.sampled_from([None, 2]))
def test_same_seed_gives_the_same_bits_and_leaves_numpys_global_state(problem, cg_steps):
    R, rank, alpha, reg, weighted_reg, seed = problem
    before = legacy_global_state()
    kw = dict(alpha=alpha, reg=reg, weighted_reg=weighted_reg, max_iter=3, cg_steps=cg_steps)
    a = implicit_als(R, rank, random_state=seed, **kw)
    b = implicit_als(R, rank, random_state=np.random.default_rng(seed), **kw)
    assert a.left.tobytes() == b.left.tobytes() and a.right.tobytes() == b.right.tobytes()
    assert a.losses.tobytes() == b.losses.tobytes()
    assert legacy_global_state() == before


@given(interactions(), st.sampled_from(["csr", "coo", "csc", "csr_array"]))
def test_sparse_and_dense_input_agree(problem, fmt):
    R, rank, alpha, reg, weighted_reg, seed = problem
    kw = dict(alpha=alpha, reg=reg, weighted_reg=weighted_reg, max_iter=3, tol=0.0, random_state=seed)
    dense, sp = implicit_als(R, rank, **kw), implicit_als(as_format(R, fmt), rank, **kw)
    tol = 1e-9 if R.dtype == np.float64 else 2e-3
    np.testing.assert_allclose(sp.left, dense.left, rtol=tol, atol=tol)
    np.testing.assert_allclose(sp.right, dense.right, rtol=tol, atol=tol)


# ---------------------------------------------------------------- the result


@given(interactions(), st.sampled_from([np.float32, np.float64, np.int64, np.bool_]))
def test_shapes_dtypes_and_empty_rows_and_columns(problem, input_dtype):
    R, rank, alpha, reg, weighted_reg, seed = problem
    R = (R > 0) if input_dtype is np.bool_ else np.ceil(R).astype(input_dtype)
    fit = implicit_als(R, rank, alpha=alpha, reg=reg, weighted_reg=weighted_reg, max_iter=4, random_state=seed)
    m, n = R.shape
    want = np.dtype(np.float32) if input_dtype is np.float32 else np.dtype(np.float64)
    assert fit.left.shape == (m, rank) and fit.right.shape == (rank, n)
    assert fit.left.dtype == want and fit.right.dtype == want
    assert fit.n_iter == len(fit.losses) <= 4 and isinstance(fit.converged, bool)
    assert fit.left.flags.c_contiguous and fit.right.flags.c_contiguous
    # a row or column with no interaction gets the zero factor, its exact minimizer
    assert not np.any(fit.left[~(R > 0).any(axis=1)])
    assert not np.any(fit.right[:, ~(R > 0).any(axis=0)])
    np.testing.assert_array_equal(fit.to_lowrank().to_dense(), fit.left @ fit.right)
    assert "ImplicitALSResult(shape=" in repr(fit)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.left = None  # type: ignore[misc]


def test_stored_zeros_are_not_observed_and_input_is_not_modified():
    R = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]])
    with_zeros = sparse.csr_matrix(R)
    with_zeros.data = np.append(with_zeros.data, 0.0)  # an explicit 0 stored at (2, 2)
    with_zeros.indices = np.append(with_zeros.indices, 2)
    with_zeros.indptr[-1] += 1
    before = with_zeros.copy()
    a = implicit_als(with_zeros, 2, max_iter=3, random_state=0)
    b = implicit_als(R, 2, max_iter=3, random_state=0)
    np.testing.assert_allclose(a.left, b.left, rtol=1e-12)
    assert (with_zeros != before).nnz == 0 and with_zeros.nnz == before.nnz


def test_converges_and_stops_on_relative_change():
    rng = np.random.default_rng(0)
    R = np.where(rng.random((30, 20)) < 0.3, rng.integers(1, 5, (30, 20)), 0).astype(float)
    fit = implicit_als(R, 3, max_iter=500, tol=1e-4, random_state=0)  # ALS creeps: 1e-6 takes > 500 here
    assert fit.converged and fit.n_iter < 500
    assert abs(fit.losses[-2] - fit.losses[-1]) <= 1e-4 * fit.losses[-2]
    assert all(abs(a - b) > 1e-4 * a for a, b in zip(fit.losses[:-2], fit.losses[1:-1], strict=True))
    assert not implicit_als(R, 3, max_iter=2, tol=0.0, random_state=0).converged


def test_init_pair_resumes_a_run():
    rng = np.random.default_rng(1)
    R = np.where(rng.random((12, 9)) < 0.4, rng.random((12, 9)) * 4, 0.0)
    for cg_steps in (None, 2):
        full = implicit_als(R, 2, max_iter=6, tol=0.0, cg_steps=cg_steps, random_state=5)
        first = implicit_als(R, 2, max_iter=3, tol=0.0, cg_steps=cg_steps, random_state=5)
        rest = implicit_als(R, 2, max_iter=3, tol=0.0, cg_steps=cg_steps, init=(first.left, first.right))
        assert rest.left.tobytes() == full.left.tobytes() and rest.right.tobytes() == full.right.tobytes()
        np.testing.assert_array_equal(np.concatenate([first.losses, rest.losses]), full.losses)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_overflow_is_refused(dtype):
    R = np.array([[np.finfo(dtype).max / 2, 0.0], [0.0, 1.0]], dtype=dtype)
    with pytest.raises(FloatingPointError, match=f"too large for implicit ALS in {np.dtype(dtype)}"):
        implicit_als(R, 1, alpha=1e300, max_iter=2, random_state=0)


# ---------------------------------------------------------------- bad input


GOOD = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])


@pytest.mark.parametrize(
    ("R", "kwargs", "error", "match"),
    [
        (np.array([[1.0, -0.5], [0.0, 1.0]]), {}, ValueError, r"R must be non-negative .*got -0.5 at index \(0, 1\)"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), {}, ValueError, r"R must be finite, got nan at index \(0, 1\)"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), {}, ValueError, "R must be finite, got inf"),
        (np.zeros((2, 3)), {}, ValueError, "R must have at least one positive entry"),
        (np.ones(3), {}, ValueError, "R must be a 2-D matrix"),
        (np.ones((0, 3)), {}, ValueError, "R must be non-empty"),
        (np.array([["a"]]), {}, TypeError, "R must hold real numbers"),
        (np.ones((2, 2), dtype=np.complex128), {}, TypeError, "R must hold real numbers"),
        (GOOD, {"rank": 0}, ValueError, r"rank must be in \[1, min\(m, n\)\] = \[1, 2\], got 0"),
        (GOOD, {"rank": 3}, ValueError, r"rank must be in \[1, min\(m, n\)\] = \[1, 2\], got 3"),
        (GOOD, {"rank": 1.5}, TypeError, "rank must be an integer, got float 1.5"),
        (GOOD, {"alpha": -1.0}, ValueError, r"alpha must be in \[0, inf\), got -1.0"),
        (GOOD, {"alpha": np.nan}, ValueError, "alpha must be in"),
        (GOOD, {"alpha": "1"}, TypeError, "alpha must be a real number"),
        (GOOD, {"reg": -0.1}, ValueError, r"reg must be in \[0, inf\), got -0.1"),
        (GOOD, {"weighted_reg": 1}, TypeError, "weighted_reg must be True or False, got int 1"),
        (GOOD, {"max_iter": 0}, ValueError, r"max_iter must be in \[1, inf\], got 0"),
        (GOOD, {"tol": -1e-6}, ValueError, r"tol must be in \[0, inf\), got -1e-06"),
        (GOOD, {"cg_steps": 0}, ValueError, r"cg_steps must be in \[1, inf\], got 0"),
        (GOOD, {"cg_steps": 2.0}, TypeError, "cg_steps must be an integer, got float 2.0"),
        (GOOD, {"init": "svd"}, ValueError, "init must be 'random' or a \\(left, right\\) pair of arrays, got 'svd'"),
        (GOOD, {"init": (np.ones((2, 1)),)}, ValueError, "init must be .* got a tuple of 1"),
        (GOOD, {"init": 3}, TypeError, "init must be .* got int"),
        (
            GOOD,
            {"init": (np.ones((2, 2)), np.ones((1, 3)))},
            ValueError,
            r"left and right must have shapes \(m, r\) = \(2, 1\)",
        ),
        (GOOD, {"init": (np.full((2, 1), np.nan), np.ones((1, 3)))}, ValueError, "left must be finite"),
        (GOOD, {"random_state": "seed"}, TypeError, "random_state must be None, an int or a numpy.random.Generator"),
    ],
)
def test_bad_input_is_refused_with_a_named_error(R, kwargs, error, match):
    kwargs = {"rank": 1, **kwargs}
    rank = kwargs.pop("rank")
    with pytest.raises(error, match=match):
        implicit_als(R, rank, **kwargs)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([1.0, -2.0], r"R must be non-negative .*got -2.0 among its stored entries \(1 negative entries\)"),
        ([1.0, np.nan], r"R must be finite, got nan at index \(1, 1\) \(1 non-finite entries\)"),
        ([0.0, 0.0], "R must have at least one positive entry"),
    ],
)
def test_bad_sparse_input_is_refused(values, match):
    R = sparse.csr_matrix((values, ([0, 1], [0, 1])), shape=(2, 2))
    with pytest.raises(ValueError, match=match):
        implicit_als(R, 1)


def test_objective_refuses_factors_of_the_wrong_shape():
    with pytest.raises(
        ValueError, match=r"left and right must have shapes \(m, r\) = \(2, 2\) and \(r, n\) = \(2, 3\)"
    ):
        implicit_als_objective(GOOD, np.ones((2, 2)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="right must be finite"):
        implicit_als_objective(GOOD, np.ones((2, 1)), np.full((1, 3), np.inf))
    with pytest.raises(ValueError, match="alpha must be in"):
        implicit_als_objective(GOOD, np.ones((2, 1)), np.ones((1, 3)), alpha=-1.0)


def test_result_type_is_exported_from_the_module():
    assert ImplicitALSResult.__module__ == "lowrank.factor.implicit_als"
