"""Implicit-feedback ALS: lowrank against the ``implicit`` library, at the same thread count.

Run by hand, never as a test::

    python benchmarks/bench_implicit_als.py              # 6000×4000, 1,000,000 interactions
    python benchmarks/bench_implicit_als.py --quick      # 1200×800, 50,000: seconds
    python benchmarks/bench_implicit_als.py --threads 2  # both sides on 2 threads
    python benchmarks/bench_implicit_als.py --spark --threads 2   # against Spark MLlib in local[2] instead

The data: play counts drawn from a planted mixture of 10 topics (a user
picks a topic by their own affinity, then an item by the topic's
popularity; repeated draws of a pair add up), cut to exactly the wanted
number of distinct (user, item) pairs. Rank 10, 10 sweeps, ``alpha=1``,
``reg=0.01`` (``implicit``'s defaults), float32 on both sides (``implicit``
computes in float32).

Competitors, taking turns repetition by repetition (the machine may be
shared): lowrank's ``implicit_als`` with exact solves and with 3 CG steps,
and ``implicit``'s ``AlternatingLeastSquares`` with ``use_cg=False`` and
``True`` (3 CG steps), fed the same confidences: its input holds
``c = 1 + alpha·r`` and its own ``alpha`` stays 1 (see docs/factorization.md).
lowrank's BLAS is held to ``--threads`` threads by threadpoolctl;
``implicit`` gets ``num_threads`` equal to it and a 1-thread BLAS, as it
asks for. The table shows median fit times, the ratio
``lowrank / implicit`` (below 1: lowrank is faster) and each fit's objective
evaluated by ``lowrank.factor.implicit_als.implicit_als_objective`` in float64
(the ratio below 1: lowrank's factors are better). Optional peers:
``pip install implicit threadpoolctl``.

With ``--spark``, the peer is Spark MLlib's ``ALS(implicitPrefs=True)`` in
``local[2]`` instead (``pip install pyspark``, Java 17+), on the same counts
and the mapped hyperparameters: Spark's ``regParam`` is lowrank's ``reg``
with ``weighted_reg=True``, its ``alpha`` lowrank's ``alpha``, and Spark
computes in float64 normal equations with float32 factors. Spark's fit time
is warm (the JVM started and the ratings cached as a DataFrame beforehand,
one fit run before the timed ones), its default 10 user and item blocks;
the objective of both is lowrank's, with ``weighted_reg=True``. Run it with
``--threads 2`` so that lowrank's BLAS uses the two cores Spark gets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# Benchmark the checkout this file lives in, even if another lowrank is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank.factor.implicit_als import implicit_als, implicit_als_objective

SEED = 0
TOPICS = 10
RANK = 10
SWEEPS = 10
ALPHA = 1.0
REG = 0.01
CG_STEPS = 3  # implicit's fixed number of CG steps


def play_counts(m: int, n: int, nnz: int, seed: int):
    """A scipy CSR (m, n) float32 matrix of exactly ``nnz`` positive play counts."""
    import scipy.sparse

    rng = np.random.default_rng(seed)
    user_affinity = rng.gamma(0.3, size=(m, TOPICS))  # (m, k)
    item_popularity = rng.gamma(0.3, size=(n, TOPICS))  # (n, k)
    draws = int(1.6 * nnz)
    topic = rng.integers(TOPICS, size=draws)
    users = np.empty(draws, dtype=np.int64)
    items = np.empty(draws, dtype=np.int64)
    for k in range(TOPICS):
        pick = topic == k
        users[pick] = rng.choice(m, size=pick.sum(), p=user_affinity[:, k] / user_affinity[:, k].sum())
        items[pick] = rng.choice(n, size=pick.sum(), p=item_popularity[:, k] / item_popularity[:, k].sum())
    counts = scipy.sparse.coo_matrix((np.ones(draws, np.float32), (users, items)), shape=(m, n)).tocsr()
    counts.sum_duplicates()
    if counts.nnz < nnz:
        raise RuntimeError(f"drew only {counts.nnz} distinct pairs, fewer than {nnz}: raise the draw count")
    keep = np.zeros(counts.nnz, dtype=bool)
    keep[rng.choice(counts.nnz, size=nnz, replace=False)] = True
    counts.data[~keep] = 0
    counts.eliminate_zeros()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1200×800 with 50,000 interactions")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per competitor")
    parser.add_argument("--threads", type=int, default=1, help="BLAS and implicit threads")
    parser.add_argument("--spark", action="store_true", help="compare with Spark MLlib in local[2] instead")
    args = parser.parse_args()
    m, n, nnz = (1200, 800, 50_000) if args.quick else (6000, 4000, 1_000_000)
    if args.spark:
        spark_main(m, n, nnz, args)
        return

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        sys.exit("skipped: pip install threadpoolctl (needed to fix the thread count)")
    try:
        from implicit.cpu.als import AlternatingLeastSquares
    except ImportError:
        AlternatingLeastSquares = None
        print("implicit: skipped: pip install implicit")

    R = play_counts(m, n, nnz, SEED)
    confidences = R.copy()
    confidences.data = 1 + ALPHA * confidences.data  # implicit's input: the confidences themselves
    print(
        f"{m}×{n}, {R.nnz:,} interactions (counts 1..{int(R.data.max())}), rank {RANK}, {SWEEPS} sweeps, "
        f"alpha={ALPHA}, reg={REG}, float32, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f}"
    )

    def lowrank_fit(cg_steps):
        def run():
            fit = implicit_als(
                R, RANK, alpha=ALPHA, reg=REG, max_iter=SWEEPS, tol=0.0, cg_steps=cg_steps, random_state=SEED
            )
            return fit.left, fit.right

        return run

    def implicit_fit(use_cg):
        def run():
            # implicit parallelizes over rows itself (num_threads) and wants a 1-thread BLAS: it warns otherwise
            with threadpool_limits(1):
                model = AlternatingLeastSquares(
                    factors=RANK,
                    regularization=REG,
                    alpha=1.0,
                    iterations=SWEEPS,
                    use_cg=use_cg,
                    num_threads=args.threads,
                    random_state=SEED,
                    dtype=np.float32,
                )
                model.fit(confidences, show_progress=False)
            return model.user_factors, model.item_factors.T

        return run

    pairs = [
        ("exact", lowrank_fit(None), implicit_fit(False) if AlternatingLeastSquares else None),
        (f"CG, {CG_STEPS} steps", lowrank_fit(CG_STEPS), implicit_fit(True) if AlternatingLeastSquares else None),
    ]
    print(
        f"{'solver':<14}{'lowrank s':>11}{'implicit s':>12}{'time ratio':>12}"
        f"{'lowrank objective':>20}{'implicit objective':>20}{'ratio':>9}"
    )
    with threadpool_limits(args.threads):
        for name, ours, theirs in pairs:
            times: dict[str, list[float]] = {"ours": [], "theirs": []}
            factors = {}
            for _ in range(args.repeats):
                for who, run in (("ours", ours), ("theirs", theirs)):
                    if run is None:
                        continue
                    time.sleep(0.3)  # let a busy core settle between competitors
                    start = time.perf_counter()
                    factors[who] = run()
                    times[who].append(time.perf_counter() - start)
            objective = {who: implicit_als_objective(R, *f, alpha=ALPHA, reg=REG) for who, f in factors.items()}
            t_ours = statistics.median(times["ours"])
            if "theirs" in factors:
                t_theirs = statistics.median(times["theirs"])
                print(
                    f"{name:<14}{t_ours:>11.2f}{t_theirs:>12.2f}{t_ours / t_theirs:>12.2f}"
                    f"{objective['ours']:>20,.1f}{objective['theirs']:>20,.1f}"
                    f"{objective['ours'] / objective['theirs']:>9.4f}"
                )
            else:
                print(f"{name:<14}{t_ours:>11.2f}{'-':>12}{'-':>12}{objective['ours']:>20,.1f}{'-':>20}{'-':>9}")
    print(f"medians of {args.repeats} repetitions; load average at the end {os.getloadavg()[0]:.1f}")


def spark_main(m: int, n: int, nnz: int, args: argparse.Namespace) -> None:
    """lowrank's implicit ALS against Spark MLlib's ``implicitPrefs`` in local[2], same objective."""
    import shutil

    try:
        from pyspark.ml.recommendation import ALS
        from pyspark.sql import SparkSession
        from threadpoolctl import threadpool_limits
    except ImportError:
        sys.exit("skipped: pip install pyspark threadpoolctl (and Java 17+)")
    java = shutil.which("java")
    if "JAVA_HOME" not in os.environ:
        if java is None:
            sys.exit("skipped: Spark needs Java 17+: none on PATH and no JAVA_HOME")
        os.environ["JAVA_HOME"] = str(Path(java).resolve().parents[1])

    R = play_counts(m, n, nnz, SEED)
    print(
        f"{m}×{n}, {R.nnz:,} interactions, rank {RANK}, {SWEEPS} sweeps, alpha={ALPHA}, regParam = reg = {REG} "
        f"(weighted_reg=True), lowrank float32 on {args.threads} BLAS thread(s) vs Spark local[2]; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    start = time.perf_counter()
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("lowrank-bench")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("OFF")
    coo = R.tocoo()
    frame = spark.createDataFrame(
        list(zip(coo.row.tolist(), coo.col.tolist(), coo.data.astype(float).tolist(), strict=True)),
        ["user", "item", "rating"],
    ).cache()
    frame.count()
    elapsed = time.perf_counter() - start
    print(f"Spark {spark.version}: JVM start and DataFrame of the ratings cached in {elapsed:.1f} s")

    def spark_fit():
        als = ALS(
            rank=RANK, maxIter=SWEEPS, alpha=ALPHA, regParam=REG, implicitPrefs=True, seed=SEED,
            userCol="user", itemCol="item", ratingCol="rating",
        )  # fmt: skip
        return als.fit(frame)

    def lowrank_fit():
        with threadpool_limits(args.threads):
            return implicit_als(
                R, RANK, alpha=ALPHA, reg=REG, weighted_reg=True, max_iter=SWEEPS, tol=0.0, random_state=SEED
            )

    spark_fit()  # warm-up: JIT and the first job's overheads
    times: dict[str, list[float]] = {"lowrank": [], "spark": []}
    for _ in range(args.repeats):
        for who, run in (("lowrank", lowrank_fit), ("spark", spark_fit)):
            time.sleep(0.5)
            start = time.perf_counter()
            result = run()
            times[who].append(time.perf_counter() - start)
            if who == "lowrank":
                ours = result
            else:
                model = result
    left, right = np.zeros((m, RANK), np.float32), np.zeros((RANK, n), np.float32)
    for row in model.userFactors.collect():
        left[row.id] = row.features
    for row in model.itemFactors.collect():
        right[:, row.id] = row.features
    spark.stop()
    objective = {
        "lowrank": implicit_als_objective(R, ours.left, ours.right, alpha=ALPHA, reg=REG, weighted_reg=True),
        "spark": implicit_als_objective(R, left, right, alpha=ALPHA, reg=REG, weighted_reg=True),
    }
    t_ours, t_spark = statistics.median(times["lowrank"]), statistics.median(times["spark"])
    print(f"{'':<22}{'lowrank':>14}{'Spark':>14}{'ratio':>9}")
    print(f"{'fit time, s (warm)':<22}{t_ours:>14.2f}{t_spark:>14.2f}{t_ours / t_spark:>9.3f}")
    print(
        f"{'objective':<22}{objective['lowrank']:>14,.1f}{objective['spark']:>14,.1f}"
        f"{objective['lowrank'] / objective['spark']:>9.4f}"
    )
    print(f"medians of {args.repeats} repetitions; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
