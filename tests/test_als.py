"""als: monotone loss, Eckart–Young optimum, matrix completion, empty rows, seeds, sparse input, objectives."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    SEEDS,
    als_problems,
    expected_float_dtype,
    gapped_problems,
    legacy_global_state,
    matrices,
    planted,
    random_mask,
)

import lowrank
from lowrank import als

sparse = pytest.importorskip("scipy.sparse")


def objective(M, mask, left, right, reg=0.0, weighted_reg=False) -> float:
    """The objective the als docstring states, recomputed in float64 from the factors."""
    L, R = left.astype(np.float64), right.astype(np.float64)
    resid = np.where(mask, M.astype(np.float64), 0.0) - np.where(mask, L @ R, 0.0)  # (m, n)
    data = float(np.sum(resid**2))
    if weighted_reg:
        n_i, n_j = mask.sum(axis=1), mask.sum(axis=0)  # (m,), (n,)
        return data + reg * float(n_i @ np.sum(L**2, axis=1) + n_j @ np.sum(R**2, axis=0))
    return data + reg * float(np.sum(L**2) + np.sum(R**2))


def loss_tol(dtype) -> float:
    """Relative slack on loss comparisons: rounding of the half-step solves in the factors' dtype."""
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-4


def to_sparse(M, mask, fmt):
    i, j = np.nonzero(mask)
    coo = sparse.coo_matrix((M[i, j], (i, j)), shape=M.shape)
    return {
        "coo": coo,
        "csr": coo.tocsr(),
        "csc": coo.tocsc(),
        "csr_array": sparse.csr_array(coo),
        "bsr": coo.tobsr(blocksize=(1, 1)),  # 1×1 blocks: a larger block would store unobserved zeros
        "dok": coo.todok(),
        "lil": coo.tolil(),
        "dok_array": sparse.dok_array(coo),
        "lil_array": sparse.lil_array(coo),
    }[fmt]


# ---------------------------------------------------------------- the loss never increases


@given(problem=als_problems(), init=st.sampled_from(["auto", "random", "svd"]))
def test_loss_never_increases(problem, init):
    M, mask, rank, reg, weighted_reg, seed = problem
    fit = als(
        M, rank, mask=mask, reg=reg, weighted_reg=weighted_reg, init=init,
        max_iter=30, tol=0.0, random_state=seed,
    )
    losses = fit.losses
    assert losses.dtype == np.float64 and losses.ndim == 1
    assert np.all(np.isfinite(losses)) and np.all(losses >= 0)
    # Near an exact fit the loss sits on the solver's rounding floor: the normal
    # equations square the condition number, so in float32 the loss of an exact
    # fit wanders around eps * ||M_obs||^2 rather than decreasing to 0.
    observed = (M if mask is None else np.where(mask, M, 0)).astype(np.float64)
    floor = float(np.finfo(M.dtype).eps) * float(np.sum(observed**2))
    tiny = max(1e-12 * max(losses[0], 1.0), floor if M.dtype == np.float32 else 0.0)
    slack = loss_tol(M.dtype)
    for k in range(len(losses) - 1):
        assert losses[k + 1] <= losses[k] * (1 + slack) + tiny, f"sweep {k + 1}: {losses[k]} -> {losses[k + 1]}"
    # losses[-1] is the objective at the returned factors
    want = objective(M, mask, fit.left, fit.right, reg, weighted_reg)
    assert losses[-1] == pytest.approx(want, rel=10 * slack, abs=tiny)


@given(problem=als_problems())
def test_result_shapes_dtypes_and_the_iteration_count(problem):
    M, mask, rank, reg, weighted_reg, seed = problem
    fit = als(M, rank, mask=mask, reg=reg, weighted_reg=weighted_reg, max_iter=7, random_state=seed)
    m, n = M.shape
    assert fit.left.shape == (m, rank) and fit.right.shape == (rank, n)
    assert fit.left.dtype == M.dtype and fit.right.dtype == M.dtype
    assert fit.n_iter == len(fit.losses)
    assert 1 <= fit.n_iter <= 7


# ---------------------------------------------------------------- converged and n_iter


@given(
    problem=als_problems(),
    tol=st.sampled_from([0.0, 1e-12, 1e-6, 1e-3, 0.1]),
    max_iter=st.integers(1, 40),
)
def test_converged_and_n_iter_agree_with_the_losses(problem, tol, max_iter):
    M, mask, rank, reg, weighted_reg, seed = problem
    fit = als(
        M, rank, mask=mask, reg=reg, weighted_reg=weighted_reg, tol=tol,
        max_iter=max_iter, random_state=seed,
    )
    losses = fit.losses
    assert fit.n_iter == len(losses) <= max_iter
    assert isinstance(fit.converged, (bool, np.bool_))

    # the stopping rule the docstring states: the relative change falls to tol, or the loss
    # reaches rounding noise, (10 eps)² times the sum of the observed entries squared
    eps = float(np.finfo(M.dtype).eps)
    floor = (10 * eps) ** 2 * float(np.sum(np.where(mask, M, 0.0).astype(np.float64) ** 2))

    def stops_at(k):
        small = k >= 1 and abs(losses[k - 1] - losses[k]) <= tol * losses[k - 1]
        return losses[k] <= floor or small

    # it stops at the first sweep that meets the rule, and only there
    for k in range(len(losses) - 1):
        assert not stops_at(k), f"should have stopped after sweep {k + 1}"
    if fit.converged:
        assert stops_at(len(losses) - 1)
    else:
        assert fit.n_iter == max_iter
        assert not stops_at(len(losses) - 1)


def test_tol_zero_runs_every_sweep_unless_the_fit_is_exact():
    M = np.random.default_rng(0).standard_normal((8, 6))
    fit = als(M, 2, tol=0.0, max_iter=13, init="random", random_state=0)
    assert fit.n_iter == 13 and not fit.converged


# ---------------------------------------------------------------- Eckart–Young optimum


@settings(max_examples=10)
@given(problem=gapped_problems(), seed=SEEDS)
def test_fully_observed_from_random_init_reaches_the_eckart_young_optimum(problem, seed):
    M, s, rank = problem
    fit = als(M, rank, init="random", tol=1e-14, max_iter=500, random_state=seed)
    optimum = float(np.sum(s[rank:] ** 2))  # Eckart–Young, from the planted spectrum
    assert (fit.losses[-1] - optimum) / optimum < 1e-6
    assert (objective(M, np.ones_like(M, bool), fit.left, fit.right) - optimum) / optimum < 1e-6
    U, sv, Vt = np.linalg.svd(M, full_matrices=False)
    best = (U[:, :rank] * sv[:rank]) @ Vt[:rank]  # (m, n), numpy's truncation
    np.testing.assert_allclose(fit.left @ fit.right, best, atol=1e-5)


@given(M=matrices(2, 12))
def test_svd_init_is_optimal_from_the_first_sweep(M):
    m, n = M.shape
    dtype = M.dtype
    rank = max(1, min(m, n) // 2)
    fit = als(M, rank, init="svd", max_iter=3, tol=0.0)
    s = np.linalg.svd(M.astype(np.float64), compute_uv=False)
    optimum = float(np.sum(s[rank:] ** 2))
    slack = 1e-9 if dtype == np.float64 else 1e-4
    assert fit.losses[0] <= optimum + slack * float(np.sum(s**2))


# ---------------------------------------------------------------- matrix completion


# Unregularized ALS is not guaranteed to find the planted matrix: from some
# starts it stalls while the factors grow (see als's docstring). From the
# spectral start it succeeds on the large majority of problems; at 60×50 the
# listed seeds all succeed, and at 40×30 the success rate is what is asserted.


def _hidden_error(M, mask, rank, init, seed, max_iter=500):
    observed = np.where(mask, M, np.nan)  # the hidden entries are not even there
    fit = als(observed, rank, mask=mask, init=init, tol=1e-14, max_iter=max_iter, random_state=seed)
    hidden = ~mask
    return np.linalg.norm((fit.left @ fit.right - M)[hidden]) / np.linalg.norm(M[hidden]), fit


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_recovers_a_planted_low_rank_matrix_from_40_percent_of_its_entries(rank, seed):
    M = planted(60, 50, rank, seed)
    mask = random_mask(M.shape, 0.4, seed)
    rel, fit = _hidden_error(M, mask, rank, "svd", seed)
    assert rel < 1e-6, f"relative error on unobserved entries {rel:.3g} after {fit.n_iter} sweeps"


def test_spectral_start_recovers_most_small_planted_problems():
    successes = 0
    for seed in range(20):
        M = planted(40, 30, 2, seed)
        mask = random_mask(M.shape, 0.4, seed)
        successes += _hidden_error(M, mask, 2, "svd", seed, max_iter=300)[0] < 1e-6
    assert successes >= 17, f"only {successes} of 20 planted problems recovered"


# ---------------------------------------------------------------- empty rows and columns


@pytest.mark.parametrize("reg, weighted_reg", [(0.0, False), (0.1, False), (0.1, True)])
@pytest.mark.parametrize("init", ["random", "svd"])
@pytest.mark.parametrize("as_sparse", [False, True])
def test_empty_rows_and_columns_get_exactly_zero_factors(reg, weighted_reg, init, as_sparse):
    rng = np.random.default_rng(0)
    M = rng.standard_normal((9, 7))
    mask = rng.random(M.shape) < 0.7
    mask[[2, 5], :] = False  # rows 2 and 5 never observed
    mask[:, 4] = False  # nor column 4
    M[~mask] = np.nan
    data = to_sparse(M, mask, "csr") if as_sparse else M
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from 0/0 or singular solves either
        fit = als(
            data, 2, mask=None if as_sparse else mask, reg=reg, weighted_reg=weighted_reg,
            init=init, max_iter=20, random_state=1,
        )
    assert np.array_equal(fit.left[[2, 5]], np.zeros((2, 2)))
    assert np.array_equal(fit.right[:, 4], np.zeros(2))
    assert np.all(np.isfinite(fit.left)) and np.all(np.isfinite(fit.right))
    assert np.all(np.isfinite(fit.losses))
    # the other rows are fitted as usual
    assert np.all(np.any(fit.left[[0, 1, 3, 4, 6, 7, 8]] != 0, axis=1))


def test_empty_rows_in_a_sparse_matrix_whose_last_rows_store_nothing():
    # a CSR matrix whose trailing rows and columns hold no entry at all
    M = sparse.csr_matrix(([1.0, 2.0, 3.0, 4.0], ([0, 0, 1, 1], [0, 1, 0, 1])), shape=(4, 3))
    fit = als(M, 1, max_iter=10, reg=0.01, random_state=0)
    assert fit.left.shape == (4, 1) and fit.right.shape == (1, 3)
    assert np.array_equal(fit.left[2:], np.zeros((2, 1)))
    assert np.array_equal(fit.right[:, 2], np.zeros(1))


# ---------------------------------------------------------------- seeds


@given(problem=als_problems())
def test_same_seed_same_curve_and_same_bits(problem):
    M, mask, rank, reg, weighted_reg, seed = problem
    kw = dict(mask=mask, reg=reg, weighted_reg=weighted_reg, init="random", max_iter=8)
    a = als(M, rank, random_state=seed, **kw)
    b = als(M, rank, random_state=seed, **kw)
    c = als(M, rank, random_state=np.random.default_rng(seed), **kw)
    for other in (b, c):
        assert a.losses.tobytes() == other.losses.tobytes()
        assert a.left.tobytes() == other.left.tobytes()
        assert a.right.tobytes() == other.right.tobytes()
        assert a.converged == other.converged and a.n_iter == other.n_iter


def test_global_random_state_is_untouched():
    M = np.random.default_rng(0).standard_normal((8, 6))
    mask = random_mask(M.shape, 0.6, 0)
    before = legacy_global_state()
    als(M, 2, mask=mask, max_iter=3, random_state=1)
    als(M, 2, mask=mask, max_iter=3)
    assert legacy_global_state() == before


def test_init_auto_is_svd_when_fully_observed_and_random_otherwise():
    M = np.random.default_rng(3).standard_normal((9, 7))
    full = np.ones(M.shape, dtype=bool)
    # fully observed: the SVD start does not depend on the seed at all
    a = als(M, 2, init="auto", max_iter=4, tol=0.0, random_state=1)
    b = als(M, 2, init="auto", mask=full, max_iter=4, tol=0.0, random_state=2)
    c = als(M, 2, init="svd", max_iter=4, tol=0.0, random_state=3)
    for other in (b, c):
        np.testing.assert_allclose(other.losses, a.losses, rtol=1e-12)
        np.testing.assert_allclose(other.left @ other.right, a.left @ a.right, atol=1e-12)
    # with hidden entries, "auto" is "random"
    mask = random_mask(M.shape, 0.6, 0)
    d = als(M, 2, mask=mask, init="auto", max_iter=4, random_state=5)
    e = als(M, 2, mask=mask, init="random", max_iter=4, random_state=5)
    assert d.losses.tobytes() == e.losses.tobytes() and d.left.tobytes() == e.left.tobytes()


def test_mask_of_all_true_is_the_same_as_no_mask():
    M = np.random.default_rng(3).standard_normal((9, 7))
    a = als(M, 3, init="random", max_iter=6, tol=0.0, random_state=4)
    b = als(M, 3, mask=np.ones(M.shape, bool), init="random", max_iter=6, tol=0.0, random_state=4)
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-12)
    np.testing.assert_allclose(b.left, a.left, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.right, a.right, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- unobserved entries are never read


@given(problem=als_problems(), fill=st.sampled_from([np.inf, -np.inf, 3e38, 0.0]))
def test_values_at_unobserved_entries_change_nothing(problem, fill):
    M, mask, rank, reg, weighted_reg, seed = problem
    other = M.copy()
    other[~mask] = fill
    kw = dict(mask=mask, reg=reg, weighted_reg=weighted_reg, max_iter=5, random_state=seed)
    a, b = als(M, rank, **kw), als(other, rank, **kw)
    assert a.losses.tobytes() == b.losses.tobytes()
    assert a.left.tobytes() == b.left.tobytes() and a.right.tobytes() == b.right.tobytes()


# ---------------------------------------------------------------- scipy.sparse input


@given(
    problem=als_problems(min_side=3),
    reg=st.sampled_from([1e-3, 0.1, 2.0]),
    fmt=st.sampled_from(["coo", "csr", "csc", "csr_array"]),
)
def test_sparse_input_gives_the_same_result_as_the_dense_mask(problem, reg, fmt):
    # reg > 0 keeps every half-step well-posed, so the two trajectories agree to rounding
    M, mask, rank, _, weighted_reg, seed = problem
    kw = dict(reg=reg, weighted_reg=weighted_reg, init="random", max_iter=10, tol=0.0, random_state=seed)
    dense = als(M, rank, mask=mask, **kw)  # NaN at every unobserved entry of M
    sp = als(to_sparse(M, mask, fmt), rank, **kw)
    assert sp.left.dtype == M.dtype and sp.right.dtype == M.dtype
    assert sp.n_iter == dense.n_iter and sp.converged == dense.converged
    rtol = 1e-8 if M.dtype == np.float64 else 1e-3
    np.testing.assert_allclose(sp.losses, dense.losses, rtol=rtol)
    scale = max(1.0, float(np.abs(dense.left @ dense.right).max()))
    np.testing.assert_allclose(sp.left @ sp.right, dense.left @ dense.right, atol=rtol * scale)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fmt", ["coo", "csr", "bsr", "dok", "lil", "dok_array", "lil_array"])
def test_sparse_input_without_regularization_matches_the_dense_mask(seed, fmt):
    # every scipy.sparse format is converted to CSR (DOK and LIL used to fail with AttributeError
    # or "got dtype object")
    # over-determined (every row and column observed well over rank times), so reg = 0 is well-posed
    M = np.random.default_rng(seed).standard_normal((14, 11))
    mask = random_mask(M.shape, 0.7, seed)
    M[~mask] = np.nan
    kw = dict(init="random", max_iter=10, tol=0.0, random_state=seed)
    dense, sp = als(M, 2, mask=mask, **kw), als(to_sparse(M, mask, fmt), 2, **kw)
    np.testing.assert_allclose(sp.losses, dense.losses, rtol=1e-8)
    np.testing.assert_allclose(sp.left @ sp.right, dense.left @ dense.right, atol=1e-8)


def test_explicitly_stored_zeros_of_a_sparse_matrix_are_observed():
    rng = np.random.default_rng(2)
    M = rng.standard_normal((8, 6))
    mask = random_mask(M.shape, 0.6, 2)
    M[mask & (rng.random(M.shape) < 0.3)] = 0.0  # some observed entries are exactly zero
    assert np.any(mask & (M == 0))
    sp = to_sparse(M, mask, "csr")
    assert sp.nnz == mask.sum()  # the zeros are stored
    kw = dict(init="random", max_iter=10, tol=0.0, random_state=3, reg=0.1)
    a, b = als(sp, 2, **kw), als(np.where(mask, M, np.nan), 2, mask=mask, **kw)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-8)


@pytest.mark.parametrize("init", ["svd", "random"])
def test_sparse_float32_and_integer_follow_the_dtype_rule(init):
    mask = random_mask((6, 5), 0.7, 0)
    M = np.random.default_rng(0).integers(-3, 4, (6, 5))
    for dtype, want in ((np.float32, np.float32), (np.int64, np.float64)):
        fit = als(to_sparse(M.astype(dtype), mask, "csr"), 2, init=init, max_iter=3, random_state=0)
        assert fit.left.dtype == want and fit.right.dtype == want


@pytest.mark.parametrize("fmt", ["dok", "lil"])
def test_sparse_formats_without_a_data_array_keep_explicit_zeros_and_the_dtype_rule(fmt):
    rng = np.random.default_rng(5)
    M = rng.integers(-3, 4, (7, 6))
    mask = random_mask(M.shape, 0.7, 5)
    M[mask & (rng.random(M.shape) < 0.3)] = 0  # observed zeros, stored explicitly
    kw = dict(init="random", max_iter=5, tol=0.0, random_state=1, reg=0.1)
    fit = als(to_sparse(M, mask, fmt), 2, **kw)
    dense = als(np.where(mask, M, 0).astype(np.float64), 2, mask=mask, **kw)
    assert fit.left.dtype == np.float64  # integers become float64
    np.testing.assert_allclose(fit.losses, dense.losses, rtol=1e-10)
    fit32 = als(to_sparse(M.astype(np.float32), mask, fmt), 2, **kw)
    assert fit32.left.dtype == np.float32


@pytest.mark.parametrize("dtype", [">f8", ">f4", ">i4"])
@pytest.mark.parametrize("masked", [False, True])
def test_big_endian_input_is_factorized_in_native_byte_order(dtype, masked):
    """Byte order is normalised to native: >f8 is float64, as it used to be refused as 'not real'."""
    M = planted(9, 7, 2, seed=4)
    mask = random_mask(M.shape, 0.8, 4) if masked else None
    foreign = (M * 100).astype(dtype) if dtype == ">i4" else M.astype(dtype)
    native = foreign.astype(foreign.dtype.newbyteorder("="))
    a = als(foreign, 2, mask=mask, random_state=0, max_iter=5)
    b = als(native, 2, mask=mask, random_state=0, max_iter=5)
    assert a.left.dtype.isnative and a.left.dtype == expected_float_dtype(native.dtype)
    assert a.left.tobytes() == b.left.tobytes() and a.losses.tobytes() == b.losses.tobytes()


def test_sparse_with_a_mask_is_refused():
    M = sparse.random(6, 5, density=0.5, format="csr", random_state=0)
    with pytest.raises(ValueError, match="mask"):
        als(M, 2, mask=np.ones((6, 5), dtype=bool))


def test_sparse_with_a_non_finite_stored_entry_is_refused_naming_row_and_column():
    # stored out of order: the first non-finite entry in row-major order is (1, 2)
    M = sparse.coo_matrix(([1.0, np.inf, np.nan, 2.0], ([0, 2, 1, 2], [0, 0, 2, 2])), shape=(3, 3))
    want = r"^M must be finite at observed entries, got nan at index \(1, 2\) \(2 non-finite entries\)$"
    with pytest.raises(ValueError, match=want):
        als(M, 1)


def test_sparse_with_nothing_stored_is_refused():
    with pytest.raises(ValueError, match="M"):
        als(sparse.csr_matrix((4, 3)), 1)


def test_sparse_rank_out_of_range():
    M = sparse.random(6, 5, density=0.5, format="csr", random_state=0)
    with pytest.raises(ValueError, match="rank"):
        als(M, 6)


# ---------------------------------------------------------------- the objective and its minimizers


@given(problem=als_problems(), weighted_reg=st.booleans(), reg=st.sampled_from([0.01, 0.5, 3.0]))
def test_objective_and_optimality_of_the_last_half_step(problem, weighted_reg, reg):
    """losses[-1] is the documented objective at (left, right), and right minimizes it given left.

    The last half-step solves for ``right`` exactly, so the objective's gradient in
    ``right`` vanishes there: -2 Lᵀ (P ∘ (M - L R)) + 2 reg R diag(w) = 0, with w = 1
    or, for ALS-WR, the column counts.
    """
    M, mask, rank, _, _, seed = problem
    fit = als(M, rank, mask=mask, reg=reg, weighted_reg=weighted_reg, max_iter=6, random_state=seed)
    want = objective(M, mask, fit.left, fit.right, reg, weighted_reg)
    assert fit.losses[-1] == pytest.approx(want, rel=10 * loss_tol(M.dtype), abs=1e-12)

    L, R = fit.left.astype(np.float64), fit.right.astype(np.float64)
    resid = np.where(mask, M.astype(np.float64) - L @ R, 0.0)  # (m, n), nan-free
    w = mask.sum(axis=0) if weighted_reg else np.ones(M.shape[1])  # (n,)
    grad = -2 * L.T @ resid + 2 * reg * R * w  # (r, n)
    scale = 2 * (np.abs(L).T @ np.abs(np.where(mask, M, 0.0)) + reg * np.abs(R) * w).max() + 1e-12
    assert np.abs(grad).max() <= (1e-9 if M.dtype == np.float64 else 1e-3) * scale


def test_weighted_reg_changes_the_answer():
    M = np.random.default_rng(0).standard_normal((10, 8))
    mask = random_mask(M.shape, 0.5, 0)
    a = als(M, 2, mask=mask, reg=0.5, max_iter=5, random_state=0)
    b = als(M, 2, mask=mask, reg=0.5, weighted_reg=True, max_iter=5, random_state=0)
    assert not np.allclose(a.left @ a.right, b.left @ b.right)


# ---------------------------------------------------------------- result object and dtypes


def test_result_is_frozen_and_converts_to_lowrank():
    M = np.random.default_rng(0).standard_normal((6, 5))
    fit = als(M, 2, max_iter=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.left = fit.left
    lr = fit.to_lowrank()
    assert isinstance(lr, lowrank.LowRank)
    np.testing.assert_array_equal(lr.to_dense(), fit.left @ fit.right)


@pytest.mark.parametrize(
    "dtype, want",
    [(np.float32, np.float32), (np.float64, np.float64), (np.int64, np.float64), (np.bool_, np.float64)],
)
def test_dtype_rule(dtype, want):
    M = (np.random.default_rng(0).standard_normal((6, 5)) * 3).astype(dtype)
    for mask in (None, random_mask(M.shape, 0.7, 0)):
        for init in ("svd", "random"):
            fit = als(M, 2, mask=mask, init=init, max_iter=3, random_state=0)
            assert fit.left.dtype == want and fit.right.dtype == want, (mask is None, init)
            assert fit.losses.dtype == np.float64


def test_float32_loss_is_the_objective_at_the_returned_factors():
    # float32 factors; the loss is summed in float64 (the residuals themselves may be
    # rounded to float32, hence 1e-6 and not 1e-12)
    M = np.random.default_rng(0).standard_normal((30, 20)).astype(np.float32)
    fit = als(M, 3, max_iter=2, tol=0.0)
    want = objective(M, np.ones(M.shape, bool), fit.left, fit.right)
    assert fit.losses[-1] == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- errors (rank, shape, finiteness, dtype: test_svd.py)

M = np.random.default_rng(0).standard_normal((5, 4))


def test_nan_at_an_observed_entry_is_refused_but_not_at_a_hidden_one():
    bad = M.copy()
    bad[1, 2] = np.nan
    mask = np.ones(M.shape, dtype=bool)
    with pytest.raises(ValueError, match="M must be finite"):
        als(bad, 2, mask=mask)
    mask[1, 2] = False
    als(bad, 2, mask=mask, max_iter=2, random_state=0)


@pytest.mark.parametrize("shape", [(4, 5), (5,), (5, 4, 1), (20,)])
def test_mask_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match="mask"):
        als(M, 2, mask=np.ones(shape, dtype=bool))


@pytest.mark.parametrize("dtype", [np.int64, np.float64, np.uint8])
def test_mask_of_a_non_boolean_dtype(dtype):
    with pytest.raises(TypeError, match="mask"):
        als(M, 2, mask=np.ones(M.shape, dtype=dtype))


def test_all_false_mask():
    with pytest.raises(ValueError, match="mask"):
        als(M, 2, mask=np.zeros(M.shape, dtype=bool))


@pytest.mark.parametrize("reg", [-1e-9, -1.0, np.nan, np.inf])
def test_bad_reg(reg):
    with pytest.raises(ValueError, match="reg"):
        als(M, 2, reg=reg)


@pytest.mark.parametrize("init", ["SVD", "pca", "", None, 1])
def test_bad_init(init):
    with pytest.raises(ValueError, match="init"):
        als(M, 2, init=init)


@pytest.mark.parametrize("max_iter", [0, -5])
def test_max_iter_below_one(max_iter):
    with pytest.raises(ValueError, match=rf"max_iter .*got {max_iter}"):
        als(M, 2, max_iter=max_iter)


@pytest.mark.parametrize("max_iter", [10.0, "10", None])
def test_max_iter_not_an_integer(max_iter):
    with pytest.raises(TypeError, match="max_iter"):
        als(M, 2, max_iter=max_iter)


@pytest.mark.parametrize("tol", [-1e-12, -1.0, np.nan])
def test_bad_tol(tol):
    with pytest.raises(ValueError, match="tol"):
        als(M, 2, tol=tol)


@pytest.mark.parametrize("random_state", [1.5, "0", np.random.RandomState(0)])
def test_bad_random_state(random_state):
    with pytest.raises(TypeError, match="random_state"):
        als(M, 2, random_state=random_state)


def test_float32_entries_near_1e19_factorize_as_in_float64():
    """Their Gram matrices (~1e38 · n) overflow float32; ALS works on M scaled by a power of two instead."""
    rng = np.random.default_rng(0)
    M = (rng.standard_normal((20, 15)) * 1e19).astype(np.float32)
    mask = rng.random(M.shape) < 0.5
    fit32 = als(M, 2, mask=mask, random_state=0, max_iter=5, tol=0.0)
    fit64 = als(M.astype(np.float64), 2, mask=mask, random_state=0, max_iter=5, tol=0.0)
    assert fit32.left.dtype == np.float32 and np.all(np.isfinite(fit32.losses))
    np.testing.assert_allclose(fit32.losses, fit64.losses, rtol=1e-3)  # the same run, to float32 rounding
    predicted = fit32.left.astype(np.float64) @ fit32.right.astype(np.float64)
    np.testing.assert_allclose(predicted, fit64.left @ fit64.right, rtol=1e-3, atol=1e-3 * np.abs(M).max())


@pytest.mark.parametrize("as_sparse", [False, True])
def test_a_spectral_start_near_the_float32_limit_is_right(as_sparse):
    """The zero-filled, rescaled matrix's singular value (~1.7e39) overflows float32, the answer does not."""
    M = np.full((6, 5), 3e38, np.float32)
    mask = np.ones(M.shape, bool)
    mask[0, 0] = False
    data = to_sparse(M, mask, "csr") if as_sparse else M
    fit = als(data, 1, mask=None if as_sparse else mask, init="svd", random_state=0)
    predicted = fit.left.astype(np.float64) @ fit.right.astype(np.float64)  # (6, 5)
    np.testing.assert_allclose(predicted[mask], 3e38, rtol=1e-5)  # rank 1 fits exactly
    assert fit.converged and fit.losses[-1] <= (1e-5 * 3e38) ** 2 * mask.sum()


def test_losses_beyond_float64_read_inf_and_the_factors_are_right():
    """The objective of float64 M near 1e160 is ~1e320: it reads inf, the factors are those of M / 2**532."""
    rng = np.random.default_rng(1)
    M = rng.standard_normal((8, 6))
    mask = rng.random(M.shape) < 0.8
    small = als(M, 2, mask=mask, random_state=0)
    large = als(M * 2.0**532, 2, mask=mask, random_state=0)  # exact: the same problem
    np.testing.assert_array_equal(large.left, small.left * 2.0**266)
    np.testing.assert_array_equal(large.right, small.right * 2.0**266)
    assert large.converged == small.converged and large.n_iter == small.n_iter
    with np.errstate(over="ignore"):
        expected = np.ldexp(small.losses, 2 * 532)  # inf where beyond float64, exact elsewhere
    assert np.isposinf(expected[0])
    np.testing.assert_array_equal(large.losses, expected)


@pytest.mark.parametrize("flag", ["no", 1, None])
def test_weighted_reg_must_be_a_bool(flag):
    with pytest.raises(TypeError, match="weighted_reg must be True or False"):
        als(np.ones((3, 3)), 1, reg=0.1, weighted_reg=flag)
