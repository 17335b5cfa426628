"""The SVDs on scipy.sparse matrices and linear operators: the same factors as the dense form, numpy.linalg.svd's
answer where the sketch covers everything, never densified, named errors; and orthonormalize, the CholeskyQR2 core."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import (
    FLOAT_DTYPES,
    SEEDS,
    SPARSE_FORMATS,
    assert_sign_rule,
    canonical,
    float_arrays,
    gapped_problems,
    lapack_tol,
    planted_matrices,
    rtol_for,
    sparse_matrices,
)

from lowrank import randomized_svd, truncated_svd
from lowrank.factor import randomized_range_finder
from lowrank.factor.svd import orthonormalize
from lowrank.utils.validation import is_scipy_sparse

sparse = pytest.importorskip("scipy.sparse")
splinalg = pytest.importorskip("scipy.sparse.linalg")


def as_format(M: np.ndarray, fmt: str):
    """The dense ``M`` as a scipy.sparse matrix (or array) of format ``fmt``, zeros not stored."""
    if fmt == "csr_array":
        return sparse.csr_array(M)
    return sparse.csr_matrix(M).asformat(fmt)


class MatvecOnly:
    """A linear operator of the user's own: shape, dtype, matvec, rmatvec and nothing else (no matmat)."""

    def __init__(self, M: np.ndarray) -> None:
        self.M, self.shape, self.dtype = M, M.shape, M.dtype
        self.calls = 0

    def matvec(self, x):
        self.calls += 1
        return self.M @ x

    def rmatvec(self, y):
        self.calls += 1
        return self.M.T @ y


class Blocks(MatvecOnly):
    """The same with matmat and rmatmat, which must be preferred: one call per block."""

    def matmat(self, X):
        self.calls += 1
        return self.M @ X

    def rmatmat(self, Y):
        self.calls += 1
        return self.M.T @ Y


def frobenius_error(M: np.ndarray, svd) -> float:
    M64 = M.astype(np.float64)
    return float(np.linalg.norm(M64 - (svd.U.astype(np.float64) * svd.s) @ svd.Vt.astype(np.float64)))


def assert_same_factors(a, b, tol):
    np.testing.assert_allclose(a.s, b.s, rtol=0, atol=tol * max(float(b.s[0]), 1.0))
    np.testing.assert_allclose(a.U, b.U, rtol=0, atol=tol)
    np.testing.assert_allclose(a.Vt, b.Vt, rtol=0, atol=tol)


# ---------------------------------------------------------------- sparse and dense input, same seed


@settings(max_examples=15)
@given(problem=gapped_problems(), fmt=SPARSE_FORMATS, seed=SEEDS, wide=st.booleans())
def test_sparse_input_gives_the_dense_inputs_factors_and_numpys(problem, fmt, seed, wide):
    M, s, rank = problem
    M = np.ascontiguousarray(M.T if wide else M)
    ours = randomized_svd(as_format(M, fmt), rank, random_state=seed)
    dense = randomized_svd(M, rank, random_state=seed)
    assert_same_factors(ours, dense, 1e-10)  # the same algorithm on the same numbers: equal to rounding
    U, _, Vt = np.linalg.svd(M, full_matrices=False)  # and the independent reference
    U, Vt = canonical(U[:, :rank], Vt[:rank])
    np.testing.assert_allclose(ours.s, s[:rank], rtol=1e-10)
    np.testing.assert_allclose(ours.U, U, atol=1e-8)
    np.testing.assert_allclose(ours.Vt, Vt, atol=1e-8)


@settings(max_examples=20)
@given(M=sparse_matrices(), fmt=SPARSE_FORMATS, data=st.data(), seed=SEEDS)
def test_structural_zeros_with_a_sketch_that_covers_everything_give_numpys_svd(M, fmt, data, seed):
    rank = data.draw(st.integers(1, min(M.shape)), label="rank")
    ours = randomized_svd(as_format(M, fmt), rank, oversample=min(M.shape), random_state=seed)
    assert ours.U.dtype == M.dtype and ours.s.dtype == M.dtype and ours.Vt.dtype == M.dtype
    s_ref = np.linalg.svd(M.astype(np.float64), compute_uv=False)
    tol = lapack_tol(M.dtype, max(M.shape)) * 10
    np.testing.assert_allclose(ours.s, s_ref[:rank], rtol=0, atol=tol * max(s_ref[0], 1.0))
    E2 = frobenius_error(M, ours) ** 2  # Eckart–Young: the optimum is the tail's energy
    assert abs(E2 - np.sum(s_ref[rank:] ** 2)) <= rtol_for(M.dtype) * max(np.sum(s_ref**2), 1.0)
    assert_sign_rule(ours.U)
    dense = randomized_svd(M, rank, oversample=min(M.shape), random_state=seed)
    np.testing.assert_allclose(ours.s, dense.s, rtol=0, atol=tol * max(s_ref[0], 1.0))


@settings(max_examples=10)
@given(problem=gapped_problems(), seed=SEEDS, fmt=SPARSE_FORMATS)
def test_range_finder_on_sparse_input_spans_numpys_top_singular_vectors(problem, seed, fmt):
    M, _, rank = problem
    Q = randomized_range_finder(as_format(np.ascontiguousarray(M), fmt), rank + 2, n_iter=4, random_state=seed)
    assert isinstance(Q, np.ndarray) and Q.shape == (M.shape[0], rank + 2)
    U = np.linalg.svd(M, full_matrices=False)[0][:, :rank]
    assert np.linalg.norm(U - Q @ (Q.T @ U), 2) < 1e-6  # sin of the largest angle between the subspaces
    np.testing.assert_allclose(Q.T @ Q, np.eye(rank + 2), atol=1e-12)


def test_same_seed_same_bits_on_sparse_input():
    M = sparse.random(60, 40, density=0.2, format="csr", rng=np.random.default_rng(0))
    a, b = randomized_svd(M, 4, random_state=3), randomized_svd(M, 4, random_state=np.random.default_rng(3))
    assert a.U.tobytes() == b.U.tobytes() and a.s.tobytes() == b.s.tobytes() and a.Vt.tobytes() == b.Vt.tobytes()


@pytest.mark.parametrize("dtype, want", [(np.float32, np.float32), (np.float64, np.float64), (np.int64, np.float64)])
def test_dtype_rule_on_sparse_input(dtype, want):
    counts = lambda k: np.arange(1, k + 1)  # noqa: E731  (integers, exact in every dtype)
    M = sparse.random(30, 20, density=0.3, format="csr", rng=np.random.default_rng(1), data_rvs=counts).astype(dtype)
    svd = randomized_svd(M, 2, random_state=0)
    assert svd.U.dtype == want and svd.s.dtype == want and svd.Vt.dtype == want
    s_ref = np.linalg.svd(M.toarray().astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(svd.s[0], s_ref[0], rtol=rtol_for(want))


@pytest.mark.parametrize("exponent", [-900, 700])
def test_sparse_input_far_from_unit_scale_is_scaled_exactly(exponent):
    M = sparse.random(40, 30, density=0.3, format="csr", rng=np.random.default_rng(2))
    big = M.copy()
    big.data = np.ldexp(big.data, exponent)  # exact
    ours = randomized_svd(big, 3, oversample=30, random_state=5)  # the sketch covers everything: exact
    s_ref = np.linalg.svd(M.toarray(), compute_uv=False)[:3]
    np.testing.assert_allclose(np.ldexp(ours.s, -exponent), s_ref, rtol=1e-12)
    assert np.all(np.isfinite(ours.U)) and np.all(np.isfinite(ours.Vt))


def test_a_wide_sparse_matrix_is_never_densified():
    # dense, this would be 4000 × 20000 × 8 bytes = 640 MB; its 8,000 stored entries take 100 kB
    rng = np.random.default_rng(0)
    M = sparse.random(4000, 20000, density=1e-4, format="csr", rng=rng)
    tracemalloc.start()
    try:
        svd = randomized_svd(M, 3, n_iter=2, random_state=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert svd.U.shape == (4000, 3) and svd.Vt.shape == (3, 20000)
    assert peak < 20e6, f"peak {peak / 1e6:.1f} MB"  # a few (20000, 13) blocks


# ---------------------------------------------------------------- linear operators


@settings(max_examples=10)
@given(problem=gapped_problems(), seed=SEEDS, kind=st.sampled_from(["scipy", "matvec", "blocks"]), wide=st.booleans())
def test_a_linear_operator_gives_the_dense_factors(problem, seed, kind, wide):
    M, s, rank = problem
    M = np.ascontiguousarray(M.T if wide else M)
    op = {"scipy": splinalg.aslinearoperator, "matvec": MatvecOnly, "blocks": Blocks}[kind](M)
    ours = randomized_svd(op, rank, n_iter=3, random_state=seed)
    assert_same_factors(ours, randomized_svd(M, rank, n_iter=3, random_state=seed), 1e-10)
    np.testing.assert_allclose(ours.s, s[:rank], rtol=1e-8)


def test_matmat_is_preferred_over_a_loop_of_matvecs():
    M = np.random.default_rng(0).standard_normal((30, 20))
    looped, blocks = MatvecOnly(M), Blocks(M)
    randomized_svd(looped, 2, oversample=3, n_iter=1, random_state=0)
    randomized_svd(blocks, 2, oversample=3, n_iter=1, random_state=0)
    # one block of 5 columns per product: Ω, then Mᵀ and M once each, then Qᵀ M
    assert blocks.calls == 4 and looped.calls == 4 * 5


@settings(max_examples=10)
@given(problem=gapped_problems(), fmt=SPARSE_FORMATS, operator=st.booleans())
def test_truncated_svd_of_sparse_or_operator_input_is_numpys(problem, fmt, operator):
    M, s, rank = problem
    M = np.ascontiguousarray(M)
    A = splinalg.aslinearoperator(sparse.csr_matrix(M)) if operator else as_format(M, fmt)
    ours = truncated_svd(A, rank)
    U, _, Vt = np.linalg.svd(M, full_matrices=False)
    U, Vt = canonical(U[:, :rank], Vt[:rank])
    np.testing.assert_allclose(ours.s, s[:rank], rtol=1e-10)
    np.testing.assert_allclose(ours.U, U, atol=1e-8)
    np.testing.assert_allclose(ours.Vt, Vt, atol=1e-8)
    assert truncated_svd(A, rank).U.tobytes() == ours.U.tobytes()  # a fixed start vector: the same every call


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_truncated_svd_of_sparse_input_keeps_the_dtype(dtype):
    M = sparse.random(30, 20, density=0.3, format="csr", rng=np.random.default_rng(4)).astype(dtype)
    svd = truncated_svd(M, 3)
    assert svd.U.dtype == dtype and svd.s.dtype == dtype and svd.Vt.dtype == dtype
    np.testing.assert_allclose(svd.s, np.linalg.svd(M.toarray(), compute_uv=False)[:3], rtol=rtol_for(dtype))


# ---------------------------------------------------------------- errors


def test_an_operator_missing_attributes_is_named():
    class NoAdjoint:
        shape, dtype = (3, 2), np.float64

        def matvec(self, x):
            return np.zeros(3)

    with pytest.raises(TypeError, match=r"linear operator with shape, dtype, matvec and rmatvec.*without rmatvec"):
        randomized_svd(NoAdjoint(), 1)


@pytest.mark.parametrize(
    "shape, match", [((3,), r"M.shape must be a pair"), ((3, 2.0), r"M.shape must be a pair"), ((0, 2), "non-empty")]
)
def test_an_operator_with_a_bad_shape(shape, match):
    op = MatvecOnly(np.ones((3, 2)))
    op.shape = shape
    with pytest.raises(ValueError, match=match):
        randomized_svd(op, 1)


def test_an_operator_of_complex_dtype_is_refused():
    op = MatvecOnly(np.ones((3, 2), np.complex128))
    with pytest.raises(TypeError, match=r"M must hold real numbers.*complex128"):
        randomized_svd(op, 1)


def test_an_operator_whose_product_has_the_wrong_shape_is_named():
    class Wrong(MatvecOnly):
        def rmatvec(self, y):
            return np.zeros(7)

    message = r"M.rmatvec must return shape \(2,\) for an input of shape \(3,\).*got \(7,\)"
    with pytest.raises(ValueError, match=message):
        randomized_svd(Wrong(np.ones((3, 2))), 1)


def test_a_block_product_returned_flat_is_refused_not_reshaped():
    """matmat returning the (m, c) block as one flat vector, column after column: reshaping it row-major would
    scramble the entries, so it is refused like any other wrong shape."""

    class Flat(Blocks):
        def matmat(self, X):
            return np.concatenate([self.M @ X[:, j] for j in range(X.shape[1])])  # (m * c,), column-major

    with pytest.raises(ValueError, match=r"M.matmat must return shape \(6, 2\) .*got \(12,\)"):
        randomized_svd(Flat(np.arange(30.0).reshape(6, 5) % 7), 2, oversample=0)


def test_an_operator_returning_nan_is_a_floating_point_error():
    class Broken(Blocks):
        def matmat(self, X):
            return np.full((self.shape[0], X.shape[1]), np.nan)

    with pytest.raises(FloatingPointError, match="M's products are not finite"):
        randomized_svd(Broken(np.ones((6, 4))), 2)


def test_a_non_finite_stored_entry_is_named_by_its_index():
    M = sparse.csr_matrix(np.eye(4))
    M.data[2] = np.inf  # the entry at (2, 2)
    for fmt in ("csr", "csc", "coo"):
        with pytest.raises(ValueError, match=r"M must be finite, got inf at index \(2, 2\)"):
            randomized_svd(M.asformat(fmt), 1)
        with pytest.raises(ValueError, match=r"M must be finite, got inf at index \(2, 2\)"):
            truncated_svd(M.asformat(fmt), 1)


def test_sparse_shapes_and_ranks_are_checked():
    with pytest.raises(ValueError, match="non-empty"):
        randomized_svd(sparse.csr_matrix((0, 3)), 1)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\)\] = \[1, 3\], got 4"):
        randomized_svd(sparse.eye(3, format="csr"), 4)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\) - 1\].* = \[1, 2\], got 3"):
        truncated_svd(sparse.eye(3, format="csr"), 3)  # ARPACK's limit
    with pytest.raises(ValueError, match="energy needs every singular value"):
        truncated_svd(sparse.eye(3, format="csr"), energy=0.9)
    if hasattr(sparse, "coo_array"):
        vector = sparse.coo_array(np.ones(3))
        if vector.ndim == 1:
            with pytest.raises(ValueError, match="M must be a 2-D matrix"):
                randomized_svd(vector, 1)


def test_an_all_zero_sparse_matrix_has_zero_singular_values():
    svd = randomized_svd(sparse.csr_matrix((20, 10)), 2, random_state=0)
    assert np.all(svd.s == 0) and np.all(np.isfinite(svd.U))


def test_is_scipy_sparse_tells_matrices_from_operators():
    class Mine(sparse.csr_matrix):
        pass

    assert is_scipy_sparse(sparse.eye(3)) and is_scipy_sparse(sparse.csr_array((2, 2)))
    assert is_scipy_sparse(Mine((2, 2)))
    assert not is_scipy_sparse(splinalg.aslinearoperator(sparse.eye(3)))
    assert not is_scipy_sparse(np.eye(3))


# ---------------------------------------------------------------- orthonormalize


@settings(max_examples=25)
@given(data=st.data(), dtype=FLOAT_DTYPES)
def test_orthonormalize_spans_the_columns_with_orthonormal_columns(data, dtype):
    m = data.draw(st.integers(1, 40), label="m")
    k = data.draw(st.integers(1, m), label="k")
    Y = data.draw(float_arrays(dtype, (m, k)), label="Y")  # zero, rank-deficient and well-conditioned ones alike
    Q = orthonormalize(Y)
    assert Q.shape == (m, k) and Q.dtype == dtype
    Q64, Y64 = Q.astype(np.float64), Y.astype(np.float64)
    tol = lapack_tol(dtype, m)
    np.testing.assert_allclose(Q64.T @ Q64, np.eye(k), rtol=0, atol=tol)
    np.testing.assert_allclose(Q64 @ (Q64.T @ Y64), Y64, rtol=0, atol=tol * max(np.linalg.norm(Y64), 1.0))


@settings(max_examples=15)
@given(Y=planted_matrices(200, 8, np.linspace(3.0, 1.0, 8)))
def test_orthonormalize_of_a_well_conditioned_block_is_householders_up_to_signs(Y):
    Q = orthonormalize(Y)  # condition 3: the CholeskyQR2 path
    H = np.linalg.qr(Y)[0]
    np.testing.assert_allclose(np.abs(Q), np.abs(H), atol=1e-13)
    np.testing.assert_allclose(Q.T @ Q, np.eye(8), atol=1e-14)


@settings(max_examples=10)
@given(Y=planted_matrices(200, 8, np.linspace(3.0, 1.0, 8)))
def test_one_pass_of_orthonormalize_spans_the_same_columns(Y):
    Q = orthonormalize(Y, refine=False)  # condition 3: one CholeskyQR pass is orthonormal to ~cond² u
    np.testing.assert_allclose(Q.T @ Q, np.eye(8), atol=1e-13)
    np.testing.assert_allclose(Q @ (Q.T @ Y), Y, atol=1e-13)


@settings(max_examples=10)
@given(Y=planted_matrices(9000, 3, np.array([2.0, 1.5, 1.0])), refine=st.booleans())
def test_orthonormalize_in_place_gives_the_same_basis_and_uses_ys_memory(Y, refine):
    # 9000 rows: more than one block of rows is multiplied in place
    expected = orthonormalize(Y, refine=refine)
    work = Y.copy()
    Q = orthonormalize(work, refine=refine, overwrite=True)
    assert np.shares_memory(Q, work)
    np.testing.assert_allclose(Q, expected, atol=1e-14)
    np.testing.assert_allclose(expected.T @ expected, np.eye(3), atol=1e-13)
