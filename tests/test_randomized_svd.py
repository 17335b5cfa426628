"""randomized_svd: seeded bits, accuracy against the Eckart–Young optimum, wide input, dtypes, errors."""

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
    expected_float_dtype,
    lapack_tol,
    legacy_global_state,
    matrices_and_ranks,
    planted,
    rtol_for,
    with_spectrum,
)

from lowrank import randomized_svd, truncated_svd

# The factor the randomized_svd docstring documents: at the defaults, on spectra that
# decay geometrically or faster than 1/i, the Frobenius error is within 1.05 of optimal.
DOCUMENTED_FACTOR = 1.05


def frobenius_error(M: np.ndarray, svd) -> float:
    M64 = M.astype(np.float64)
    return float(np.linalg.norm(M64 - (svd.U.astype(np.float64) * svd.s) @ svd.Vt.astype(np.float64)))


def optimal_error(M: np.ndarray, rank: int) -> float:
    s = np.linalg.svd(M.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))


def assert_sign_rule(U: np.ndarray) -> None:
    for j in range(U.shape[1]):
        i = int(np.argmax(np.abs(U[:, j])))
        assert U[i, j] > 0, f"column {j}: largest-magnitude entry {U[i, j]} is not positive"


def decaying(m: int, n: int, seed: int, kind: str, dtype=np.float64) -> np.ndarray:
    """A matrix with a decaying spectrum plus a little dense noise."""
    p = min(m, n)
    i = np.arange(p)
    s = {"geometric": 0.9**i, "fast": 0.7**i, "power": (i + 1.0) ** -2}[kind]
    M = with_spectrum(m, n, s, seed)
    M += 1e-3 * np.random.default_rng(seed + 7).standard_normal((m, n)) / np.sqrt(max(m, n))
    return M.astype(dtype)


def gapped(m: int, n: int, seed: int, dtype=np.float64) -> np.ndarray:
    """Top five singular values 10, 9, 8, 7, 6, then a tail below 0.5: a wide spectral gap."""
    p = min(m, n)
    s = np.concatenate([[10.0, 9.0, 8.0, 7.0, 6.0], 0.5 * 0.9 ** np.arange(p - 5)])
    return with_spectrum(m, n, s, seed, dtype=dtype)


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
@given(
    m=st.integers(20, 60),
    n=st.integers(20, 60),
    rank=st.integers(1, 10),
    kind=st.sampled_from(["geometric", "fast", "power"]),
    seed=SEEDS,
    dtype=FLOAT_DTYPES,
    random_state=SEEDS,
)
def test_error_within_the_documented_factor_of_optimal_on_decaying_spectra(
    m, n, rank, kind, seed, dtype, random_state
):
    M = decaying(m, n, seed, kind, dtype)
    svd = randomized_svd(M, rank, random_state=random_state)
    err, best = frobenius_error(M, svd), optimal_error(M, rank)
    assert best <= err * (1 + rtol_for(dtype))  # nothing beats Eckart–Young
    assert err <= DOCUMENTED_FACTOR * best, f"error {err} vs optimal {best}: ratio {err / best}"


@settings(max_examples=10)
@given(seed=SEEDS, random_state=SEEDS, wide=st.booleans())
def test_enough_power_iterations_match_the_exact_top_singular_values(seed, random_state, wide):
    M = gapped(80, 50, seed)
    M = M.T.copy() if wide else M
    svd = randomized_svd(M, 5, n_iter=10, random_state=random_state)
    exact = truncated_svd(M, 5)
    np.testing.assert_allclose(svd.s, exact.s, rtol=1e-6)
    # signs are canonical, so the singular vectors themselves agree, not only the subspaces
    assert_sign_rule(svd.U)
    np.testing.assert_allclose(svd.U, exact.U, atol=1e-6)
    np.testing.assert_allclose(svd.Vt, exact.Vt, atol=1e-6)


@settings(max_examples=10)
@given(seed=SEEDS, random_state=SEEDS, rank=st.integers(1, 8), dtype=FLOAT_DTYPES)
def test_wide_input_is_as_accurate_as_tall(seed, random_state, rank, dtype):
    M = decaying(50, 30, seed, "geometric", dtype)
    tall = randomized_svd(M, rank, random_state=random_state)
    wide = randomized_svd(M.T, rank, random_state=random_state)
    assert wide.U.shape == (30, rank) and wide.Vt.shape == (rank, 50)
    best = optimal_error(M, rank)
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
@given(
    true_rank=st.integers(1, 5),
    seed=SEEDS,
    random_state=SEEDS,
    dtype=FLOAT_DTYPES,
    wide=st.booleans(),
)
def test_planted_rank_recovered_without_oversampling_or_power_iterations(
    true_rank, seed, random_state, dtype, wide
):
    M = planted(30, 20, true_rank, seed, dtype=dtype)
    M = M.T.copy() if wide else M
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


def test_input_is_not_modified_and_views_work():
    M = decaying(40, 30, 4, "geometric")
    before = M.copy()
    svd = randomized_svd(M, 3, random_state=0)
    assert np.array_equal(M, before)
    # a non-contiguous view gives the same answer as its contiguous copy
    view = np.asfortranarray(M)[:, ::2]
    a = randomized_svd(view, 3, random_state=0)
    b = randomized_svd(np.ascontiguousarray(view), 3, random_state=0)
    np.testing.assert_allclose(a.s, b.s, rtol=1e-12)
    np.testing.assert_allclose(a.U, b.U, atol=1e-10)
    assert svd.s.shape == (3,)


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
