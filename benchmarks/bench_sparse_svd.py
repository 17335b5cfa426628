"""Randomized SVD of a large scipy.sparse matrix: lowrank against scikit-learn, time, peak memory and error.

Run by hand, never as a test::

    python benchmarks/bench_sparse_svd.py            # 100,000 × 50,000, 0.1 % density, rank 100
    python benchmarks/bench_sparse_svd.py --quick    # 10,000 × 5,000: seconds
    python benchmarks/bench_sparse_svd.py --repeats 3
    python benchmarks/bench_sparse_svd.py --threads 1   # both sides' BLAS on one thread

The matrix: ``scipy.sparse.random`` in CSR, float64, entries uniform in
[0, 1) at uniformly random positions (5,000,000 stored entries at full
size), written once to a temporary ``.npz``. Both sides run the same
algorithm at the same settings: rank 100, 10 oversamples, 7 power
iterations (``n_iter="auto"`` on both sides resolves to 7 here), seed 0;
scikit-learn's ``sklearn.utils.extmath.randomized_svd`` with its defaults
(``power_iteration_normalizer="auto"``, which is LU here), lowrank's
``randomized_svd`` with its defaults (CholeskyQR between products and
CholeskyQR2 at the end, Householder QR on an ill-conditioned block; one
BLAS thread for sparse input).

Every run is a fresh Python process that loads the matrix, then calls the
SVD once: its wall time, the growth of its peak resident set over what it
held after loading (``ru_maxrss`` minus the resident set after the load:
everything the call allocated, LAPACK's workspaces included) and the peak
of ``tracemalloc`` during the call (NumPy's and SciPy's arrays). The two
competitors take turns, run by run, and the table shows medians and the
ratio ``lowrank / scikit-learn`` (below 1: lowrank is faster, smaller or
more accurate). The error is ``‖M − U diag(s) Vt‖_F`` computed in the
parent without densifying: ``‖M‖² − 2 Σ_i s_i u_iᵀ M v_i + ‖U diag(s) Vt‖²``
in float64. Optional peer: ``pip install scikit-learn``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RANK = 100
OVERSAMPLE = 10
N_ITER = 7  # what both libraries' n_iter="auto" resolves to at rank 100 of 50,000 (rank < 0.1 min(m, n))
SEED = 0


def resident_bytes() -> int:
    """The current resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(who: str, matrix: str, out: str, threads: int | None) -> None:
    """One measured call in this (fresh) process; prints a JSON line and saves the factors to ``out``."""
    sys.path.insert(0, str(ROOT))  # benchmark the checkout this file lives in
    import scipy.sparse

    if threads is not None:  # NumPy's and SciPy's BLAS alike
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)

    if who == "lowrank":
        from lowrank import randomized_svd

        def run(M):
            svd = randomized_svd(M, RANK, oversample=OVERSAMPLE, n_iter=N_ITER, random_state=SEED)
            return svd.U, svd.s, svd.Vt
    else:
        from sklearn.utils.extmath import randomized_svd as sk_randomized_svd

        def run(M):
            return sk_randomized_svd(M, RANK, n_oversamples=OVERSAMPLE, n_iter=N_ITER, random_state=SEED)

    M = scipy.sparse.load_npz(matrix)
    loaded = resident_bytes()
    tracemalloc.start()
    start = time.perf_counter()
    U, s, Vt = run(M)
    seconds = time.perf_counter() - start
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    np.savez(out, U=U, s=s, Vt=Vt)
    print(json.dumps({"seconds": seconds, "rss_growth": peak - loaded, "traced": traced}))


def frobenius_error(M, U: np.ndarray, s: np.ndarray, Vt: np.ndarray) -> float:
    """``‖M − U diag(s) Vt‖_F`` without forming an m × n array, in float64."""
    U, s, Vt = U.astype(np.float64), s.astype(np.float64), Vt.astype(np.float64)
    MV = np.asarray(M @ Vt.T)  # (m, r)
    cross = float(np.sum(s * np.einsum("ir,ir->r", U, MV)))  # ⟨M, U diag(s) Vt⟩
    own = float(np.sum(((U.T @ U) * s[:, None] * s[None, :]) * (Vt @ Vt.T)))  # ‖U diag(s) Vt‖²
    total = float(np.sum(M.data.astype(np.float64) ** 2))
    return float(np.sqrt(max(total - 2 * cross + own, 0.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 × 5,000 instead of 100,000 × 50,000")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per competitor")
    parser.add_argument("--threads", type=int, help="BLAS threads on both sides (needs threadpoolctl)")
    parser.add_argument("--worker", choices=["lowrank", "sklearn"], help=argparse.SUPPRESS)
    parser.add_argument("--matrix", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.matrix, args.out, args.threads)
        return

    import scipy.sparse

    try:
        import sklearn  # noqa: F401

        competitors = ["lowrank", "sklearn"]
    except ImportError:
        competitors = ["lowrank"]
        print("scikit-learn: skipped: pip install scikit-learn")
    m, n = (10_000, 5_000) if args.quick else (100_000, 50_000)
    density = 0.001
    M = scipy.sparse.random(m, n, density=density, format="csr", dtype=np.float64, rng=np.random.default_rng(SEED))
    matrix_mb = (M.data.nbytes + M.indices.nbytes + M.indptr.nbytes) / 1e6
    print(
        f"{m:,} × {n:,}, {M.nnz:,} stored entries ({density:.1%}, CSR {matrix_mb:.0f} MB), rank {RANK}, "
        f"{OVERSAMPLE} oversamples, {N_ITER} power iterations, float64, BLAS threads {args.threads or 'default'}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    results: dict[str, dict[str, list[float]]] = {who: {"seconds": [], "rss": [], "traced": []} for who in competitors}
    errors: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "M.npz")
        scipy.sparse.save_npz(path, M, compressed=False)
        for _ in range(args.repeats):
            for who in competitors:
                out = os.path.join(tmp, f"{who}.npz")
                time.sleep(0.5)  # let a busy core settle between competitors
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", who, "--matrix", path, "--out", out]
                    + ([] if args.threads is None else ["--threads", str(args.threads)]),
                    check=True,
                    capture_output=True,
                    text=True,
                )
                row = json.loads(done.stdout.strip().splitlines()[-1])
                results[who]["seconds"].append(row["seconds"])
                results[who]["rss"].append(row["rss_growth"] / 1e6)
                results[who]["traced"].append(row["traced"] / 1e6)
                with np.load(out) as f:
                    errors[who] = frobenius_error(M, f["U"], f["s"], f["Vt"])

    print(f"{'':<34}{'lowrank':>12}{'scikit-learn':>14}{'ratio':>9}")
    rows = [
        ("time, s", "seconds", "{:>12.2f}"),
        ("peak RSS growth over the input, MB", "rss", "{:>12.0f}"),
        ("tracemalloc peak of the call, MB", "traced", "{:>12.0f}"),
    ]
    for label, key, fmt in rows:
        ours = statistics.median(results["lowrank"][key])
        line = f"{label:<34}" + fmt.format(ours)
        if "sklearn" in results:
            theirs = statistics.median(results["sklearn"][key])
            line += fmt.format(theirs).rjust(14) + f"{ours / theirs:>9.3f}"
        print(line)
    line = f"{'Frobenius error ‖M − U s Vt‖':<34}{errors['lowrank']:>12.4f}"
    if "sklearn" in errors:
        line += f"{errors['sklearn']:>14.4f}{errors['lowrank'] / errors['sklearn']:>9.6f}"
    print(line)
    print(f"medians of {args.repeats} fresh-process runs each; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
