"""Scale invariance at the edge of the floating-point range (issue 15, item 6).

Factorizing ``c * M`` must give ``c`` times the answer for ``M`` (ranks,
relative errors and stopping decisions unchanged) for every ``c`` the dtype
holds, or refuse with FloatingPointError when the answer itself overflows.
The scales are powers of two ``2**k``, ``k`` drawn across the whole range
(about 1e-300…1e300 for float64, 1e-37…1e37 for float32), and the entries
have a magnitude of at least ``2**-6``: then ``2**k * M`` is exact, the
scaled input is the same problem, and the comparison can be tight. The
issue's own examples (1e160, 1e-170, float32 1e-30: not powers of two) are
checked against the by-hand answer at scale 1.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import sparse
from strategies import as_layout, float_arrays, matrix_shapes, planted, random_mask

import lowrank
from lowrank import LowRank, als, eckart_young_errors, energy_kept, randomized_svd, rank_for_energy, truncated_svd

# 2**k * M stays normal (no bits lost) and its singular values (<= 16) stay finite for k in these ranges.
EXPONENTS = {np.float64: (-990, 990), np.float32: (-118, 118)}
MIN_MAGNITUDE = 2.0**-6


@st.composite
def scaled_problems(draw, min_side: int = 2, max_side: int = 8):
    """``(M, k, scaled)``: a matrix, an exponent, and ``M * 2**k`` (exact) in a drawn memory layout."""
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    m, n = draw(matrix_shapes(min_side, max_side))
    M = draw(float_arrays(dtype, (m, n), bound=1.0, min_magnitude=MIN_MAGNITUDE))
    k = draw(st.integers(*EXPONENTS[dtype]))
    scaled = draw(as_layout(np.ldexp(M, k)))
    assert np.array_equal(np.ldexp(scaled, -k), M)  # exact: the test's premise
    return M, k, scaled


def tol(dtype) -> float:
    return 1e-4 if dtype == np.float32 else 1e-11


# ---------------------------------------------------------------- SVD and the spectrum helpers


@given(problem=scaled_problems(), data=st.data())
def test_truncated_svd_scales_with_m(problem, data):
    M, k, scaled = problem
    rank = data.draw(st.integers(1, min(M.shape)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ref, big = truncated_svd(M, rank), truncated_svd(scaled, rank)
    assert big.s.dtype == M.dtype
    s_ref = ref.s.astype(np.float64)
    np.testing.assert_allclose(np.ldexp(big.s.astype(np.float64), -k), s_ref, rtol=0, atol=tol(M.dtype) * s_ref[0])
    dense = np.ldexp((big.U.astype(np.float64) * big.s.astype(np.float64)) @ big.Vt.astype(np.float64), -k)
    np.testing.assert_allclose(dense, ref.to_dense(), atol=10 * tol(M.dtype) * s_ref[0])


@given(problem=scaled_problems(), energy=st.floats(0.01, 1.0))
def test_the_rank_for_an_energy_does_not_depend_on_the_scale(problem, energy):
    M, _, scaled = problem
    s = np.linalg.svd(M.astype(np.float64), compute_uv=False)
    kept = np.cumsum(s**2) / np.sum(s**2)  # by hand, at scale 1
    assume(np.min(np.abs(kept - energy)) > 1e-3)  # not on a boundary, where rounding may decide
    want = int(np.argmax(kept >= energy)) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert truncated_svd(scaled, energy=energy).rank == want
        assert rank_for_energy(np.linalg.svd(scaled, compute_uv=False), energy) == want


@given(problem=scaled_problems())
def test_energy_kept_and_eckart_young_errors_scale_with_s(problem):
    M, k, scaled = problem
    s = np.linalg.svd(M.astype(np.float64), compute_uv=False)
    s_big = np.linalg.svd(scaled, compute_uv=False)
    tail = np.sqrt(np.cumsum((s**2)[::-1])[::-1])  # by hand, at scale 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        kept, fro, spectral = energy_kept(s_big), eckart_young_errors(s_big), eckart_young_errors(s_big, ord=2)
    t = tol(M.dtype)
    np.testing.assert_allclose(kept, np.concatenate([[0.0], np.cumsum(s**2) / np.sum(s**2)]), atol=t)
    np.testing.assert_allclose(np.ldexp(fro, -k), np.append(tail, 0.0), atol=t * s[0])
    np.testing.assert_allclose(np.ldexp(spectral, -k), np.append(s, 0.0), atol=t * s[0])


@given(problem=scaled_problems(min_side=3), seed=st.integers(0, 2**16))
def test_randomized_svd_scales_with_m(problem, seed):
    M, k, scaled = problem
    rank = min(M.shape) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ref, big = randomized_svd(M, rank, random_state=seed), randomized_svd(scaled, rank, random_state=seed)
    # the iteration runs on M / 2**e in both cases: the same bits, scaled back by a power of two
    np.testing.assert_array_equal(np.ldexp(big.s, -k), ref.s)
    np.testing.assert_array_equal(big.U, ref.U)
    np.testing.assert_array_equal(big.Vt, ref.Vt)


def test_a_singular_value_beyond_the_dtype_is_a_floating_point_error():
    M = np.full((4, 4), 2.0**1023)  # finite, but its singular value 2**1025 is not
    for fit in (lambda: truncated_svd(M, 1), lambda: randomized_svd(M, 1, random_state=0)):
        with pytest.raises(FloatingPointError, match="too large for an SVD in float64: its singular values overflow"):
            fit()
    with pytest.raises(FloatingPointError, match="too large for float64"):
        eckart_young_errors([1.5e308, 1.5e308])  # sqrt(2) * 1.5e308 is beyond float64
    np.testing.assert_allclose(energy_kept([1.5e308, 1.5e308]), [0.0, 0.5, 1.0])  # a ratio is still right


# ---------------------------------------------------------------- LowRank.error


@given(problem=scaled_problems(), data=st.data())
def test_lowrank_error_scales_with_m(problem, data):
    M, k, scaled = problem
    rank = data.draw(st.integers(1, min(M.shape)))
    svd = truncated_svd(M, rank)
    left, right = svd.U * svd.s, svd.Vt
    j = k // 2 + data.draw(st.integers(-8, 8))  # the split of 2**k between the factors is free; both stay normal
    lr, big = LowRank(left, right), LowRank(np.ldexp(left, j), np.ldexp(right, k - j))
    M64 = M.astype(np.float64)
    err = float(np.linalg.norm(M64 - left.astype(np.float64) @ right.astype(np.float64)))  # by hand
    rel = err / float(np.linalg.norm(M64))
    t = tol(M.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert big.error(scaled, relative=True) == pytest.approx(lr.error(M, relative=True), rel=t, abs=t)
        assert big.error(scaled, relative=True) == pytest.approx(rel, rel=t, abs=t)
        assert np.ldexp(big.error(scaled), -k) == pytest.approx(err, rel=t, abs=t * float(np.linalg.norm(M64)))


def test_lowrank_error_beyond_the_float_range_is_refused_but_the_relative_one_is_right():
    M = np.full((3, 3), -1e308)
    lr = LowRank(np.full((3, 1), 1e308), np.ones((1, 3)))  # M − L R = −2e308 everywhere
    assert lr.error(M, relative=True) == pytest.approx(2.0)
    with pytest.raises(FloatingPointError, match="too large for a float"):
        lr.error(M)


# ---------------------------------------------------------------- ALS


def als_runs(M, k, scaled, mask, fmt, **kw):
    if fmt == "dense":
        return als(M, 2, mask=mask, **kw), als(scaled, 2, mask=mask, **kw)
    i, j = np.nonzero(mask)
    return (
        als(sparse.csr_matrix((M[i, j], (i, j)), shape=M.shape), 2, **kw),
        als(sparse.csr_matrix((scaled[i, j], (i, j)), shape=M.shape), 2, **kw),
    )


@given(problem=scaled_problems(min_side=3), fmt=st.sampled_from(["dense", "sparse"]), data=st.data())
def test_unregularized_als_runs_the_same_sweeps_at_every_scale(problem, fmt, data):
    """reg = 0: the run on M / 2**e is the same bit for bit; only the split of 2**k between the factors is free."""
    M, k, scaled = problem
    mask = data.draw(st.lists(st.booleans(), min_size=M.size, max_size=M.size).map(
        lambda b: np.array(b).reshape(M.shape)))
    mask[np.arange(min(M.shape)), np.arange(min(M.shape))] = True  # observe something in every row or column
    init = data.draw(st.sampled_from(["svd", "random"]))
    kw = dict(init=init, max_iter=15, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ref, big = als_runs(M, k, scaled, mask, fmt, **kw)
    assert (big.converged, big.n_iter) == (ref.converged, ref.n_iter)
    assert big.left.dtype == M.dtype
    with np.errstate(over="ignore"):  # beyond float64 the objective reads inf, as als documents
        np.testing.assert_array_equal(big.losses, np.ldexp(ref.losses, 2 * k))
    product = big.left.astype(np.float64) @ big.right.astype(np.float64)
    want = ref.left.astype(np.float64) @ ref.right.astype(np.float64)
    np.testing.assert_allclose(np.ldexp(product, -k), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@given(problem=scaled_problems(min_side=3), reg=st.floats(1e-3, 2.0), weighted=st.booleans(), data=st.data())
def test_regularized_als_scales_with_m_bit_for_bit(problem, reg, weighted, data):
    """reg > 0: als(4**j M, reg=4**j reg) is als(M, reg) with both factors times 2**j, exactly.

    (The problem at scale c is the one at scale 1 with factors times sqrt(c): a power of two when c = 4**j.)
    """
    M, k, _ = problem
    j = k // 2
    scaled = np.ldexp(M, 2 * j)
    mask = random_mask(M.shape, 0.7, data.draw(st.integers(0, 2**16)))
    kw = dict(weighted_reg=weighted, max_iter=10, random_state=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ref = als(M, 2, mask=mask, reg=reg, **kw)
        big = als(scaled, 2, mask=mask, reg=float(np.ldexp(reg, 2 * j)), **kw)
    assert (big.converged, big.n_iter) == (ref.converged, ref.n_iter)
    np.testing.assert_array_equal(big.left, np.ldexp(ref.left, j))
    np.testing.assert_array_equal(big.right, np.ldexp(ref.right, j))
    with np.errstate(over="ignore"):  # beyond float64 the objective reads inf, as als documents
        np.testing.assert_allclose(big.losses, np.ldexp(ref.losses, 4 * j), rtol=1e-15)


# ---------------------------------------------------------------- the examples


def noisy_rank3(dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(0)
    M = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 15)) + 1e-3 * rng.standard_normal((20, 15))
    return M.astype(dtype)


@pytest.mark.parametrize("scale", [1e160, 1e-170, 1e300, 1e-300])
def test_the_energy_rank_at_extreme_scales(scale):
    M = noisy_rank3()
    assert truncated_svd(M, energy=0.99).rank == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert truncated_svd(M * scale, energy=0.99).rank == 3  # was 1: the energies overflowed


@pytest.mark.parametrize("scale", [1e-170, 1e-300, 1e160, 1e300])
def test_masked_als_at_extreme_scales_fits_as_at_scale_one(scale):
    M = noisy_rank3()
    mask = np.random.default_rng(1).random(M.shape) < 0.7
    ref = als(M, 3, mask=mask, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit = als(M * scale, 3, mask=mask, random_state=0)  # was zero factors (tiny) or 'too large' (huge)
    assert (fit.converged, fit.n_iter) == (ref.converged, ref.n_iter)
    err = np.linalg.norm(np.where(mask, (M * scale - fit.left @ fit.right) / scale, 0)) / np.linalg.norm(M[mask])
    ref_err = np.linalg.norm(np.where(mask, M - ref.left @ ref.right, 0)) / np.linalg.norm(M[mask])
    assert err == pytest.approx(ref_err, rel=1e-6)
    assert np.all(fit.left != 0)


@pytest.mark.parametrize("scale", [1e-30, 1e-37, 1e30, 1e37])
def test_float32_als_at_extreme_scales_fits_as_at_scale_one(scale):
    M = noisy_rank3(np.float32)
    fit = als(M * np.float32(scale), 3, random_state=0)  # was relative error 1.0 at 1e-30: the noise floor underflowed
    M64 = M.astype(np.float64)
    rel = np.linalg.norm(M64 * scale - fit.left.astype(np.float64) @ fit.right.astype(np.float64))
    best = eckart_young_errors(np.linalg.svd(M64, compute_uv=False))[3] / np.linalg.norm(M64)
    assert rel / (np.linalg.norm(M64) * scale) == pytest.approx(best, rel=1e-3)


@pytest.mark.parametrize("scale", [1e-170, 1e160])
def test_lowrank_error_at_extreme_scales(scale):
    M = noisy_rank3()
    lr = truncated_svd(M * scale, 2).to_lowrank()
    s = np.linalg.svd(M, compute_uv=False)
    want = np.sqrt(np.sum(s[2:] ** 2) / np.sum(s**2))  # Eckart–Young, by hand at scale 1
    assert lr.error(M * scale, relative=True) == pytest.approx(want, rel=1e-10)  # was 0.0 and nan
    assert lr.error(M * scale) / scale == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)), rel=1e-10)


def test_planted_fit_is_exact_at_the_bottom_of_float64():
    M = planted(9, 7, 2, seed=3) * 2.0**-1000  # entries near 1e-301, their squares 0 in float64
    fit = als(M, 2, random_state=0)
    assert fit.converged
    np.testing.assert_allclose(fit.left @ fit.right, M, rtol=0, atol=1e-12 * np.abs(M).max())


def test_the_module_exports_its_scaling_helpers():
    from lowrank.factor.lowrank_matrix import magnitude_exponent, times_power_of_two

    x = np.array([0.3, -5.0, 2.0**-1070])
    e = magnitude_exponent(x)
    assert e == 3 and 0.5 <= np.abs(times_power_of_two(x, -e)).max() < 1
    tiny = np.array([3 * 2.0**-1074, -(2.0**-1070)])  # subnormals
    assert magnitude_exponent(tiny) == -1069
    np.testing.assert_array_equal(times_power_of_two(tiny, 1073), [1.5, -8.0])  # 2**1073 itself overflows
    np.testing.assert_array_equal(times_power_of_two(np.array([1.5, -8.0]), -1073), tiny)
    assert lowrank.factor.lowrank_matrix.magnitude_exponent(np.zeros(3)) == 0
