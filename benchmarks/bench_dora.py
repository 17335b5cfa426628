"""How fast is a DoRA layer's training step, next to LoRA's and to PEFT's DoRA?

Run by hand: ``python benchmarks/bench_dora.py [--reps N]``.

The case (issue 10): x (8192, 1024), W (1024, 1024), r = 8, float32, frozen
base, no bias, no dropout. One step is ``y = layer(x); dx = layer.backward(dy)``
through the module, as a user calls it, for

1. ``LoRALinear(use_dora=True)`` against lowrank's own LoRA step
   (``LoRALinear``): target <= 1.10x. DoRA's extra work is one (out, in) row
   norm and a rescale, beside the two products of N * in * out every frozen
   step pays (``x @ W'.T`` and ``dy @ W'``);
2. the DoRA step against PEFT's DoRA on PyTorch CPU, with torch limited to
   NumPy's BLAS thread count, x requiring grad so both compute dx
   (target <= 0.60x).

All cases run interleaved, one repetition of each in turn (rotating who goes
first), and the medians are compared; the minimums are printed too, and the
load average before and after. On a shared machine wall-clock ratios swing
with the load (0.98x to 1.30x for 1. in three runs at load 10 on 2 cores), so
the DoRA/LoRA ratio is also measured as CPU time (``time.process_time``) with
BLAS limited to one thread, which other processes cannot inflate: the work
each step does. Then tracemalloc (which NumPy reports its
allocations to) measures the peak extra memory of one DoRA step and of one
LoRA step, y and dx included in both, the caller holding y through the
backward pass as a network does (y is the next layer's input): the difference
must stay within one (out, in) array. DoRA's cache references y (its
magnitude gradient needs ``dy * (y - b)``) instead of keeping an (N, out)
array of its own, so a caller that drops y at once keeps it alive in DoRA's
case only; the script prints that case too.
"""

from __future__ import annotations

import argparse
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


def make_layers(rng: np.random.Generator):
    """A LoRA and a DoRA layer on copies of one base weight, with trained-looking factors."""
    base = nn.Linear(IN, OUT, bias=False, dtype=DTYPE, random_state=rng)
    W = base.weight.data
    lora = nn.LoRALinear(base, r=R, alpha=16, random_state=rng)
    lora.B.data = (0.01 * rng.standard_normal(lora.B.shape)).astype(DTYPE)
    dora_base = nn.Linear(IN, OUT, bias=False, dtype=DTYPE, random_state=rng)
    dora_base.weight.data = W.copy()
    dora = nn.LoRALinear(dora_base, r=R, alpha=16, random_state=rng, use_dora=True)
    dora.A.data, dora.B.data = lora.A.data.copy(), lora.B.data.copy()
    dora.magnitude.data = (dora.magnitude.data * rng.uniform(0.9, 1.1, OUT)).astype(DTYPE)  # m != n
    return lora, dora


def step_of(layer: nn.LoRALinear, x: np.ndarray, dy: np.ndarray):
    def step():
        layer.zero_grad()
        layer(x)
        layer.backward(dy)

    return step


def make_cases(rng: np.random.Generator, n_threads: int):
    x = rng.standard_normal((N, IN), dtype=DTYPE)
    dy = rng.standard_normal((N, OUT), dtype=DTYPE)
    lora, dora = make_layers(rng)
    cases = {"dora step (module)": step_of(dora, x, dy), "lora step (module)": step_of(lora, x, dy)}
    note = "torch or peft not importable: comparison 2 skipped"
    try:
        import peft
        import torch
    except ImportError:
        return cases, note, lora, dora, x, dy
    torch.set_num_threads(n_threads)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(IN, OUT, bias=False)

        def forward(self, t):
            return self.fc(t)

    config = peft.LoraConfig(r=R, lora_alpha=16, target_modules=["fc"], use_dora=True)
    pm = peft.get_peft_model(Wrap(), config)
    fc = pm.base_model.model.fc
    with torch.no_grad():
        fc.base_layer.weight.copy_(torch.from_numpy(dora.weight.data))
        fc.lora_A["default"].weight.copy_(torch.from_numpy(dora.A.data))
        fc.lora_B["default"].weight.copy_(torch.from_numpy(dora.B.data))
        fc.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(dora.magnitude.data))
    pm.train()
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)

    def peft_step():
        pm.zero_grad(set_to_none=True)
        xg = xt.detach().requires_grad_()  # dx is computed, as in the lowrank step
        pm(xg).backward(dyt)

    cases["peft dora step"] = peft_step
    note = (
        f"torch {torch.__version__}, peft {peft.__version__}: torch.set_num_threads({n_threads}) to match "
        "NumPy's BLAS; base frozen, x requires grad"
    )
    return cases, note, lora, dora, x, dy


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


def cpu_time_ratio(dora: nn.LoRALinear, lora: nn.LoRALinear, x: np.ndarray, dy: np.ndarray, reps: int):
    """Median CPU seconds of a DoRA and a LoRA step with one BLAS thread, interleaved; None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    steps = {"dora": step_of(dora, x, dy), "lora": step_of(lora, x, dy)}
    cpu: dict[str, list[float]] = {"dora": [], "lora": []}
    with threadpool_limits(1):
        for step in steps.values():
            step()
        for rep in range(reps):
            for name in ("dora", "lora") if rep % 2 else ("lora", "dora"):
                gc.collect()
                start = time.process_time()
                steps[name]()
                cpu[name].append(time.process_time() - start)
    return statistics.median(cpu["dora"]), statistics.median(cpu["lora"])


def peak_of_step(layer: nn.LoRALinear, x: np.ndarray, dy: np.ndarray, hold_y: bool = True) -> int:
    """Peak bytes NumPy allocates during one step (y, dx, gradients and temporaries)."""
    layer.zero_grad()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        y = layer(x)
        if not hold_y:
            del y
        layer.backward(dy)
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unavailable"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions (default 11)")
    args = parser.parse_args()

    n_threads, how = blas_threads()
    cases, note, lora, dora, x, dy = make_cases(np.random.default_rng(0), n_threads)
    print(f"DoRA step benchmark: x ({N}, {IN}), W ({OUT}, {IN}), r = {R}, float32, frozen base, no bias")
    print(f"NumPy {np.__version__}, BLAS threads: {n_threads} ({how}); {args.reps} interleaved reps")
    print(note)
    print(f"before: {load()} on {os.cpu_count()} CPUs")
    times = run_timings(cases, args.reps)
    print(f"after:  {load()}")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    print()
    print(f"  {'case':<22} {'median':>9} {'min':>9}")
    for name in times:
        print(f"  {name:<22} {med[name] * 1e3:6.1f} ms {best[name] * 1e3:6.1f} ms")
    print()
    print(f"  {'ratio':<40} {'medians':>7} {'mins':>6}   target")
    for other, target in [("lora step (module)", 1.10), ("peft dora step", 0.60)]:
        if other not in times:
            continue
        ratio = med["dora step (module)"] / med[other]
        ratio_min = best["dora step (module)"] / best[other]
        verdict = "ok" if ratio <= target else "MISSED"
        label = f"dora step / {other}"
        print(f"  {label:<40} {ratio:6.2f}x {ratio_min:5.2f}x   <= {target:.2f}x: {verdict} (on medians)")
    cpu = cpu_time_ratio(dora, lora, x, dy, args.reps)
    if cpu is None:
        print("  CPU-time ratio skipped: pip install threadpoolctl")
    else:
        ratio = cpu[0] / cpu[1]
        verdict = "ok" if ratio <= 1.10 else "MISSED"
        print(f"  {'dora / lora, CPU time, 1 BLAS thread':<40} {ratio:6.2f}x {'':>6}   <= 1.10x: {verdict} "
              f"({cpu[0] * 1e3:.0f} / {cpu[1] * 1e3:.0f} ms)")  # fmt: skip
    print()
    mb, w_bytes = 2**20, dora.weight.data.nbytes
    peak_dora, peak_lora = peak_of_step(dora, x, dy), peak_of_step(lora, x, dy)
    extra = peak_dora - peak_lora
    verdict = "ok" if extra <= w_bytes else "MISSED"
    print(f"  peak memory of one step: DoRA {peak_dora / mb:.1f} MiB, LoRA {peak_lora / mb:.1f} MiB "
          f"(y and dx {(N * OUT + N * IN) * 4 / mb:.0f} MiB in both)")  # fmt: skip
    print(f"  DoRA's extra peak: {extra / mb:.2f} MiB; one (out, in) array is {w_bytes / mb:.0f} MiB: "
          f"<= 1 array: {verdict}")  # fmt: skip
    dropped = peak_of_step(dora, x, dy, hold_y=False) - peak_of_step(lora, x, dy, hold_y=False)
    print(f"  if the caller drops y at once: DoRA's extra peak {dropped / mb:.2f} MiB (its cache keeps y alive)")


if __name__ == "__main__":
    main()
