"""scikit-learn's own randomized_svd tests, run against lowrank.randomized_svd through a signature shim.

The tests of ``sklearn/utils/tests/test_extmath.py`` call the module-level name
``randomized_svd``; each test here points that name at :func:`shim` for the
duration of one test and calls scikit-learn's test function unchanged, dense
and CSR input alike. The shim maps scikit-learn's signature onto lowrank's:

| scikit-learn | lowrank |
|---|---|
| ``n_components`` | ``rank`` |
| ``n_oversamples`` | ``oversample`` |
| ``n_iter`` (int or "auto", the same rule) | ``n_iter`` |
| ``random_state`` (int, or a ``RandomState`` that draws one) | ``random_state`` |
| ``flip_sign=True`` (``u_based_decision``) | always: the same sign rule |
| ``power_iteration_normalizer`` | ignored: lowrank always orthonormalizes (CholeskyQR2 or QR) |
| ``transpose`` | ignored: lowrank always sketches the longer side |
| ``svd_lapack_driver`` | ignored: NumPy's SVD |

Two tests tuned to scikit-learn's own random draw (``SEED_TUNED``) fail at
seed 0 by 2e-3 against a 1.5e-3 tolerance; scikit-learn meets it at fewer than
half of the seeds 0..19 itself. What is checked instead: over those 20 seeds,
lowrank's median error is no worse than scikit-learn's.
Not run, because they test what lowrank does not have (each listed in
``NOT_APPLICABLE`` with the reason): the divergence of the ``"none"``
normalizer, the warning for LIL and DOK input (lowrank converts them to CSR
without a warning), the comparison of two LAPACK drivers, and the array API.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy.sparse")
test_extmath = pytest.importorskip("sklearn.utils.tests.test_extmath")

import lowrank  # noqa: E402


def shim(
    M,
    n_components,
    *,
    n_oversamples=10,
    n_iter="auto",
    power_iteration_normalizer="auto",
    transpose="auto",
    flip_sign=True,
    random_state=None,
    svd_lapack_driver="gesdd",
):
    """scikit-learn's ``randomized_svd(M, n_components, ...)`` signature, answered by lowrank."""
    assert flip_sign, "lowrank always applies the sign rule; no test here turns it off"
    if isinstance(random_state, np.random.RandomState):  # lowrank takes an int or a Generator
        random_state = int(random_state.randint(2**31))
    svd = lowrank.randomized_svd(M, n_components, oversample=n_oversamples, n_iter=n_iter, random_state=random_state)
    return svd.U, svd.s, svd.Vt


APPLICABLE = [
    # (test function, its parameters)
    *[("test_randomized_svd_low_rank_all_dtypes", {"dtype": d}) for d in (np.int32, np.int64, np.float32, np.float64)],
    ("test_randomized_svd_low_rank_with_noise", {}),
    ("test_randomized_svd_sign_flip", {}),
    ("test_randomized_svd_sign_flip_with_transpose", {}),
]

# Tuned to scikit-learn's own random draw: at random_state=0 they ask for the top 10 singular values
# to 3 decimals (|error| < 1.5e-3) after 5 or 3 power iterations on a flat spectrum, which scikit-learn
# itself meets at seed 0 but at only 9 and 4 of seeds 0..19 (measured; lowrank at 12 and 8). lowrank
# draws Ω from a Generator, so seed 0 is another draw: these fail at seed 0 by 2e-3, and are checked
# instead by test_seed_tuned_errors_are_no_worse_than_scikit_learns below, over 20 seeds.
SEED_TUNED = {
    "test_randomized_svd_infinite_rank": (1.0, 5, 5),  # tail_strength, n_iter, effective_rank
    "test_randomized_svd_transpose_consistency": (0.5, 3, 4),
}

NOT_APPLICABLE = {
    "test_randomized_svd_power_iteration_normalizer": "checks that the 'none' normalizer diverges; lowrank has none",
    "test_randomized_svd_sparse_warnings": "expects a SparseEfficiencyWarning for LIL/DOK; lowrank converts silently",
    "test_randomized_svd_lapack_driver": "compares gesdd with gesvd; lowrank has one driver, so both calls are one",
    "test_randomized_svd_array_api_compliance": "the array API; lowrank is NumPy only",
}


@pytest.mark.parametrize(("name", "params"), APPLICABLE, ids=[f"{n}{list(p.values()) or ''}" for n, p in APPLICABLE])
def test_scikit_learns_randomized_svd_test_passes_against_lowrank(name, params, monkeypatch):
    monkeypatch.setattr(test_extmath, "randomized_svd", shim)
    getattr(test_extmath, name)(**params)


@pytest.mark.parametrize("name", sorted(SEED_TUNED))
def test_seed_tuned_errors_are_no_worse_than_scikit_learns(name):
    from scipy import linalg
    from sklearn.datasets import make_low_rank_matrix
    from sklearn.utils.extmath import randomized_svd as sklearn_randomized_svd

    tail_strength, n_iter, effective_rank = SEED_TUNED[name]
    X = make_low_rank_matrix(100, 500, effective_rank=effective_rank, tail_strength=tail_strength, random_state=0)
    s = linalg.svd(X, compute_uv=False)[:10]
    seeds = range(20)
    ours = np.median([np.abs(shim(X, 10, n_iter=n_iter, random_state=i)[1] - s).max() for i in seeds])
    theirs = np.median(
        [np.abs(sklearn_randomized_svd(X, 10, n_iter=n_iter, random_state=i)[1] - s).max() for i in seeds]
    )
    # measured: 1.46e-3 against 1.67e-3 (infinite rank), 1.89e-3 against 2.06e-3 (transpose consistency)
    assert ours <= theirs, f"{name}: median error over 20 seeds {ours:.3g} for lowrank, {theirs:.3g} for scikit-learn"


def test_every_randomized_svd_test_of_scikit_learn_is_accounted_for():
    found = {name for name in dir(test_extmath) if name.startswith("test_randomized_svd")}
    assert found == {name for name, _ in APPLICABLE} | set(SEED_TUNED) | set(NOT_APPLICABLE)
