"""implicit_als against the ``implicit`` library (benfred/implicit), on the same data and mapped hyperparameters.

The mapping (docs/factorization.md): ``implicit`` reads the confidences from
its input matrix, so it is fed ``c = 1 + alpha * r`` with its own ``alpha``
left at 1; its ``regularization`` is lowrank's ``reg`` with
``weighted_reg=False``. Both start from the same factors, so the comparison
is of the algorithms, not of two random starts.
"""

from __future__ import annotations

import numpy as np
import pytest

implicit_als_module = pytest.importorskip("implicit.cpu.als")
sparse = pytest.importorskip("scipy.sparse")
threadpool_limits = pytest.importorskip("threadpoolctl").threadpool_limits

from lowrank.factor.implicit_als import implicit_als, implicit_als_objective  # noqa: E402

ALPHA, REG, RANK, SWEEPS = 2.0, 0.05, 4, 15


def play_counts(m=60, n=40, density=0.15, seed=0):
    rng = np.random.default_rng(seed)
    counts = np.where(rng.random((m, n)) < density, rng.integers(1, 6, (m, n)), 0).astype(np.float64)
    return sparse.csr_matrix(counts)


def fit_implicit(R, left0, right0, use_cg):
    confidences = R.copy()
    confidences.data = 1 + ALPHA * confidences.data  # exact in float32, which implicit reads them in
    with threadpool_limits(1):  # implicit warns when BLAS is multithreaded, and runs slower
        model = implicit_als_module.AlternatingLeastSquares(
            factors=RANK,
            regularization=REG,
            alpha=1.0,
            iterations=SWEEPS,
            use_cg=use_cg,
            num_threads=1,
            dtype=np.float64,
            random_state=0,
        )
        model.user_factors, model.item_factors = left0.copy(), right0.T.copy()  # fit starts from these
        model.fit(confidences, show_progress=False)
    return model.user_factors, model.item_factors.T


@pytest.mark.parametrize("use_cg", [False, True])
def test_objective_after_15_sweeps_is_no_worse_than_implicits(use_cg):
    R = play_counts()
    rng = np.random.default_rng(1)
    left0, right0 = rng.random((R.shape[0], RANK)) * 0.01, rng.random((RANK, R.shape[1])) * 0.01
    ours = implicit_als(
        R, RANK, alpha=ALPHA, reg=REG, max_iter=SWEEPS, tol=0.0, cg_steps=3 if use_cg else None, init=(left0, right0)
    )
    theirs = fit_implicit(R, left0, right0, use_cg)
    objective = implicit_als_objective(R, *theirs, alpha=ALPHA, reg=REG)
    assert ours.losses[-1] <= 1.001 * objective
    # the same algorithm from the same start gives the same scores: measured 2e-14 apart (exact), 1e-9 (CG,
    # where the two stop a converged row at different residuals)
    tol = 1e-7 if use_cg else 1e-11
    np.testing.assert_allclose(ours.left @ ours.right, theirs[0] @ theirs[1], rtol=tol, atol=tol)


def test_implicits_own_loss_is_lowranks_objective_over_its_normalizer():
    # implicit's calculate_loss divides the same objective by Σ_all c = Σ_observed c + (m n − nnz)
    from implicit.cpu import _als

    R = play_counts(seed=2)
    rng = np.random.default_rng(3)
    left, right = rng.standard_normal((R.shape[0], RANK)), rng.standard_normal((RANK, R.shape[1]))
    confidences = R.copy()
    confidences.data = 1 + ALPHA * confidences.data
    theirs = _als.calculate_loss(confidences, left, np.ascontiguousarray(right.T), REG)
    m, n = R.shape
    total_confidence = confidences.data.sum() + m * n - R.nnz
    ours = implicit_als_objective(R, left, right, alpha=ALPHA, reg=REG) / total_confidence
    assert ours == pytest.approx(theirs, rel=1e-6)
