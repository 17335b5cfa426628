"""lowrank's ALS against Apache Spark MLlib's, on a local[2] Spark started here and stopped after the module.

(a) Implicit feedback: on the same play counts and the mapped hyperparameters
(docs/factorization.md: lowrank ``alpha`` = Spark ``alpha``, lowrank ``reg``
with ``weighted_reg=True`` = Spark ``regParam``), lowrank's objective after
15 sweeps is at most 1.001 times the objective of Spark's ``implicitPrefs``
factors, both evaluated by ``implicit_als_objective`` in float64 (measured:
0.993 for lowrank from eight different seeds).

(b) Explicit feedback: Spark solves for the items and then for the users in
each sweep, so after 30 sweeps its user factors (lowrank's rows, ``left``)
are an exact half-step's output, rounded to float32, while its item factors
lag one half-step behind. ``check_als`` says exactly that: the rows
stationary to float32 precision (measured ~4e-8), the columns not yet
(~5e-3), the verdict naming the right factor and its worst columns.

Skipped without pyspark (``pip install pyspark``) or without Java (17+, on
``PATH`` or in ``JAVA_HOME``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyspark")
sparse = pytest.importorskip("scipy.sparse")
if shutil.which("java") is None and "JAVA_HOME" not in os.environ:
    pytest.skip("Spark needs Java 17+: none on PATH and no JAVA_HOME", allow_module_level=True)

from lowrank.factor.certificates import check_als  # noqa: E402
from lowrank.factor.implicit_als import implicit_als, implicit_als_objective  # noqa: E402


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    """A local[2] SparkSession, stopped when the module's tests are done."""
    from pyspark.sql import SparkSession

    java = shutil.which("java")
    if "JAVA_HOME" not in os.environ and java:
        os.environ["JAVA_HOME"] = str(Path(java).resolve().parents[1])  # .../jvm/java-17/bin/java
    session = (
        SparkSession.builder.master("local[2]")
        .appName("lowrank-crosscheck")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("OFF")
    # ALS's lineage grows with every sweep: without checkpoints, 30 sweeps overflow the JVM's stack
    session.sparkContext.setCheckpointDir(str(tmp_path_factory.mktemp("spark-checkpoints")))
    yield session
    session.stop()


def spark_als(spark, R, **params):
    """Spark's ALS fitted on the stored entries of ``R``; its factors as ``left (m, r)``, ``right (r, n)``."""
    from pyspark.ml.recommendation import ALS

    coo = R.tocoo()
    triplets = [(int(i), int(j), float(v)) for i, j, v in zip(coo.row, coo.col, coo.data, strict=True)]
    frame = spark.createDataFrame(triplets, ["user", "item", "rating"])
    als = ALS(userCol="user", itemCol="item", ratingCol="rating", seed=0, numUserBlocks=2, numItemBlocks=2, **params)
    model = als.fit(frame)
    rank = params["rank"]
    left, right = np.zeros((R.shape[0], rank)), np.zeros((rank, R.shape[1]))
    for row in model.userFactors.collect():
        left[row.id] = row.features
    for row in model.itemFactors.collect():
        right[:, row.id] = row.features
    return left, right


def test_implicit_objective_after_15_sweeps_is_no_worse_than_sparks(spark):
    # play counts of 60 users and 40 items in three taste groups: 50 % of the in-group pairs played, 3 % of the rest
    rng = np.random.default_rng(0)
    same = (np.arange(60) % 3)[:, None] == (np.arange(40) % 3)[None, :]
    played = rng.random((60, 40)) < np.where(same, 0.5, 0.03)
    R = sparse.csr_matrix(np.where(played, rng.integers(1, 6, (60, 40)), 0).astype(np.float64))
    alpha, reg, rank, sweeps = 2.0, 0.05, 3, 15
    theirs = spark_als(spark, R, rank=rank, maxIter=sweeps, alpha=alpha, regParam=reg, implicitPrefs=True)
    ours = implicit_als(R, rank, alpha=alpha, reg=reg, weighted_reg=True, max_iter=sweeps, tol=0.0, random_state=0)
    objective = implicit_als_objective(R, *theirs, alpha=alpha, reg=reg, weighted_reg=True)
    assert ours.losses[-1] <= 1.001 * objective, (ours.losses[-1], objective)


def test_check_als_names_the_side_spark_did_not_solve_last(spark):
    # planted rank 3 plus N(0, 0.1²) noise, 30 % of the entries observed
    rng = np.random.default_rng(1)
    full = rng.standard_normal((60, 3)) @ rng.standard_normal((3, 40)) + 0.1 * rng.standard_normal((60, 40))
    observed = rng.random((60, 40)) < 0.3
    M = sparse.csr_matrix((full[observed], np.nonzero(observed)), shape=full.shape)
    left, right = spark_als(spark, M, rank=3, maxIter=30, regParam=0.01, implicitPrefs=False)
    report = check_als(M, left, right, reg=0.01, weighted_reg=True, tol=1e-6)
    assert report.row_stationarity.max() < 1e-6  # the users, solved last: float32 precision
    assert report.col_stationarity.max() > 1e-4  # the items, one half-step behind
    assert report.not_converged == ("right",) and not report.passed
    worst = int(np.argmax(report.col_stationarity))
    assert "the right factor is not converged" in report.format()
    assert f"worst columns {worst}," in report.format()
