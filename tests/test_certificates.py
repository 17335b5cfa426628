"""Certificates: stationarity and gains against by-hand dense gradients, exact factors pass, perturbed ones
are flagged, every error path, and ``lowrank verify`` (exit codes, --json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import als_problems, float_arrays, interactions, matrices_and_ranks, with_spectrum

import lowrank
from lowrank.cli import main
from lowrank.factor.certificates import (
    STATIONARITY_FLOOR,
    check_als,
    check_implicit_als,
    check_svd,
    factors_from_id_tables,
)

sparse = pytest.importorskip("scipy.sparse")


# ---------------------------------------------------------------- references, written out in full


def explicit_terms(M, mask, L, R, reg, weighted_reg):
    """Per row and column: the objective's half-gradient terms A x and b, from dense products of every entry.

    f = Σ mask (M − L R)² + Σ λ_u ‖l_u‖² + Σ λ_j ‖r_j‖²;  ½ ∂f/∂l_u = [(mask ⊙ L R) Rᵀ]_u + λ_u l_u − [(mask ⊙ M) Rᵀ]_u.
    """
    W = mask.astype(np.float64)
    M0 = np.where(mask, M, 0).astype(np.float64)
    lam_u = reg * W.sum(axis=1) if weighted_reg else np.full(M.shape[0], reg)
    lam_j = reg * W.sum(axis=0) if weighted_reg else np.full(M.shape[1], reg)
    fit = W * (L @ R)  # (m, n)
    rows = (fit @ R.T + lam_u[:, None] * L, M0 @ R.T)  # (m, r) each
    cols = (fit.T @ L + lam_j[:, None] * R.T, M0.T @ L)  # (n, r) each
    return rows, cols, lam_u, lam_j


def implicit_terms(Rm, L, R, alpha, reg, weighted_reg):
    """The same for Σ_all c (p − L R)² + penalties, c = 1 + α r, p = 1[r > 0]."""
    Rm = Rm.astype(np.float64)
    C, P = 1 + alpha * Rm, (Rm > 0).astype(np.float64)
    n_u, n_i = P.sum(axis=1), P.sum(axis=0)
    lam_u = reg * n_u if weighted_reg else np.full(Rm.shape[0], reg)
    lam_j = reg * n_i if weighted_reg else np.full(Rm.shape[1], reg)
    fit = C * (L @ R)
    rows = (fit @ R.T + lam_u[:, None] * L, (C * P) @ R.T)
    cols = (fit.T @ L + lam_j[:, None] * R.T, (C * P).T @ L)
    return rows, cols, lam_u, lam_j


def relative_gradients(rows, cols):
    """‖Ax − b‖ / max(‖Ax‖ + ‖b‖, sqrt(eps) · largest such sum), per row and per column (the documented rule)."""
    scale = [np.linalg.norm(Ax, axis=1) + np.linalg.norm(b, axis=1) for Ax, b in (rows, cols)]
    largest = max(s.max() for s in scale)
    out = []
    for (Ax, b), s in zip((rows, cols), scale, strict=True):
        d = np.maximum(s, np.sqrt(np.finfo(np.float64).eps) * largest)
        out.append(np.linalg.norm(Ax - b, axis=1) / np.where(d > 0, d, 1))
    return out


def explicit_objective(M, mask, L, R, lam_u, lam_j):
    resid = np.where(mask, M - L @ R, 0)
    return float(np.sum(resid**2) + lam_u @ np.sum(L**2, axis=1) + lam_j @ np.sum(R**2, axis=0))


def implicit_objective(Rm, L, R, alpha, lam_u, lam_j):
    C, P = 1 + alpha * Rm, (Rm > 0)
    return float(np.sum(C * (P - L @ R) ** 2) + lam_u @ np.sum(L**2, axis=1) + lam_j @ np.sum(R**2, axis=0))


def best_rows(W, T, Q, L, R, lam_u):
    """Each row's exact minimizer with R fixed, row by row with a pseudo-inverse: A_u = R diag(w_u) Rᵀ + Q + λ_u I."""
    out = np.empty_like(L)
    for u in range(L.shape[0]):
        A = (R * W[u]) @ R.T + Q + lam_u[u] * np.eye(R.shape[0])
        out[u] = np.linalg.pinv(A) @ (R @ T[u])
    return out


# ---------------------------------------------------------------- explicit ALS by hand


@given(als_problems(max_side=7), st.data())
def test_als_stationarity_and_gains_match_dense_gradients_by_hand(problem, data):
    M, mask, rank, reg, weighted_reg, _ = problem
    m, n = M.shape
    L = data.draw(float_arrays(np.float64, (m, rank), bound=2.0))
    R = data.draw(float_arrays(np.float64, (rank, n), bound=2.0))
    rep = check_als(M, L, R, mask=mask, reg=reg, weighted_reg=weighted_reg)
    rows, cols, lam_u, lam_j = explicit_terms(M.astype(np.float64), mask, L, R, reg, weighted_reg)
    eta_rows, eta_cols = relative_gradients(rows, cols)
    np.testing.assert_allclose(rep.row_stationarity, eta_rows, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(rep.col_stationarity, eta_cols, rtol=1e-7, atol=1e-12)

    Mf = np.where(mask, M, 0).astype(np.float64)
    f = explicit_objective(Mf, mask, L, R, lam_u, lam_j)
    assert rep.objective == pytest.approx(f, rel=1e-10, abs=1e-10)
    # the row gain is what solving every row exactly would take off the objective
    W = mask.astype(np.float64)
    zero = np.zeros((rank, rank))
    L_best = best_rows(W, Mf, zero, L, R, lam_u)
    R_best = best_rows(W.T, Mf.T, zero, R.T, L.T, lam_j).T
    scale = max(f, 1e-300)
    assert rep.row_gain * f == pytest.approx(f - explicit_objective(Mf, mask, L_best, R, lam_u, lam_j),
                                             rel=1e-6, abs=1e-9 * scale)  # fmt: skip
    assert rep.col_gain * f == pytest.approx(f - explicit_objective(Mf, mask, L, R_best, lam_u, lam_j),
                                             rel=1e-6, abs=1e-9 * scale)  # fmt: skip


def test_the_half_gradient_is_half_the_objectives_gradient_by_central_differences():
    rng = np.random.default_rng(0)
    M, mask = rng.standard_normal((5, 4)), rng.random((5, 4)) < 0.7
    L, R = rng.standard_normal((5, 2)), rng.standard_normal((2, 4))
    (Ax, b), _, lam_u, lam_j = explicit_terms(M, mask, L, R, 0.3, True)
    h, numeric = 1e-6, np.empty_like(L)
    for idx in np.ndindex(L.shape):
        E = np.zeros_like(L)
        E[idx] = h
        numeric[idx] = (explicit_objective(M, mask, L + E, R, lam_u, lam_j)
                        - explicit_objective(M, mask, L - E, R, lam_u, lam_j)) / (2 * h)  # fmt: skip
    np.testing.assert_allclose(2 * (Ax - b), numeric, rtol=1e-6, atol=1e-7)


@given(interactions(max_side=7), st.data())
def test_implicit_stationarity_and_gains_match_dense_gradients_by_hand(problem, data):
    Rm, rank, alpha, reg, weighted_reg, _ = problem
    m, n = Rm.shape
    L = data.draw(float_arrays(np.float64, (m, rank), bound=2.0))
    R = data.draw(float_arrays(np.float64, (rank, n), bound=2.0))
    rep = check_implicit_als(Rm, L, R, alpha=alpha, reg=reg, weighted_reg=weighted_reg)
    rows, cols, lam_u, lam_j = implicit_terms(Rm, L, R, alpha, reg, weighted_reg)
    eta_rows, eta_cols = relative_gradients(rows, cols)
    np.testing.assert_allclose(rep.row_stationarity, eta_rows, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(rep.col_stationarity, eta_cols, rtol=1e-7, atol=1e-12)
    R64 = Rm.astype(np.float64)
    f = implicit_objective(R64, L, R, alpha, lam_u, lam_j)
    assert rep.objective == pytest.approx(f, rel=1e-10)
    C = 1 + alpha * R64
    CP = C * (R64 > 0)
    W = C - 1  # the part beyond Q = RRᵀ (resp. LᵀL) that only observed entries touch
    L_best = best_rows(W, CP, R @ R.T, L, R, lam_u)
    R_best = best_rows(W.T, CP.T, L.T @ L, R.T, L.T, lam_j).T
    assert rep.row_gain * f == pytest.approx(f - implicit_objective(R64, L_best, R, alpha, lam_u, lam_j),
                                             rel=1e-6, abs=1e-9 * f)  # fmt: skip
    assert rep.col_gain * f == pytest.approx(f - implicit_objective(R64, L, R_best, alpha, lam_u, lam_j),
                                             rel=1e-6, abs=1e-9 * f)  # fmt: skip


def test_sparse_and_dense_input_give_the_same_certificate():
    rng = np.random.default_rng(1)
    mask = rng.random((9, 7)) < 0.5
    M = np.where(mask, rng.standard_normal((9, 7)), 0)
    L, R = rng.standard_normal((9, 2)), rng.standard_normal((2, 7))
    dense = check_als(M, L, R, mask=mask, reg=0.1)
    for fmt in ("csr", "csc", "coo"):
        sp = sparse.csr_matrix(M).asformat(fmt)  # the stored entries are exactly the masked ones
        assert sp.nnz == mask.sum()
        rep = check_als(sp, L, R, reg=0.1)
        np.testing.assert_allclose(rep.row_stationarity, dense.row_stationarity, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(rep.col_stationarity, dense.col_stationarity, rtol=1e-12, atol=1e-15)
        assert rep.objective == pytest.approx(dense.objective, rel=1e-12)


# ---------------------------------------------------------------- exact factors pass, perturbed ones fail


@given(matrices_and_ranks(max_side=8), st.sampled_from([0.0, 0.01, 0.5]))
def test_als_certificate_of_a_stationary_point_from_numpys_svd_passes(problem, reg):
    # fully observed: left = U sqrt((s − reg)₊), right = sqrt((s − reg)₊) Vᵀ zeroes the gradient
    # (the residual M − left right is U (s − d) Vᵀ, and (s − d) sqrt(d) = reg sqrt(d))
    M, rank = problem
    U, s, Vt = np.linalg.svd(M.astype(np.float64), full_matrices=False)
    root = np.sqrt(np.maximum(s[:rank] - reg, 0))
    rep = check_als(M, U[:, :rank] * root, root[:, None] * Vt[:rank], reg=reg, tol=1e-6)
    assert rep.passed, rep.format()


@given(matrices_and_ranks(max_side=8))
def test_svd_certificate_of_numpys_svd_passes(problem):
    M, rank = problem
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    rep = check_svd(M, U[:, :rank], s[:rank], Vt[:rank], random_state=0)
    assert rep.exact and rep.passed, rep.format()


def planted_problem():
    rng = np.random.default_rng(3)
    M = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 15)) + 0.1 * rng.standard_normal((20, 15))
    return M, rng.random(M.shape) < 0.6


def test_als_run_to_convergence_passes_and_perturbed_by_one_percent_fails():
    M, mask = planted_problem()
    fit = lowrank.als(M, 3, mask=mask, reg=0.1, max_iter=3000, tol=1e-15, init="svd")
    rep = check_als(M, fit.left, fit.right, mask=mask, reg=0.1)
    assert rep.passed, rep.format()
    assert rep.objective == pytest.approx(fit.losses[-1], rel=1e-10)
    assert rep.rows.max < 1e-6 and rep.cols.max < 1e-12  # right was solved last: exact to rounding
    rng = np.random.default_rng(0)
    bad = check_als(M, fit.left * (1 + 0.01 * rng.standard_normal(fit.left.shape)), fit.right, mask=mask, reg=0.1)
    assert not bad.passed and "left" in bad.not_converged
    assert "FAILED" in bad.format() and "left factor is not converged" in bad.format()


def test_the_certificate_names_the_unconverged_side_and_its_worst_rows():
    M, mask = planted_problem()
    fit = lowrank.als(M, 3, mask=mask, reg=0.1, max_iter=3000, tol=1e-15, init="svd")
    right = fit.right.copy()
    right[:, 4] *= 1.05  # one column off
    rep = check_als(M, fit.left, right, mask=mask, reg=0.1)
    assert rep.not_converged == ("left", "right") or rep.not_converged == ("right",)
    assert rep.cols.worst[0][0] == 4 and rep.cols.worst[0][1] > 1e-3
    assert int(np.argmax(rep.col_stationarity)) == 4
    assert "worst columns 4" in rep.format()


def test_implicit_als_run_to_convergence_passes_and_perturbed_fails():
    rng = np.random.default_rng(4)
    Rm = np.where(rng.random((15, 12)) < 0.3, rng.integers(1, 5, (15, 12)), 0).astype(np.float64)
    fit = lowrank.implicit_als(Rm, 2, alpha=2.0, reg=0.5, max_iter=3000, tol=1e-15, random_state=0)
    rep = check_implicit_als(sparse.csr_matrix(Rm), fit.left, fit.right, alpha=2.0, reg=0.5)
    assert rep.passed, rep.format()
    assert rep.objective == pytest.approx(fit.losses[-1], rel=1e-10)
    bad = check_implicit_als(Rm, fit.left, fit.right * 1.01, alpha=2.0, reg=0.5)
    assert not bad.passed and "right" in bad.not_converged


def decaying(m=40, n=30, seed=0):
    return with_spectrum(m, n, 2.0 ** -np.arange(min(m, n)), seed)


@pytest.mark.parametrize("exact", [True, False])
def test_svd_flags_a_perturbed_a_swapped_and_a_missing_triplet(exact):
    M = decaying()
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    k = 5
    good = check_svd(M, U[:, :k], s[:k], Vt[:k], exact=exact, random_state=0)
    assert good.passed, good.format()
    assert good.exact == exact and (good.probability == 1.0) == exact
    perturbed = check_svd(M, U[:, :k] * 1.01, s[:k], Vt[:k], exact=exact, random_state=0)
    assert "residual_right" in perturbed.failures and "orthogonality_U" in perturbed.failures
    swapped = U[:, :k].copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    assert "residual_right" in check_svd(M, swapped, s[:k], Vt[:k], exact=exact, random_state=0).failures
    # a truncated rank done wrong: triplets 0, 1, 2, 3, 5 (exact ones) miss the optimum by s_4² − s_5²
    idx = [0, 1, 2, 3, 5]
    missing = check_svd(M, U[:, idx], s[idx], Vt[idx], exact=exact, random_state=0)
    assert missing.failures == ("eckart_young_gap",), missing.format()
    norm = np.linalg.norm(M)
    error = np.sqrt(np.sum(s**2) - np.sum(s[idx] ** 2)) / norm
    optimum = np.sqrt(np.sum(s[k:] ** 2)) / norm
    assert missing.error == pytest.approx(error, rel=1e-9)
    if exact:
        assert missing.eckart_young_gap == pytest.approx(error - optimum, rel=1e-9)
    else:  # an upper bound on the gap
        assert missing.eckart_young_gap >= error - optimum - 1e-12


def test_svd_flags_singular_values_out_of_order_and_a_zeroed_triplet():
    M = decaying()
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    order = [1, 0, 2]
    assert "descending" in check_svd(M, U[:, order], s[order], Vt[order]).failures
    s0 = s[:3].copy()
    s0[2] = 0.0  # a rank truncated to 2 reported as rank 3
    assert "residual_right" in check_svd(M, U[:, :3], s0, Vt[:3]).failures


def test_zero_singular_values_for_a_nonzero_matrix_fail_rather_than_raise():
    M = decaying()
    U, _, Vt = np.linalg.svd(M, full_matrices=False)
    rep = check_svd(M, U[:, :2], np.zeros(2), Vt[:2])
    assert rep.residual_right == np.inf and not rep.passed and "inf" in rep.format()


def test_svd_of_a_sparse_matrix_uses_the_randomized_bound():
    M = decaying(50, 40, seed=2)
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    rep = check_svd(sparse.csr_matrix(M), U[:, :4], s[:4], Vt[:4], random_state=1)
    assert not rep.exact and rep.passed, rep.format()
    assert rep.tail_bound >= s[4] / np.linalg.norm(M)  # holds with probability 1 − 1e-10
    assert rep.tail_bound <= 1.2 * s[4] / np.linalg.norm(M)  # slack (10 sqrt(2/π))^(1/21) = 1.10
    with pytest.raises(ValueError, match="exact must be False or None"):
        check_svd(sparse.csr_matrix(M), U[:, :4], s[:4], Vt[:4], exact=True)


def test_the_zero_matrix_is_certified_by_zero_factors():
    M = np.zeros((4, 3))
    assert check_svd(M, np.eye(4, 2), np.zeros(2), np.eye(2, 3)).passed
    assert check_als(M, np.zeros((4, 2)), np.zeros((2, 3))).passed


# ---------------------------------------------------------------- id tables


def test_id_tables_scatter_vectors_to_their_rows_and_zeros_elsewhere():
    left, right = factors_from_id_tables([2, 0], [[1.0, 2.0], [3.0, 4.0]], [1], np.array([[5.0, 6.0]]), (3, 2))
    np.testing.assert_array_equal(left, [[3, 4], [0, 0], [1, 2]])
    np.testing.assert_array_equal(right, [[0, 5], [0, 6]])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (([0, 3], np.ones((2, 2)), [0], np.ones((1, 2))), ValueError, r"row_ids must be in \[0, 3\).*got 3"),
        (([-1, 0], np.ones((2, 2)), [0], np.ones((1, 2))), ValueError, r"row_ids must be in \[0, 3\)"),
        (([0, 1], np.ones((2, 2)), [2], np.ones((1, 2))), ValueError, r"col_ids must be in \[0, 2\)"),
        (([1, 1], np.ones((2, 2)), [0], np.ones((1, 2))), ValueError, "must be distinct, got 1 repeated"),
        (([0.0, 1.0], np.ones((2, 2)), [0], np.ones((1, 2))), TypeError, "row_ids must hold integers"),
        (([0, 1], np.ones((3, 2)), [0], np.ones((1, 2))), ValueError, "one id per row"),
        (([0, 1], np.ones((2, 2)), [0], np.ones((1, 3))), ValueError, "one rank"),
        (([0, 1], np.full((2, 2), np.nan), [0], np.ones((1, 2))), ValueError, "row_vectors must be finite"),
    ],
)
def test_bad_id_tables_are_named_errors(args, error, match):
    with pytest.raises(error, match=match):
        factors_from_id_tables(*args, (3, 2))


# ---------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_named_errors():
    rng = np.random.default_rng(0)
    M, L, R = rng.standard_normal((4, 3)), rng.standard_normal((4, 2)), rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match=r"left and right must have shapes"):
        check_als(M, L[:3], R)
    with pytest.raises(ValueError, match=r"left and right must have shapes .* one rank"):
        check_als(M, L, R[:1])
    with pytest.raises(ValueError, match=r"left must be finite, got nan"):
        check_als(M, np.where(L > 0, np.nan, L), R)
    bad = M.copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"M must be finite, got inf at index \(1, 2\)"):
        check_als(bad, L, R)
    with pytest.raises(ValueError, match=r"M must be finite at observed entries, got inf at index \(1, 2\)"):
        check_als(sparse.csr_matrix(bad), L, R)
    mask = np.ones(M.shape, bool)
    mask[1, 2] = False
    assert check_als(bad, L, R, mask=mask).objective > 0  # an unobserved inf is never read
    with pytest.raises(ValueError, match="mask must be None"):
        check_als(sparse.csr_matrix(M), L, R, mask=mask)
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        check_als(M, L, R, mask=mask.astype(int))
    with pytest.raises(ValueError, match=r"reg must be in \[0, inf\)"):
        check_als(M, L, R, reg=-1.0)
    with pytest.raises(ValueError, match=r"tol must be in"):
        check_als(M, L, R, tol=-1.0)
    with pytest.raises(TypeError, match="M must hold real numbers"):
        check_als(M.astype(complex), L, R)
    with pytest.raises(ValueError, match="R must be non-negative"):
        check_implicit_als(-np.abs(M), L, R)
    with pytest.raises(ValueError, match="R must be non-negative"):
        check_implicit_als(sparse.csr_matrix(-np.abs(M)), L, R)
    with pytest.raises(ValueError, match="left and right must have shapes"):
        check_implicit_als(np.abs(M), L, R.T)
    with pytest.raises(ValueError, match="R must be finite"):
        check_implicit_als(np.where(M > 0, np.nan, 1.0), L, R)
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    with pytest.raises(ValueError, match=r"U, s and Vt must have shapes"):
        check_svd(M, U[:, :2], s, Vt)
    with pytest.raises(ValueError, match=r"U, s and Vt must have shapes"):
        check_svd(M.T, U, s, Vt)
    with pytest.raises(ValueError, match="finite non-negative singular values"):
        check_svd(M, U, -s, Vt)
    with pytest.raises(ValueError, match="Vt must be finite"):
        check_svd(M, U, s, Vt * np.nan)
    with pytest.raises(ValueError, match=r"probes must be in \[1, inf\]"):
        check_svd(M, U, s, Vt, probes=0)


# ---------------------------------------------------------------- the command line


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("verify")
    M, mask = planted_problem()
    Ms = np.where(mask, M, 0)
    sparse.save_npz(tmp_path / "M.npz", sparse.csr_matrix(Ms))  # compressed, scipy's default
    np.save(tmp_path / "dense.npy", M)
    np.save(tmp_path / "mask.npy", mask)
    np.save(tmp_path / "wide.npy", M.T)
    fit = lowrank.als(sparse.csr_matrix(Ms), 3, reg=0.1, max_iter=3000, tol=1e-15, random_state=0)
    np.savez(tmp_path / "als.npz", left=fit.left, right=fit.right)
    np.savez(tmp_path / "off.npz", left=fit.left * 1.01, right=fit.right)
    ids = np.arange(M.shape[0])[::-1].copy()
    np.savez(tmp_path / "spark.npz", user_ids=ids, user_factors=fit.left[ids].astype(np.float32),
             item_ids=np.arange(M.shape[1]), item_factors=fit.right.T.astype(np.float32))  # fmt: skip
    np.savez(tmp_path / "oob.npz", user_ids=ids + 1, user_factors=fit.left[ids],
             item_ids=np.arange(M.shape[1]), item_factors=fit.right.T)  # fmt: skip
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    np.savez(tmp_path / "svd.npz", U=U[:, :4], s=s[:4], Vt=Vt[:4])
    np.savez(tmp_path / "swapped.npz", U=U[:, [1, 0, 2, 3]], s=s[:4], Vt=Vt[:4])
    return tmp_path


def test_verify_exit_codes_and_reports(files, capsys):
    code, out, _ = run(["verify", "als", str(files / "M.npz"), str(files / "als.npz"), "--reg", "0.1"], capsys)
    assert code == 0 and "PASSED" in out
    code, out, _ = run(["verify", "als", str(files / "M.npz"), str(files / "spark.npz"), "--reg", "0.1"], capsys)
    assert code == 0 and "PASSED" in out  # float32 id tables, rows in another order
    code, out, _ = run(["verify", "als", str(files / "M.npz"), str(files / "off.npz"), "--reg", "0.1"], capsys)
    assert code == 1 and "left factor is not converged" in out
    code, out, _ = run(["verify", "als", str(files / "dense.npy"), str(files / "als.npz"), "--reg", "0.1",
                        "--mask", str(files / "mask.npy")], capsys)  # fmt: skip
    assert code == 0
    code, out, _ = run(["verify", "svd", str(files / "dense.npy"), str(files / "svd.npz")], capsys)
    assert code == 0 and "exact" in out
    code, out, _ = run(["verify", "svd", str(files / "dense.npy"), str(files / "swapped.npz"), "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["passed"] is False and "residual_right" in report["failures"]
    code, out, _ = run(["verify", "implicit-als", str(files / "M.npz"), str(files / "als.npz"), "--json",
                        "--tol", "1e9"], capsys)  # fmt: skip
    assert code == 2  # M holds negative entries: not interactions
    code, out, _ = run(["verify", "als", str(files / "M.npz"), str(files / "als.npz"), "--json", "--reg", "0.1"],
                       capsys)  # fmt: skip
    report = json.loads(out)
    assert code == 0 and report["kind"] == "als" and report["row_stationarity"]["max"] < 1e-4
    assert set(report["row_stationarity"]) == {"max", "quantiles", "worst", "above_tol"}


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["als", "M.npz", "oob.npz"], r"row_ids must be in \[0, 20\)"),
        (["als", "M.npz", "svd.npz"], "must hold left and right, or id tables"),
        (["svd", "dense.npy", "als.npz"], "must hold U, s, Vt"),
        (["svd", "missing.npy", "svd.npz"], "no such file"),
        (["svd", "wide.npy", "svd.npz"], r"U, s and Vt must have shapes \(m, k\), \(k,\) and \(k, n\)"),
        (["svd", "M.npz", "svd.npz", "--exact", "yes"], "exact must be False or None"),
    ],
)
def test_verify_that_cannot_run_prints_one_line_and_exits_2(files, capsys, argv, match):
    code, out, err = run(["verify", argv[0], *(str(files / a) for a in argv[1:3]), *argv[3:]], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lowrank: error: verify ")
    assert __import__("re").search(match, err), err


def test_verify_help_names_the_exit_codes(capsys):
    code, out, _ = run(["verify", "--help"], capsys)
    assert code == 0 and "0 the certificate passed, 1 it failed, 2 it could not run" in " ".join(out.split())
    assert STATIONARITY_FLOOR == pytest.approx(1.49e-8, rel=1e-2)



def test_verify_json_of_an_infinite_residual_is_well_formed_json(files, capsys, tmp_path):
    M = np.load(files / "dense.npy")
    U, _, Vt = np.linalg.svd(M, full_matrices=False)
    np.savez(tmp_path / "zero_s.npz", U=U[:, :2], s=np.zeros(2), Vt=Vt[:2])  # residuals ‖M V‖ / 0 = inf
    code, out, _ = run(["verify", "svd", str(files / "dense.npy"), str(tmp_path / "zero_s.npz"), "--json"], capsys)

    def refuse(constant):  # RFC 8259 has no Infinity or NaN; Python's json accepts them unless told not to
        raise ValueError(f"not JSON: {constant}")

    report = json.loads(out, parse_constant=refuse)
    assert code == 1 and report["residual_right"] is None and "residual_right" in report["failures"]


def test_the_randomized_svd_bound_streams_a_float32_matrix_in_row_blocks(monkeypatch):
    """The tail bound's products with a dense float32 M must not cast all of M to float64 at once."""
    import tracemalloc

    monkeypatch.setattr("lowrank.factor.certificates._BLOCK_ENTRIES", 1 << 12)  # blocks of 32 KiB in float64
    M = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)  # 1 MiB in float64
    U, s, Vt = np.linalg.svd(M.astype(np.float64), full_matrices=False)
    sigma = s.copy()
    U, s, Vt = U[:, :4].copy(), s[:4].copy(), Vt[:4].copy()
    tracemalloc.start()
    try:
        rep = check_svd(M, U, s, Vt, exact=False, power=1, random_state=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * M.size * 8, peak  # a few float64 blocks and (m, k) arrays, not M in float64
    assert rep.tail_bound >= sigma[4] / np.linalg.norm(sigma)  # still a bound (probability 1 − 1e-10)
