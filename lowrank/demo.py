"""``lowrank demo``: the story in numbers, every one measured in this run.

``run_demo`` returns plain JSON-ready data; ``format_report`` turns it into
the text the command prints.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import lowrank


def nine_by_nine(seed: int = 0) -> dict[str, Any]:
    """The 9×9 example: a multiplication table plus a little noise.

    The table ``outer(1..9, 1..9)`` has rank 1, so 18 numbers hold it where
    the dense matrix needs 81; the noise makes the error against rank worth
    looking at. Each error is measured from the truncated SVD's
    reconstruction and compared with the Eckart–Young prediction.
    """
    rng = np.random.default_rng(seed)
    k = np.arange(1.0, 10.0)
    M = np.outer(k, k) + 0.5 * rng.standard_normal((9, 9))  # (9, 9)
    norm = float(np.linalg.norm(M))
    s_all = np.linalg.svd(M, compute_uv=False)
    predicted = lowrank.eckart_young_errors(s_all)
    rows = []
    for rank in range(1, 10):
        lr = lowrank.truncated_svd(M, rank).to_lowrank()
        rows.append({
            "rank": rank,
            "params": lr.n_params,
            "relative_error": lr.error(M, relative=True),
            "eckart_young": float(predicted[rank]) / norm,
        })
    return {"dense_params": 81, "ranks": rows}


def completion(seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """ALS fills in a low-rank matrix from 40 % of its entries."""
    m, n, rank = (60, 40, 3) if quick else (300, 200, 5)
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))  # (m, n), rank 5
    mask = rng.random((m, n)) < 0.4
    start = time.perf_counter()
    fit = lowrank.als(np.where(mask, M, np.nan), rank, mask=mask, init="svd", tol=1e-12,
                      max_iter=300, random_state=seed)
    seconds = time.perf_counter() - start
    hidden = ~mask
    err = np.linalg.norm((fit.left @ fit.right - M)[hidden]) / np.linalg.norm(M[hidden])
    return {"shape": [m, n], "rank": rank, "observed_fraction": float(mask.mean()),
            "sweeps": fit.n_iter, "relative_error_hidden": float(err), "seconds": seconds}


def gpt3_budget() -> dict[str, Any]:
    """LoRA on GPT-3 175B: W_q and W_v of 96 layers at r = 1."""
    total = 175_255.8e6
    trainable = lowrank.lora_param_count(d_model=12288, n_layers=96, n_matrices=2, r=1)
    return {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total}


def run_demo(seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Run every part of the demo and return its measurements."""
    return {
        "seed": seed,
        "quick": quick,
        "nine_by_nine": nine_by_nine(seed),
        "completion": completion(seed, quick),
        "gpt3": gpt3_budget(),
    }


def format_report(results: dict[str, Any]) -> str:
    """The human-readable report of :func:`run_demo`'s results."""
    lines = ["1. A 9×9 matrix (a multiplication table plus noise) and its best rank-r approximations",
             "   rank  params (of 81)  relative error  Eckart–Young optimum"]
    for row in results["nine_by_nine"]["ranks"]:
        lines.append(f"   {row['rank']:>4}  {row['params']:>14}  {row['relative_error']:>14.3e}"
                     f"  {row['eckart_young']:>20.3e}")
    c = results["completion"]
    lines += ["", f"2. Matrix completion: a rank-{c['rank']} {c['shape'][0]}×{c['shape'][1]} matrix "
              f"from {100 * c['observed_fraction']:.0f} % of its entries (ALS)",
              f"   relative error on the hidden entries: {c['relative_error_hidden']:.2e} "
              f"after {c['sweeps']} sweeps ({c['seconds']:.2f} s)"]
    g = results["gpt3"]
    lines += ["", "3. LoRA's budget on GPT-3 175B (W_q and W_v of 96 layers, r = 1)",
              f"   trainable {g['trainable']:,} of {g['total']:,.0f} parameters: "
              f"{g['trainable_percent']:.4f} %"]
    return "\n".join(lines)
