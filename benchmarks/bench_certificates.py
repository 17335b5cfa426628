"""``check_als`` on 10⁷ observed entries: its time against one lowrank ALS sweep, its memory against the input.

Run by hand, never as a test::

    python benchmarks/bench_certificates.py            # 200,000 × 100,000, 10⁷ observed entries, rank 10
    python benchmarks/bench_certificates.py --quick    # 20,000 × 10,000, 10⁶: seconds
    python benchmarks/bench_certificates.py --reps 5

The data: ratings ``M = L₀ R₀ + noise`` at uniformly drawn (row, column)
pairs (repeats merged, so slightly fewer than the nominal count), float64
scipy CSR. The factors to certify: ``lowrank.als(M, 10, reg=0.1,
max_iter=3)``; the same ALS with ``max_iter=1`` is the sweep timed next to
the certificate, taking turns repetition by repetition (the machine may be
shared). Goals (issue 13): the certificate's wall time at most 1.5× one
sweep, and its peak memory, measured by ``tracemalloc`` (NumPy and scipy's
arrays are traced) during the call, at most 2× the input's bytes
(``data + indices + indptr``). The sweep is the whole call
``als(M, 10, max_iter=1)``: its setup (validation, scaling, the transposed
copy, the random start) and its loss are included, as a user would time it.

Measured on the project's shared 2-core machine (load average 8–13, so
only the ratios mean something), 9,997,477 entries, 115 MiB of input: one
sweep 37.5 s and 35.1 s, peak 930 MiB; ``check_als`` 27.6 s and 34.6 s,
peak 179 MiB. Time 0.74× (median of 2, load 8) and 0.99× (1 repetition,
load 13); memory 1.55× the input. Most of the peak is the column side's
accumulators and the ``(n, r(r+1)/2)`` products with the transposed blocks,
so the ratio falls as ``nnz / n`` grows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

# Benchmark the checkout this file lives in, even if another lowrank is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank.factor.als import als
from lowrank.factor.certificates import check_als

RANK = 10
REG = 0.1


def ratings(m: int, n: int, nnz: int, seed: int = 0):
    import scipy.sparse

    rng = np.random.default_rng(seed)
    rows = rng.integers(0, m, nnz)
    cols = rng.integers(0, n, nnz)
    L0 = rng.standard_normal((m, RANK)) / np.sqrt(RANK)
    R0 = rng.standard_normal((RANK, n))
    values = np.einsum("er,re->e", L0[rows], R0[:, cols]) + 0.1 * rng.standard_normal(nnz)
    M = scipy.sparse.csr_matrix((values, (rows, cols)), shape=(m, n))
    M.sum_duplicates()
    return M


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10⁶ entries instead of 10⁷")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each (default 3)")
    args = parser.parse_args()
    m, n, nnz = (20_000, 10_000, 10**6) if args.quick else (200_000, 100_000, 10**7)

    M = ratings(m, n, nnz)
    input_bytes = M.data.nbytes + M.indices.nbytes + M.indptr.nbytes
    print(f"M: {m:,} × {n:,}, {M.nnz:,} observed entries, float64 CSR, {input_bytes / 2**20:.0f} MiB; rank {RANK}")
    fit = als(M, RANK, reg=REG, max_iter=3, random_state=0)

    sweep_times, check_times = [], []
    for _ in range(args.reps):
        start = time.perf_counter()
        als(M, RANK, reg=REG, max_iter=1, random_state=0)
        sweep_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        rep = check_als(M, fit.left, fit.right, reg=REG)
        check_times.append(time.perf_counter() - start)

    tracemalloc.start()
    check_als(M, fit.left, fit.right, reg=REG)
    _, check_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    als(M, RANK, reg=REG, max_iter=1, random_state=0)
    _, sweep_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    sweep, check = statistics.median(sweep_times), statistics.median(check_times)
    print(rep.format())
    print()
    print(f"one ALS sweep (als, max_iter=1)   {sweep:8.2f} s   peak {sweep_peak / 2**20:7.0f} MiB")
    print(f"check_als                         {check:8.2f} s   peak {check_peak / 2**20:7.0f} MiB")
    print(f"time   check_als / one sweep      {check / sweep:8.2f}×   (goal ≤ 1.5×; median of {args.reps})")
    print(f"memory check_als peak / input     {check_peak / input_bytes:8.2f}×   (goal ≤ 2×)")


if __name__ == "__main__":
    main()
