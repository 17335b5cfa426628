"""randomized_svd and its two stages (randomized_range_finder, svd_in_range): seeded bits, accuracy
against the Eckart–Young optimum and numpy.linalg.svd's subspaces, wide input, layouts, dtypes, errors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    FLOAT_DTYPES,
    SEEDS,
    any_dtype_matrices,
    as_layout,
    assert_sign_rule,
    canonical,
    decaying_matrices,
    expected_float_dtype,
    follow_signs_on_ties,
    lapack_tol,
    legacy_global_state,
    matrices,
    matrices_and_ranks,
    planted_low_rank,
    planted_matrices,
    rtol_for,
    with_spectrum,
)

from lowrank import randomized_svd
from lowrank.factor import randomized_range_finder, subspace_iteration, svd_in_range

# The factor the randomized_svd docstring documents: at the defaults, on spectra that
# decay geometrically or faster than 1/i, the Frobenius error is within 1.05 of optimal.
DOCUMENTED_FACTOR = 1.05


def frobenius_error(M: np.ndarray, svd) -> float:
    M64 = M.astype(np.float64)
    return float(np.linalg.norm(M64 - (svd.U.astype(np.float64) * svd.s) @ svd.Vt.astype(np.float64)))


def decaying(m: int, n: int, seed: int, kind: str, dtype=np.float64) -> np.ndarray:
    """A matrix with a decaying spectrum plus a little dense noise."""
    p = min(m, n)
    i = np.arange(p)
    s = {"geometric": 0.9**i, "fast": 0.7**i, "power": (i + 1.0) ** -2}[kind]
    M = with_spectrum(m, n, s, seed)
    M += 1e-3 * np.random.default_rng(seed + 7).standard_normal((m, n)) / np.sqrt(max(m, n))
    return M.astype(dtype)


def gapped_spectrum(p: int) -> np.ndarray:
    """Top five singular values 10, 9, 8, 7, 6, then a tail below 0.5: a wide spectral gap."""
    return np.concatenate([[10.0, 9.0, 8.0, 7.0, 6.0], 0.5 * 0.9 ** np.arange(p - 5)])


def subspace_distance(Q: np.ndarray, U: np.ndarray) -> float:
    """``‖(I − Q Qᵀ) U‖_2``: the sine of the largest angle between span(U) and its projection on span(Q)."""
    Q, U = Q.astype(np.float64), U.astype(np.float64)
    return float(np.linalg.norm(U - Q @ (Q.T @ U), 2))


# ---------------------------------------------------------------- same seed, same bits


@settings(max_examples=10)
@given(seed=SEEDS, wide=st.booleans(), dtype=FLOAT_DTYPES)
def test_same_seed_same_bits(seed, wide, dtype):
    M = decaying(40, 25, 3, "geometric", dtype)
    M = M.T.copy() if wide else M
    runs = [
        randomized_svd(M, 4, n_iter=1, random_state=seed),
        randomized_svd(M, 4, n_iter=1, random_state=seed),
        randomized_svd(M, 4, n_iter=1, random_state=np.random.default_rng(seed)),
        randomized_svd(M, 4, n_iter=1, random_state=np.random.default_rng(seed)),
    ]
    for other in runs[1:]:
        for a, b in ((runs[0].U, other.U), (runs[0].s, other.s), (runs[0].Vt, other.Vt)):
            assert a.tobytes() == b.tobytes()


def test_different_seeds_differ_and_global_state_is_untouched():
    M = decaying(60, 40, 0, "power")
    before = legacy_global_state()
    a = randomized_svd(M, 3, n_iter=0, random_state=1)
    b = randomized_svd(M, 3, n_iter=0, random_state=2)
    randomized_svd(M, 3, n_iter=0)  # None: fresh entropy, still not the global state
    assert legacy_global_state() == before
    assert a.s.tobytes() != b.s.tobytes()


def test_a_generator_is_used_not_copied():
    M = decaying(60, 40, 0, "power")
    rng = np.random.default_rng(5)
    a = randomized_svd(M, 3, n_iter=0, random_state=rng)
    b = randomized_svd(M, 3, n_iter=0, random_state=rng)  # the stream has advanced
    assert a.s.tobytes() != b.s.tobytes()


# ---------------------------------------------------------------- accuracy


@settings(max_examples=20)
@given(Ms=decaying_matrices(), rank=st.integers(1, 10), random_state=SEEDS)
def test_error_within_the_documented_factor_of_optimal_on_decaying_spectra(Ms, rank, random_state):
    M, s = Ms
    dtype = M.dtype
    svd = randomized_svd(M, rank, random_state=random_state)
    err, best = frobenius_error(M, svd), float(np.sqrt(np.sum(s[rank:] ** 2)))  # Eckart–Young, by hand
    assert best <= err * (1 + rtol_for(dtype))  # nothing beats Eckart–Young
    assert err <= DOCUMENTED_FACTOR * best, f"error {err} vs optimal {best}: ratio {err / best}"


@settings(max_examples=10)
@given(M=planted_matrices(40, 25, gapped_spectrum(25)).flatmap(as_layout), random_state=SEEDS, wide=st.booleans())
def test_enough_power_iterations_match_the_exact_top_singular_triplets(M, random_state, wide):
    M = M.T if wide else M
    svd = randomized_svd(M, 5, n_iter=10, random_state=random_state)
    U, _, Vt = np.linalg.svd(M, full_matrices=False)
    U, Vt = canonical(U[:, :5], Vt[:5])
    np.testing.assert_allclose(svd.s, gapped_spectrum(25)[:5], rtol=1e-10)
    # signs are canonical, so the singular vectors themselves agree, not only the subspaces
    got_U, got_Vt = follow_signs_on_ties(svd.U, svd.Vt, U, 1e-8)
    np.testing.assert_allclose(got_U, U, atol=1e-8)
    np.testing.assert_allclose(got_Vt, Vt, atol=1e-8)


@settings(max_examples=10)
@given(Ms=decaying_matrices(), random_state=SEEDS, rank=st.integers(1, 8))
def test_wide_input_is_as_accurate_as_tall(Ms, random_state, rank):
    M, s = Ms
    dtype = M.dtype
    tall = randomized_svd(M, rank, random_state=random_state)
    wide = randomized_svd(M.T, rank, random_state=random_state)
    assert wide.U.shape == (M.shape[1], rank) and wide.Vt.shape == (rank, M.shape[0])
    best = float(np.sqrt(np.sum(s[rank:] ** 2)))
    assert frobenius_error(M.T, wide) <= DOCUMENTED_FACTOR * best
    assert frobenius_error(M, tall) <= DOCUMENTED_FACTOR * best
    np.testing.assert_allclose(wide.s, tall.s, rtol=100 * rtol_for(dtype))
    assert_sign_rule(wide.U)


@given(Mr=matrices_and_ranks())
def test_exact_when_the_sketch_covers_the_whole_matrix(Mr):
    # rank + oversample >= min(m, n): the sketch is capped at min(m, n) and spans everything
    M, r = Mr
    svd = randomized_svd(M, r, oversample=min(M.shape), random_state=0)
    s_ref = np.linalg.svd(M.astype(np.float64), compute_uv=False)
    tol = lapack_tol(M.dtype, max(M.shape)) * 10
    np.testing.assert_allclose(svd.s, s_ref[:r], atol=tol * s_ref[0])
    E2 = frobenius_error(M, svd) ** 2
    assert abs(E2 - np.sum(s_ref[r:] ** 2)) <= rtol_for(M.dtype) * np.sum(s_ref**2)
    assert_sign_rule(svd.U)
    U = svd.U.astype(np.float64)
    np.testing.assert_allclose(U.T @ U, np.eye(r), atol=tol)


@settings(max_examples=15)
@given(Mk=planted_low_rank(), random_state=SEEDS, wide=st.booleans())
def test_planted_rank_recovered_without_oversampling_or_power_iterations(Mk, random_state, wide):
    M, true_rank = Mk
    dtype = M.dtype
    M = M.T if wide else M
    svd = randomized_svd(M, true_rank, oversample=0, n_iter=0, random_state=random_state)
    assert frobenius_error(M, svd) <= 100 * rtol_for(dtype) * np.linalg.norm(M.astype(np.float64))


def test_n_iter_auto_follows_the_documented_rule():
    M = decaying(60, 50, 1, "power")
    # rank < 0.1 * min(m, n) = 5: auto means 7 power iterations, else 4
    for rank, n_iter in ((4, 7), (5, 4), (20, 4)):
        auto = randomized_svd(M, rank, n_iter="auto", random_state=9)
        fixed = randomized_svd(M, rank, n_iter=n_iter, random_state=9)
        assert auto.s.tobytes() == fixed.s.tobytes(), (rank, n_iter)
        assert auto.U.tobytes() == fixed.U.tobytes(), (rank, n_iter)


def test_full_rank_and_sketch_larger_than_the_matrix():
    M = decaying(9, 7, 2, "geometric")
    svd = randomized_svd(M, 7, oversample=50, n_iter=0, random_state=0)
    np.testing.assert_allclose(svd.s, np.linalg.svd(M, compute_uv=False), rtol=1e-12)


@given(Ms=decaying_matrices(10, 20, dtype=np.float64), rank=st.integers(1, 5))
def test_input_is_not_modified_and_any_layout_gives_the_answer_of_a_c_copy(Ms, rank):
    M, _ = Ms  # C, Fortran, strided or negative-stride
    before = M.copy()
    a = randomized_svd(M, rank, n_iter=2, random_state=0)
    assert np.array_equal(M, before)
    b = randomized_svd(np.ascontiguousarray(M), rank, n_iter=2, random_state=0)
    np.testing.assert_allclose(a.s, b.s, rtol=1e-12)
    np.testing.assert_allclose(a.U, b.U, atol=1e-10)
    np.testing.assert_allclose(a.Vt, b.Vt, atol=1e-10)


@pytest.mark.parametrize("shape", [(5000, 20), (20, 5000)])
def test_never_forms_a_dense_matrix_larger_than_the_input(shape):
    M = np.random.default_rng(0).standard_normal(shape)
    tracemalloc.start()
    try:
        randomized_svd(M, 3, n_iter=2, random_state=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a (5000, 5000) float64 intermediate would be 200 MB; a few input-sized arrays are fine
    assert peak < 4 * M.nbytes, f"peak {peak / 1e6:.1f} MB for a {M.nbytes / 1e6:.1f} MB input"


# ---------------------------------------------------------------- dtypes


@given(M=any_dtype_matrices(2, 12))
def test_dtype_rule(M):
    want = expected_float_dtype(M.dtype)
    svd = randomized_svd(M, 1, random_state=0)
    assert svd.U.dtype == want and svd.s.dtype == want and svd.Vt.dtype == want
    s_ref = np.linalg.svd(M.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(svd.s, s_ref[:1], atol=lapack_tol(want, 12) * 10 * max(s_ref[0], 1))
    assert_sign_rule(svd.U)


# ---------------------------------------------------------------- the range finder and svd_in_range


@settings(max_examples=15)
@given(M=matrices(2, 12), data=st.data(), n_iter=st.integers(0, 3), random_state=SEEDS)
def test_range_finder_returns_orthonormal_columns_of_the_dtype(M, data, n_iter, random_state):
    size = data.draw(st.integers(1, min(M.shape)), label="size")
    Q = randomized_range_finder(M, size, n_iter=n_iter, random_state=random_state)
    assert Q.shape == (M.shape[0], size) and Q.dtype == M.dtype
    tol = 1e-12 if M.dtype == np.float64 else lapack_tol(np.float32, M.shape[0])
    np.testing.assert_allclose(Q.astype(np.float64).T @ Q.astype(np.float64), np.eye(size), rtol=0, atol=tol)


@settings(max_examples=15)
@given(
    M=planted_matrices(40, 30, gapped_spectrum(30)).flatmap(as_layout),
    extra=st.integers(0, 5),
    random_state=SEEDS,
    wide=st.booleans(),
)
def test_range_finder_spans_the_top_singular_vectors_of_numpy_svd(M, extra, random_state, wide):
    # top five singular values 10..6, the rest below 0.5: after q power iterations the part of the
    # top-5 subspace that Q misses shrinks like (0.5 / 6)^(2q+1); at q = 4 that is 1e-10
    M = M.T if wide else M
    Q = randomized_range_finder(M, 5 + extra, n_iter=4, random_state=random_state)
    U = np.linalg.svd(M, full_matrices=False)[0][:, :5]  # (m, 5), the independent reference
    assert subspace_distance(Q, U) < 1e-6
    np.testing.assert_allclose(Q.T @ Q, np.eye(5 + extra), rtol=0, atol=1e-12)


@given(Mk=planted_low_rank(), extra=st.integers(0, 3), random_state=SEEDS)
def test_range_finder_captures_an_exactly_low_rank_matrix_without_power_iterations(Mk, extra, random_state):
    M, true_rank = Mk
    Q = randomized_range_finder(M, true_rank + extra, n_iter=0, random_state=random_state)
    M64, Q64 = M.astype(np.float64), Q.astype(np.float64)
    residual = np.linalg.norm(M64 - Q64 @ (Q64.T @ M64))  # ‖(I − Q Qᵀ) M‖_F
    assert residual <= 100 * rtol_for(M.dtype) * np.linalg.norm(M64)


def test_range_finder_same_seed_same_bits_and_a_generator_advances():
    M = with_spectrum(30, 20, 0.8 ** np.arange(20), 0)
    a = randomized_range_finder(M, 6, n_iter=2, random_state=7)
    b = randomized_range_finder(M, 6, n_iter=2, random_state=np.random.default_rng(7))
    assert a.tobytes() == b.tobytes()
    rng = np.random.default_rng(7)
    randomized_range_finder(M, 6, n_iter=2, random_state=rng)
    assert randomized_range_finder(M, 6, n_iter=2, random_state=rng).tobytes() != a.tobytes()


def test_subspace_iteration_takes_scipy_sparse_input():
    sparse = pytest.importorskip("scipy.sparse")
    dense = with_spectrum(40, 30, gapped_spectrum(30), 1)
    dense[np.abs(dense) < 0.1] = 0.0  # some structural zeros; the spectrum is now whatever it is
    Q = subspace_iteration(sparse.csr_matrix(dense), 8, 4, np.random.default_rng(0))  # (40, 8)
    assert isinstance(Q, np.ndarray) and Q.shape == (40, 8)
    U = np.linalg.svd(dense, full_matrices=False)[0][:, :5]
    assert subspace_distance(Q, U) < 1e-6


@given(Ms=decaying_matrices(10, 20, dtype=np.float64), data=st.data())
def test_svd_in_range_of_the_exact_singular_vectors_is_the_truncated_svd(Ms, data):
    M, s = Ms
    k = data.draw(st.integers(1, min(M.shape)), label="k")
    rank = data.draw(st.integers(1, k), label="rank")
    U_ref, _, Vt_ref = np.linalg.svd(M, full_matrices=False)
    svd = svd_in_range(M, U_ref[:, :k], rank)  # Q Qᵀ M is M's best rank-k approximation
    U_ref, Vt_ref = canonical(U_ref[:, :rank], Vt_ref[:rank])
    np.testing.assert_allclose(svd.s, s[:rank], rtol=1e-12)
    U, Vt = follow_signs_on_ties(svd.U, svd.Vt, U_ref, 1e-8)
    np.testing.assert_allclose(U, U_ref, atol=1e-8)
    np.testing.assert_allclose(Vt, Vt_ref, atol=1e-8)


@pytest.mark.parametrize("size", [0, -1, 6, 100])
def test_range_finder_size_out_of_range(size):
    with pytest.raises(ValueError, match=rf"size must be in \[1, min\(m, n\)\] = \[1, 5\], got {size}"):
        randomized_range_finder(np.ones((6, 5)), size, n_iter=1)


@pytest.mark.parametrize("kw", [{"size": 2.0}, {"size": None}, {"n_iter": "auto"}, {"n_iter": 1.5}])
def test_range_finder_non_integer_size_or_n_iter(kw):
    args = {"size": 2, "n_iter": 1, **kw}
    with pytest.raises(TypeError, match=next(iter(kw))):
        randomized_range_finder(np.ones((6, 5)), args["size"], n_iter=args["n_iter"])


def test_range_finder_refuses_bad_matrices_and_negative_n_iter():
    with pytest.raises(ValueError, match="n_iter must be in"):
        randomized_range_finder(np.ones((6, 5)), 2, n_iter=-1)
    bad = np.ones((6, 5))
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"M must be finite, got inf at index \(3, 1\)"):
        randomized_range_finder(bad, 2, n_iter=1)
    with pytest.raises(ValueError, match="M must be a 2-D matrix"):
        randomized_range_finder(np.ones(5), 1, n_iter=1)
    with pytest.raises(TypeError, match="M"):
        randomized_range_finder(np.ones((3, 3), np.complex128), 1, n_iter=1)
    with pytest.raises(TypeError, match="n_iter"):
        randomized_range_finder(np.ones((3, 3)), 1)  # n_iter is required, keyword-only


# ---------------------------------------------------------------- errors (the shared ones are in test_svd.py)

M = np.random.default_rng(0).standard_normal((6, 5))


@pytest.mark.parametrize("oversample", [-1, -10])
def test_negative_oversample(oversample):
    with pytest.raises(ValueError, match=rf"oversample must .*got {oversample}"):
        randomized_svd(M, 2, oversample=oversample)


@pytest.mark.parametrize("oversample", [2.5, "10", None, True])
def test_oversample_not_an_integer(oversample):
    with pytest.raises(TypeError, match="oversample"):
        randomized_svd(M, 2, oversample=oversample)


@pytest.mark.parametrize("n_iter", [-1, "fast", "Auto", ""])
def test_bad_n_iter_value(n_iter):
    with pytest.raises(ValueError, match="n_iter"):
        randomized_svd(M, 2, n_iter=n_iter)


@pytest.mark.parametrize("n_iter", [1.5, None, True])
def test_n_iter_not_an_integer(n_iter):
    with pytest.raises(TypeError, match="n_iter"):
        randomized_svd(M, 2, n_iter=n_iter)


@pytest.mark.parametrize("random_state", [1.5, "0", True, np.random.RandomState(0)])
def test_bad_random_state_type(random_state):
    with pytest.raises(TypeError, match="random_state"):
        randomized_svd(M, 2, random_state=random_state)


def test_negative_seed():
    with pytest.raises(ValueError, match="random_state"):
        randomized_svd(M, 2, random_state=-3)
