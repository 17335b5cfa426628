"""truncated_svd and the spectrum helpers, against numpy.linalg.svd and the Eckart–Young formulas."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import (
    BAD_DTYPES,
    FLOAT_DTYPES,
    any_dtype_matrices,
    as_layout,
    assert_sign_rule,
    canonical,
    expected_float_dtype,
    lapack_tol,
    matrices_and_ranks,
    matrix_shapes,
    planted_matrices,
    rtol_for,
    singular_values,
    spectrum_matrices,
)

import lowrank
from lowrank import eckart_young_errors, energy_kept, rank_for_energy, truncated_svd


def reference_s(M: np.ndarray) -> np.ndarray:
    """All singular values of M, computed independently in float64."""
    return np.linalg.svd(np.asarray(M, dtype=np.float64), compute_uv=False)


# ---------------------------------------------------------------- shapes, orthonormality, values


@given(Mr=matrices_and_ranks())
def test_shapes_and_orthonormal_factors(Mr):
    M, r = Mr
    m, n = M.shape
    svd = truncated_svd(M, r)
    assert svd.U.shape == (m, r) and svd.s.shape == (r,) and svd.Vt.shape == (r, n)
    assert svd.shape == (m, n) and svd.rank == r
    tol = lapack_tol(M.dtype, max(m, n))
    U, Vt = svd.U.astype(np.float64), svd.Vt.astype(np.float64)
    np.testing.assert_allclose(U.T @ U, np.eye(r), atol=tol)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(r), atol=tol)


@given(Mr=matrices_and_ranks())
def test_singular_values_match_numpy_and_descend(Mr):
    M, r = Mr
    svd = truncated_svd(M, r)
    s_ref = reference_s(M)
    assert np.all(np.diff(svd.s) <= 0)
    assert np.all(svd.s >= 0)
    np.testing.assert_allclose(svd.s, s_ref[:r], atol=lapack_tol(M.dtype, max(M.shape)) * s_ref[0])


@given(Mr=matrices_and_ranks())
def test_eckart_young_frobenius_and_spectral_errors(Mr):
    M, r = Mr
    svd = truncated_svd(M, r)
    s_ref = reference_s(M)
    M64 = M.astype(np.float64)
    E = M64 - (svd.U.astype(np.float64) * svd.s) @ svd.Vt.astype(np.float64)  # (m, n)
    scale = float(np.sum(M64**2))
    # squared Frobenius error == sum of the squared tail singular values
    assert abs(np.sum(E**2) - np.sum(s_ref[r:] ** 2)) <= rtol_for(M.dtype) * scale
    # spectral error == s[r] (0 when nothing is left out)
    tail = s_ref[r] if r < s_ref.size else 0.0
    assert abs(np.linalg.norm(E, 2) - tail) <= 10 * rtol_for(M.dtype) * s_ref[0]


@given(
    shape=matrix_shapes(2, 12),
    true_rank=st.integers(1, 4),
    extra=st.integers(0, 3),
    dtype=FLOAT_DTYPES,
    data=st.data(),
)
def test_exact_recovery_when_rank_reaches_the_true_rank(shape, true_rank, extra, dtype, data):
    m, n = shape
    true_rank = min(true_rank, m, n)
    r = min(true_rank + extra, m, n)
    s = data.draw(singular_values(true_rank, min_gap=0.0), label="s")
    M = data.draw(planted_matrices(m, n, s, dtype).flatmap(as_layout), label="M")
    svd = truncated_svd(M, r)
    recon = (svd.U.astype(np.float64) * svd.s) @ svd.Vt.astype(np.float64)
    assert np.linalg.norm(recon - M) <= lapack_tol(dtype, max(m, n)) * np.linalg.norm(M)
    # the singular values beyond the true rank are (numerically) zero
    assert np.all(svd.s[true_rank:] <= lapack_tol(dtype, max(m, n)) * svd.s[0])


# ---------------------------------------------------------------- deterministic signs


@given(Mr=matrices_and_ranks())
def test_sign_rule_holds(Mr):
    M, r = Mr
    assert_sign_rule(truncated_svd(M, r).U)


@pytest.mark.parametrize("u", [[-0.5, 0.5, 0.5, -0.5], [0.5, -0.5, 0.5, 0.5], [0.5, 0.5, -0.5, 0.5]])
def test_sign_rule_on_ties_picks_the_first_largest_entry(u):
    # M = u vᵀ with |u_i| all equal (exactly representable): every entry ties in magnitude,
    # so the first one decides and must come out positive.
    u = np.asarray(u)
    M = np.outer(u, [1.0, 0.0, 0.0])
    svd = truncated_svd(M, 1)
    sign = np.sign(u[0])
    np.testing.assert_allclose(svd.U[:, 0], sign * u, atol=1e-15)
    np.testing.assert_allclose(svd.Vt[0], [sign, 0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(svd.s, [1.0], atol=1e-15)


@given(Ms=spectrum_matrices(1, 10), r=st.integers(1, 10))
def test_signs_are_canonical_whatever_the_input_sign_or_layout(Ms, r):
    # distinct, well separated singular values, so the singular vectors are unique up to sign
    M, _ = Ms
    m, n = M.shape
    dtype = M.dtype
    r = min(r, m, n)
    svd = truncated_svd(M, r)

    again = truncated_svd(np.ascontiguousarray(M), r)  # the same values, C-ordered: identical bits
    for a, b in ((svd.U, again.U), (svd.s, again.s), (svd.Vt, again.Vt)):
        assert a.tobytes() == b.tobytes()

    tol = lapack_tol(dtype, max(m, n)) * 10
    neg = truncated_svd(-M, r)  # -M = U S (-Vt): the canonical U stays, Vt flips
    np.testing.assert_allclose(neg.U, svd.U, atol=tol)
    np.testing.assert_allclose(neg.Vt, -svd.Vt, atol=tol)
    np.testing.assert_allclose(neg.s, svd.s, atol=tol * 3)

    # against numpy's own SVD put through the rule independently
    U_ref, _, Vt_ref = np.linalg.svd(M.astype(np.float64), full_matrices=False)
    U_ref, Vt_ref = canonical(U_ref[:, :r], Vt_ref[:r])
    # a column whose two largest magnitudes tie to within rounding (e.g. ±1/√2, ±1/√2) has its sign
    # decided by the last bit, which float32 and float64 may set differently: compare it up to sign
    top_two = np.sort(np.abs(U_ref), axis=0)[-2:] if m > 1 else np.zeros((2, r))  # (2, r)
    tied = top_two[1] - top_two[0] <= tol
    flip = np.where(tied & (np.sum(svd.U * U_ref, axis=0) < 0), -1.0, 1.0)  # (r,)
    np.testing.assert_allclose(svd.U * flip, U_ref, atol=tol)
    np.testing.assert_allclose(svd.Vt * flip[:, None], Vt_ref, atol=tol)


@given(Mr=matrices_and_ranks())
def test_input_is_not_modified(Mr):
    M, r = Mr
    before = M.copy()
    truncated_svd(M, r)
    truncated_svd(M, energy=0.9)
    assert np.array_equal(M, before)


# ---------------------------------------------------------------- dtypes


@given(M=any_dtype_matrices())
def test_dtype_rule(M):
    want = expected_float_dtype(M.dtype)
    svd = truncated_svd(M, 1)
    assert svd.U.dtype == want and svd.s.dtype == want and svd.Vt.dtype == want
    np.testing.assert_allclose(svd.s, reference_s(M)[:1], atol=lapack_tol(want, 12) * 12)


def test_result_is_frozen_and_converts_to_lowrank():
    M = np.random.default_rng(1).standard_normal((6, 4))
    svd = truncated_svd(M, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        svd.U = svd.U
    lr = svd.to_lowrank()
    assert isinstance(lr, lowrank.LowRank)
    np.testing.assert_allclose(lr.left, svd.U * svd.s, rtol=0, atol=0)
    np.testing.assert_allclose(lr.right, svd.Vt, rtol=0, atol=0)
    np.testing.assert_allclose(lr.to_dense(), (svd.U * svd.s) @ svd.Vt, atol=1e-14)
    assert lr.shape == (6, 4) and lr.rank == 2


# ---------------------------------------------------------------- energy


def brute_force_rank(s: np.ndarray, energy: float) -> int:
    total = sum(float(v) ** 2 for v in s)
    for k in range(1, s.size + 1):
        if sum(float(v) ** 2 for v in s[:k]) >= energy * total:
            return k
    return s.size


@given(Mr=matrices_and_ranks(2, 10), energy=st.floats(0.001, 1.0))
def test_energy_picks_the_smallest_rank_keeping_that_fraction(Mr, energy):
    M, _ = Mr
    s = np.linalg.svd(M, compute_uv=False).astype(np.float64)
    assume(s[0] > 0)  # a zero matrix keeps no fraction of no energy (tested on its own)
    s = s / s[0]  # energy fractions do not depend on the scale; squares of 1e-277 would underflow
    kept = np.cumsum(s**2) / np.sum(s**2)
    # stay clear of the boundaries, where float tolerance decides (tested exactly below)
    margin = 1e-4 if M.dtype == np.float32 else 1e-9
    assume(np.all(np.abs(kept - energy) > margin))
    want = brute_force_rank(s, energy)
    svd = truncated_svd(M, energy=energy)
    assert svd.rank == want
    assert svd.U.shape == (M.shape[0], want) and svd.Vt.shape == (want, M.shape[1])


@given(Ms=spectrum_matrices(2, 10, dtype=np.float64))
def test_energy_exactly_on_a_boundary_and_energy_one(Ms):
    M, s = Ms
    p = s.size
    assert truncated_svd(M, energy=1.0).rank == p
    for k in range(1, p + 1):
        boundary = float(np.sum(s[:k] ** 2) / np.sum(s**2))  # rank k keeps exactly this
        assert truncated_svd(M, energy=boundary).rank == k
        assert rank_for_energy(s, boundary) == k


# ---------------------------------------------------------------- spectrum helpers


spectra = st.lists(st.floats(0.0, 100.0), min_size=1, max_size=12).map(
    lambda v: np.sort(np.asarray(v))[::-1].copy()
)


@given(s=spectra)
def test_eckart_young_errors_formula(s):
    fro = eckart_young_errors(s)
    two = eckart_young_errors(s, ord=2)
    p = s.size
    assert fro.shape == (p + 1,) and two.shape == (p + 1,)
    for k in range(p + 1):
        assert fro[k] == pytest.approx(np.sqrt(sum(float(v) ** 2 for v in s[k:])), rel=1e-12, abs=1e-12)
        assert two[k] == (float(s[k]) if k < p else 0.0)


@given(s=spectra)
def test_energy_kept_formula(s):
    kept = energy_kept(s)
    total = sum(float(v) ** 2 for v in s)
    assert kept.shape == (s.size + 1,)
    assert kept[0] == 0.0
    for k in range(1, s.size + 1):
        want = 1.0 if total == 0 else sum(float(v) ** 2 for v in s[:k]) / total
        assert kept[k] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert np.all(np.diff(kept) >= 0)  # rounding must not make it dip


def test_energy_kept_of_the_zero_spectrum():
    np.testing.assert_array_equal(energy_kept(np.zeros(3)), [0.0, 1.0, 1.0, 1.0])
    assert rank_for_energy(np.zeros(3), 1.0) == 1


@given(s=spectra, energy=st.floats(0.001, 1.0))
def test_rank_for_energy_is_the_brute_force_rank(s, energy):
    total = float(np.sum(s**2))
    if total > 0:
        kept = np.cumsum(s**2) / total
        assume(np.all(np.abs(kept - energy) > 1e-9))
        assert rank_for_energy(s, energy) == brute_force_rank(s, energy)
    else:
        assert rank_for_energy(s, energy) == 1


@given(Mr=matrices_and_ranks(1, 10, dtype=np.float64))
def test_spectrum_helpers_agree_with_actual_truncations(Mr):
    M, _ = Mr
    s = reference_s(M)
    fro, two = eckart_young_errors(s), eckart_young_errors(s, ord=2)
    assert fro[0] == pytest.approx(np.linalg.norm(M), rel=1e-12)
    for k in range(1, s.size + 1):
        svd = truncated_svd(M, k)
        E = M - (svd.U * svd.s) @ svd.Vt
        assert np.linalg.norm(E) == pytest.approx(fro[k], rel=1e-8, abs=1e-12 * s[0])
        assert np.linalg.norm(E, 2) == pytest.approx(two[k], rel=1e-8, abs=1e-12 * s[0])


@pytest.mark.parametrize("ord_", ["nuc", 1, "2", None])
def test_eckart_young_errors_refuses_other_norms(ord_):
    with pytest.raises(ValueError, match="ord"):
        eckart_young_errors([2.0, 1.0], ord=ord_)


@pytest.mark.parametrize("helper", [eckart_young_errors, energy_kept])
@pytest.mark.parametrize(
    "bad", [[1.0, 2.0], [-1.0], [[2.0, 1.0]], [], [np.nan], [np.inf, 1.0]]
)
def test_spectrum_helpers_refuse_bad_spectra(helper, bad):
    with pytest.raises(ValueError, match="s must"):
        helper(bad)


@pytest.mark.parametrize("energy", [0.0, -0.5, 1.5, np.nan, np.inf])
def test_rank_for_energy_refuses_energy_outside_0_1(energy):
    with pytest.raises(ValueError, match="energy"):
        rank_for_energy([2.0, 1.0], energy)


# ---------------------------------------------------------------- errors, for all three factorizers

# Each takes (M, rank) first; keyword options that make the run cheap.
FACTORIZERS = {
    "truncated_svd": lambda M, rank, **kw: lowrank.truncated_svd(M, rank, **kw),
    "randomized_svd": lambda M, rank, **kw: lowrank.randomized_svd(M, rank, random_state=0, **kw),
    "als": lambda M, rank, **kw: lowrank.als(M, rank, max_iter=2, random_state=0, **kw),
}
factorizers = pytest.mark.parametrize("factorize", FACTORIZERS.values(), ids=FACTORIZERS.keys())

M34 = np.arange(12.0).reshape(3, 4) ** 1.5


@factorizers
@pytest.mark.parametrize("rank", [0, -1, 4, 100])
def test_rank_out_of_range(factorize, rank):
    with pytest.raises(ValueError, match=rf"rank must be .*got {rank}"):
        factorize(M34, rank)


@factorizers
@pytest.mark.parametrize("rank", [2.5, 2.0, "3", True, np.float64(1.0)])
def test_rank_not_an_integer(factorize, rank):
    with pytest.raises(TypeError, match="rank"):
        factorize(M34, rank)


@factorizers
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (), (0, 3), (3, 0)])
def test_matrix_of_wrong_dimension_or_empty(factorize, shape):
    with pytest.raises(ValueError, match="M must"):
        factorize(np.ones(shape), 1)


@factorizers
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_entries(factorize, bad):
    M = M34.copy()
    M[2, 1] = bad
    with pytest.raises(ValueError, match="M must be finite"):
        factorize(M, 1)


@factorizers
@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_string_object_and_complex_dtypes(factorize, dtype):
    with pytest.raises(TypeError, match="M"):
        factorize(np.ones((3, 4), dtype=dtype), 1)


@factorizers
@pytest.mark.parametrize("bad", ["not a matrix", [[1.0, 2.0], [3.0]]])
def test_strings_and_ragged_input(factorize, bad):
    with pytest.raises(TypeError, match="M"):
        factorize(bad, 1)


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.01, np.nan, np.inf])
def test_energy_outside_0_1(energy):
    with pytest.raises(ValueError, match="energy"):
        truncated_svd(M34, energy=energy)


@pytest.mark.parametrize("factorize", [lowrank.randomized_svd, lowrank.factor.als])
def test_rank_none_where_there_is_no_energy_option(factorize):
    with pytest.raises(TypeError, match="rank"):
        factorize(M34, None)


def test_rank_and_energy_together_or_neither():
    with pytest.raises(ValueError, match=r"rank.*energy|energy.*rank"):
        truncated_svd(M34, 2, energy=0.5)
    with pytest.raises((TypeError, ValueError), match="rank"):
        truncated_svd(M34)


def test_entries_too_large_for_the_dtype_are_a_floating_point_error_naming_the_magnitude():
    from lowrank import randomized_svd
    from lowrank.factor import randomized_range_finder

    M = np.full((3, 3), 3e38, np.float32)  # finite, but its singular value 9e38 is not
    for fit in (
        lambda: truncated_svd(M, 1),
        lambda: randomized_svd(M, 1, random_state=0),
        lambda: randomized_svd(M[:, :2], 1, random_state=0),  # wide after the transpose too
    ):
        with pytest.raises(FloatingPointError, match=r"largest magnitude 3e\+38\) are too large for .* in float32"):
            fit()
    assert np.isclose(truncated_svd(M.astype(np.float64), 1).s[0], 9e38)  # float64 holds it
    Q = randomized_range_finder(M, 2, n_iter=1, random_state=0)  # orthonormal: nothing in it can overflow
    assert Q.dtype == np.float32
    np.testing.assert_allclose(Q.T.astype(np.float64) @ Q, np.eye(2), atol=1e-6)
    np.testing.assert_allclose(np.abs(Q[:, 0]), 1 / np.sqrt(3), rtol=1e-6)  # the range of M: the ones vector
