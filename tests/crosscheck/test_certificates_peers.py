"""Certificates of factors computed by other libraries: scipy's svds, scikit-learn's randomized_svd, NumPy's SVD,
and the ``implicit`` library's ALS run long (the mapping of hyperparameters as in ``test_implicit.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from strategies import with_spectrum

from lowrank.factor.certificates import check_implicit_als, check_svd

sparse = pytest.importorskip("scipy.sparse")
splinalg = pytest.importorskip("scipy.sparse.linalg")


def decaying(m=60, n=45, seed=0):
    return with_spectrum(m, n, 0.7 ** np.arange(min(m, n)), seed)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numpys_svd_passes(dtype):
    M = decaying().astype(dtype)
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    for exact in (True, False):
        rep = check_svd(M, U[:, :6], s[:6], Vt[:6], exact=exact, random_state=0)
        assert rep.passed, rep.format()


def test_scipys_svds_passes_once_sorted_and_is_flagged_unsorted():
    M = decaying()
    U, s, Vt = splinalg.svds(M, k=6, tol=0, random_state=0)  # ascending, as ARPACK returns them
    assert check_svd(M, U, s, Vt).failures == ("descending",)
    order = np.argsort(s)[::-1]
    rep = check_svd(M, U[:, order], s[order], Vt[order])
    assert rep.passed, rep.format()
    # on a sparse matrix: the randomized bound
    S = sparse.random(300, 200, density=0.05, random_state=1, format="csr")
    U, s, Vt = splinalg.svds(S, k=5, tol=0, random_state=0)
    order = np.argsort(s)[::-1]
    rep = check_svd(S, U[:, order], s[order], Vt[order], random_state=0)
    assert not rep.exact and rep.residual_right < 1e-10 and rep.residual_left < 1e-10, rep.format()


def test_scikit_learns_randomized_svd_passes_at_convergence_and_fails_before():
    extmath = pytest.importorskip("sklearn.utils.extmath")
    M = decaying()
    U, s, Vt = extmath.randomized_svd(M, 6, n_oversamples=10, n_iter=30, random_state=0)
    rep = check_svd(M, U, s, Vt)
    assert rep.passed, rep.format()
    U, s, Vt = extmath.randomized_svd(M, 6, n_oversamples=0, n_iter=0, random_state=0)
    assert not check_svd(M, U, s, Vt).passed


def test_implicits_factors_run_long_pass_and_run_short_are_flagged():
    implicit_als_module = pytest.importorskip("implicit.cpu.als")
    threadpool_limits = pytest.importorskip("threadpoolctl").threadpool_limits
    alpha, reg, rank = 2.0, 1.0, 3
    rng = np.random.default_rng(0)
    R = sparse.csr_matrix(np.where(rng.random((40, 30)) < 0.15, rng.integers(1, 6, (40, 30)), 0).astype(np.float64))
    confidences = R.copy()
    confidences.data = 1 + alpha * confidences.data  # implicit reads c from the matrix, its own alpha left at 1

    def fit(iterations):
        with threadpool_limits(1):
            model = implicit_als_module.AlternatingLeastSquares(
                factors=rank, regularization=reg, alpha=1.0, iterations=iterations, use_cg=False,
                num_threads=1, dtype=np.float64, random_state=0,
            )  # fmt: skip
            model.fit(confidences, show_progress=False)
        return model.user_factors, model.item_factors.T

    rep = check_implicit_als(R, *fit(400), alpha=alpha, reg=reg)
    assert rep.passed, rep.format()
    assert rep.cols.max < 1e-10  # implicit solves the items last: that side is exact
    short = check_implicit_als(R, *fit(3), alpha=alpha, reg=reg)
    assert short.not_converged == ("left",), short.format()
