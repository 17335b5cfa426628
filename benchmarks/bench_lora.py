"""How fast is a LoRA layer's training step, next to what it cannot avoid?

Run by hand: ``python benchmarks/bench_lora.py [--reps N]``.

The case (issue 3): x (8192, 1024), W (1024, 1024), r = 8, float32, frozen
base, no bias (the issue's case is ``x`` and ``W``; a bias adds an (N, out)
pass to the NumPy layers that torch's addmm folds into its product). One step
is ``y = lora(x); dx = lora.backward(dy)`` through the module, as a user
calls it. It is measured against

1. the two large products a frozen layer cannot avoid, ``x @ W.T`` and
   ``dy @ W``, timed alone in the same run (target <= 1.10x);
2. a fully trainable ``nn.Linear``'s forward and backward, which also pays for
   ``dy.T @ x`` (target <= 0.75x);
3. PyTorch autograd of the same computation, when torch is importable
   (target <= 1.0x), with torch limited to NumPy's BLAS thread count.

All cases run interleaved, one repetition of each in turn (rotating who
goes first), and the medians are compared, so drift and noise hit every side
alike; the minimums are printed too, and the load average before and after,
because on a busy machine multi-threaded BLAS calls suffer most. Then tracemalloc
(which NumPy reports its allocations to) measures the peak extra memory of one
LoRA step, and the script asserts that no (out, in)-sized array outlives the
step or sits in the forward cache, and that y and dx are C-contiguous arrays.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, installed or not
from lowrank import nn
from lowrank.nn import functional as F

N, IN, OUT, R = 8192, 1024, 1024, 8
DTYPE = np.float32


def blas_threads() -> tuple[int, str]:
    """NumPy's BLAS thread count, and how it was found."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return os.cpu_count() or 1, "os.cpu_count(); threadpoolctl not installed"
    blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    if not blas:
        return os.cpu_count() or 1, "os.cpu_count(); no BLAS pool reported"
    return int(blas[0]["num_threads"]), f"threadpoolctl: {blas[0].get('internal_api')}"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_cases(rng: np.random.Generator, n_threads: int):
    x = rng.standard_normal((N, IN), dtype=DTYPE)
    dy = rng.standard_normal((N, OUT), dtype=DTYPE)

    base = nn.Linear(IN, OUT, bias=False, dtype=DTYPE, random_state=rng)
    lora = nn.LoRALinear(base, r=R, alpha=16, random_state=rng)
    lora.B.data = (0.01 * rng.standard_normal(lora.B.shape)).astype(DTYPE)  # a trained-looking adapter
    W = lora.weight.data

    def lora_step():
        lora.zero_grad()
        lora(x)
        lora.backward(dy)

    def lora_kernels():  # the same step without the module's bookkeeping
        _, cache = F.lora_linear(x, W, None, lora.A.data, lora.B.data, lora.scaling)
        F.lora_linear_backward(dy, cache, base_trainable=False)

    def bare_matmuls():
        x @ W.T  # (N, out)
        dy @ W  # (N, in)

    full = nn.Linear(IN, OUT, bias=False, dtype=DTYPE, random_state=rng)

    def linear_step():
        full.zero_grad()
        full(x)
        full.backward(dy)

    cases = {
        "lora step (module)": lora_step,
        "lora step (kernels only)": lora_kernels,
        "bare x@W.T + dy@W": bare_matmuls,
        "trainable Linear step": linear_step,
    }
    torch_note = "torch not importable: comparison 3 skipped"
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(n_threads)
        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
        Wt = torch.from_numpy(W)  # frozen: no requires_grad
        At = torch.from_numpy(lora.A.data.copy()).requires_grad_()
        Bt = torch.from_numpy(lora.B.data.copy()).requires_grad_()
        scaling = lora.scaling

        def torch_step():
            At.grad = Bt.grad = None
            xg = xt.detach().requires_grad_()  # dx is computed, as in the LoRA step
            y = torch.nn.functional.linear(xg, Wt) + scaling * ((xg @ At.T) @ Bt.T)  # PEFT's order
            y.backward(dyt)

        cases["torch autograd step"] = torch_step
        torch_note = (
            f"torch {torch.__version__}: torch.set_num_threads({n_threads}) to match NumPy's BLAS; "
            "W frozen, x, A, B require grad; y = linear(x, W) + scaling * (x @ A.T) @ B.T"
        )
    return cases, torch_note, lora, x, dy


def run_timings(cases, reps: int) -> dict[str, list[float]]:
    for fn in cases.values():  # warm up: first-touch pages, BLAS buffers, torch's allocator
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate who goes first
        for name in order:
            gc.collect()
            times[name].append(timed(cases[name]))
    return times


def memory_report(lora: nn.LoRALinear, x: np.ndarray, dy: np.ndarray) -> list[str]:
    """Peak extra memory of one LoRA step, and what is left over after it."""
    w_bytes = lora.weight.data.nbytes
    lora.zero_grad()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        y = lora(x)
        after_forward = tracemalloc.get_traced_memory()[0] - before - y.nbytes
        dx = lora.backward(dy)
        peak = tracemalloc.get_traced_memory()[1] - before
        left = tracemalloc.get_traced_memory()[0] - before - y.nbytes - dx.nbytes
    finally:
        tracemalloc.stop()
    grads = lora.A.grad.nbytes + lora.B.grad.nbytes
    # the cache the module keeps is the kernel's: build one the same way and look inside
    bias = None if lora.bias is None else lora.bias.data
    _, cache = F.lora_linear(x, lora.weight.data, bias, lora.A.data, lora.B.data, lora.scaling)
    big_in_cache = [
        f.name
        for f in dataclasses.fields(cache)
        if isinstance(getattr(cache, f.name), np.ndarray)
        and getattr(cache, f.name).shape == (lora.out_features, lora.in_features)
        and getattr(cache, f.name) is not lora.weight.data  # a reference to W is not a new array
    ]
    del cache
    assert not big_in_cache, f"(out, in)-sized arrays in the cache: {big_in_cache}"
    assert y.flags.c_contiguous and dx.flags.c_contiguous, "y and dx must be ordinary C-contiguous arrays"
    assert after_forward < w_bytes, f"{after_forward} bytes held after forward besides y"
    assert left < w_bytes, f"{left} bytes outlive the step besides y, dx and the gradients"
    mb = 2**20
    return [
        f"peak extra memory of one LoRA step: {peak / mb:.1f} MiB, of which y and dx are "
        f"{(y.nbytes + dx.nbytes) / mb:.0f} MiB and temporaries {(peak - y.nbytes - dx.nbytes) / mb:.1f} MiB "
        f"(W is {w_bytes / mb:.0f} MiB)",
        f"held after forward besides y (the cache): {after_forward / 2**10:.0f} KiB; "
        f"(out, in)-sized arrays in the cache besides a reference to W: none",
        f"left after the step besides y and dx: {left / 2**10:.0f} KiB "
        f"(A.grad + B.grad = {grads / 2**10:.0f} KiB); nothing (out, in)-sized outlives the step",
    ]


def load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unavailable"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    args = parser.parse_args()

    n_threads, how = blas_threads()
    cases, torch_note, lora, x, dy = make_cases(np.random.default_rng(0), n_threads)
    print(f"LoRA step benchmark: x ({N}, {IN}), W ({OUT}, {IN}), r = {R}, float32, frozen base, no bias")
    print(f"NumPy {np.__version__}, BLAS threads: {n_threads} ({how}); {args.reps} interleaved reps")
    print(torch_note)
    print(f"before: {load()} on {os.cpu_count()} CPUs")
    times = run_timings(cases, args.reps)
    print(f"after:  {load()}")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    print()
    print(f"  {'case':<26} {'median':>9} {'min':>9}")
    for name in times:
        print(f"  {name:<26} {med[name] * 1e3:6.1f} ms {best[name] * 1e3:6.1f} ms")
    print()
    comparisons = [
        ("bare x@W.T + dy@W", 1.10),
        ("trainable Linear step", 0.75),
        ("torch autograd step", 1.00),
    ]
    print(f"  {'ratio':<38} {'medians':>7} {'mins':>6}   target")
    for other, target in comparisons:
        if other not in times:
            continue
        ratio = med["lora step (module)"] / med[other]
        verdict = "ok" if ratio <= target else "MISSED"
        label = f"lora step / {other}"
        ratio_min = best["lora step (module)"] / best[other]
        print(f"  {label:<38} {ratio:6.2f}x {ratio_min:5.2f}x   <= {target:.2f}x: {verdict} (on medians)")
    overhead = med["lora step (module)"] / med["lora step (kernels only)"]
    print(f"  {'module overhead (module / kernels)':<38} {overhead:6.2f}x")
    print()
    for line in memory_report(lora, x, dy):
        print("  " + line)


if __name__ == "__main__":
    main()
