"""How fast does the demo's MLP train, next to PyTorch eager?

Run by hand: ``python benchmarks/bench_train.py [--reps N] [--steps K] [--no-profile]``.

1. One training step of ``lowrank demo``'s network, ``MLP([32, 128, 6],
   "tanh")`` in float32 at the demo's batch size 128: forward, softmax
   cross-entropy and its backward, Adam update. Two variants:

   (a) the plain MLP, every parameter trainable;
   (b) the MLP with LoRA r=8 (alpha 16) on both Linear layers
       (``nn.inject_lora``): base weights frozen, Adam over A and B only.

   Each is compared with PyTorch eager on the same network, weights and batch
   (``torch.nn.Sequential(Linear, Tanh, Linear)``, ``F.cross_entropy``,
   ``torch.optim.Adam`` with its default, per-parameter implementation); the
   torch LoRA forward is written by hand, PEFT's order:
   ``linear(x, W, b) + scaling * (x @ A.T) @ B.T``. Target: lowrank / torch
   <= 0.8 (at this size per-operation overhead dominates, not arithmetic).
   Both thread settings are measured, the same for both sides: 1 thread
   (``threadpoolctl.threadpool_limits(1)`` for NumPy's BLAS,
   ``torch.set_num_threads(1)``), and the defaults (NumPy's BLAS pool as
   loaded, ``torch.set_num_threads`` back to its start-up value).
2. Epoch throughput of ``lowrank.train.fit`` on the demo's pretraining task
   (20,000 samples, batch 128, Adam, ``verbose=False``), at both thread
   settings (torch is not involved), without and with
   validation (the demo passes ``val``), next to the same loop written out by
   hand (shuffle, slice, step), so that fit's own overhead shows.
3. Unless ``--no-profile``, when a lowrank step misses the target (or with
   ``--profile``): cProfile of
   the lowrank step (1 thread), the functions that cost the most, in µs per step.

Every timing is a median over interleaved repetitions, the order of the cases
rotated each time, so drift on a shared machine hits every side alike. A
step repetition times ``--steps`` consecutive steps and divides.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, installed or not
from lowrank import nn
from lowrank.nn import functional as F
from lowrank.nn.optim import Adam
from lowrank.train.data import make_tasks
from lowrank.train.fit import fit

SIZES = [32, 128, 6]  # lowrank.demo: [n_features, _HIDDEN, n_classes]
BATCH = 128  # lowrank.demo._BATCH
LR = 3e-3  # lowrank.demo._PRETRAIN_LR
R, ALPHA = 8, 16
TARGET = 0.8


def load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unavailable"


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    pools = [f"{p.get('internal_api')} {p.get('num_threads')} threads" for p in threadpool_info()
             if p.get("user_api") == "blas"]
    return ", ".join(pools) or "no BLAS pool reported"


def thread_limit(n: int | None):
    """NumPy's BLAS limited to ``n`` threads (None: as loaded)."""
    if n is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=n, user_api="blas")


def median_ms(values: list[float]) -> str:
    return f"{1e3 * statistics.median(values):8.4f} ms"


def interleave(cases: dict, reps: int, per_call: int = 1) -> dict[str, list[float]]:
    """Run each case once as warm-up, then ``reps`` rounds in rotating order; seconds per call / per_call."""
    for fn in cases.values():
        fn()
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            gc.collect()
            start = time.perf_counter()
            cases[name]()
            times[name].append((time.perf_counter() - start) / per_call)
    return times


# ---------------------------------------------------------------- 1. one step


def lowrank_model(lora: bool) -> nn.Module:
    model = nn.MLP(SIZES, activation="tanh", random_state=0)
    if lora:
        nn.inject_lora(model, r=R, alpha=ALPHA, random_state=0)
        for layer in (model[0], model[2]):  # a trained-looking adapter instead of B = 0
            layer.B.data = (0.01 * np.random.default_rng(1).standard_normal(layer.B.shape)).astype(np.float32)
    return model


def lowrank_stepper(model: nn.Module, xb: np.ndarray, yb: np.ndarray, steps: int):
    optimizer = Adam(model.named_parameters(), lr=LR)

    def one_step():
        out = model(xb)  # (128, 6)
        _, dout = F.cross_entropy(out, yb)
        model.zero_grad()
        model.backward(dout)
        optimizer.step()

    def run():
        for _ in range(steps):
            one_step()

    return run, one_step


def torch_stepper(torch, model: nn.Module, lora: bool, xb: np.ndarray, yb: np.ndarray, steps: int):
    """The same network, weights and batch in torch eager; returns run()."""
    state = {k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()}
    xt, yt = torch.from_numpy(xb), torch.from_numpy(yb)
    tnn, tF = torch.nn, torch.nn.functional
    if not lora:
        net = tnn.Sequential(tnn.Linear(SIZES[0], SIZES[1]), tnn.Tanh(), tnn.Linear(SIZES[1], SIZES[2]))
        net.load_state_dict({k: v for k, v in state.items()})
        params = list(net.parameters())
        forward = net
    else:
        scaling = ALPHA / R
        W0, b0, W2, b2 = (state[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))  # frozen
        A0, B0, A2, B2 = (state[k].clone().requires_grad_()
                          for k in ("0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"))
        params = [A0, B0, A2, B2]

        def forward(x):
            h = tF.linear(x, W0, b0) + scaling * ((x @ A0.T) @ B0.T)  # (128, 128), PEFT's order
            h = torch.tanh(h)
            return tF.linear(h, W2, b2) + scaling * ((h @ A2.T) @ B2.T)  # (128, 6)

    optimizer = torch.optim.Adam(params, lr=LR)

    def run():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = tF.cross_entropy(forward(xt), yt)
            loss.backward()
            optimizer.step()

    return run


def bench_steps(torch, xb, yb, reps: int, steps: int, threads: int | None, torch_default_threads: int):
    label = "1 thread" if threads == 1 else "default threads"
    with thread_limit(threads):
        if torch is not None:
            torch.set_num_threads(threads or torch_default_threads)
        cases = {}
        for lora in (False, True):
            kind = "LoRA r=8" if lora else "full"
            cases[f"lowrank {kind}"] = lowrank_stepper(lowrank_model(lora), xb, yb, steps)[0]
            if torch is not None:
                cases[f"torch {kind}"] = torch_stepper(torch, lowrank_model(lora), lora, xb, yb, steps)
        times = interleave(cases, reps, per_call=steps)
        blas = blas_info()
    tthreads = f", torch.get_num_threads() = {threads or torch_default_threads}" if torch is not None else ""
    print(f"\n[{label}] NumPy BLAS: {blas}{tthreads}")
    ratios = {}
    for kind in ("full", "LoRA r=8"):
        lr_t = times[f"lowrank {kind}"]
        line = f"  {kind:9s} lowrank {median_ms(lr_t)}/step (min {1e3 * min(lr_t):.4f})"
        if torch is not None:
            t_t = times[f"torch {kind}"]
            ratio = statistics.median(lr_t) / statistics.median(t_t)
            ratios[kind] = ratio
            verdict = "meets" if ratio <= TARGET else "MISSES"
            line += (f" | torch {median_ms(t_t)}/step (min {1e3 * min(t_t):.4f}) | "
                     f"lowrank/torch {ratio:.2f}x ({verdict} <= {TARGET}x)")
        print(line)
    return ratios


# ---------------------------------------------------------------- 2. fit throughput


def bench_fit(task, reps: int, threads: int | None) -> None:
    X, y, n = task.X_train, task.y_train, task.X_train.shape[0]
    models = {name: nn.MLP(SIZES, activation="tanh", random_state=0) for name in ("fit", "fit+val", "raw")}
    optims = {name: Adam(m.named_parameters(), lr=LR) for name, m in models.items()}
    rngs = {name: np.random.default_rng(0) for name in models}

    def run_fit(name, val):
        return lambda: fit(models[name], X, y, loss="cross_entropy", optimizer=optims[name], epochs=1,
                           batch_size=BATCH, val=val, random_state=rngs[name], verbose=False)

    def raw_epoch():
        model, optimizer = models["raw"], optims["raw"]
        order = rngs["raw"].permutation(n)
        for start in range(0, n, BATCH):
            idx = order[start:start + BATCH]
            out = model(X[idx])
            _, dout = F.cross_entropy(out, y[idx])
            model.zero_grad()
            model.backward(dout)
            optimizer.step()

    cases = {"fit (no val)": run_fit("fit", None),
             "fit (val, as the demo)": run_fit("fit+val", (task.X_val, task.y_val)),
             "raw loop": raw_epoch}
    with thread_limit(threads):
        times = interleave(cases, reps)
    n_steps = -(-n // BATCH)
    raw = statistics.median(times["raw loop"])
    print(f"\nEpoch throughput: pretraining task, {n} samples, batch {BATCH} ({n_steps} steps), "
          f"val {task.X_val.shape[0]} samples, Adam, {'1 thread' if threads == 1 else 'default threads'}, "
          f"{reps} interleaved reps")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:24s} {med:7.3f} s/epoch  {n / med:9,.0f} samples/s  {1e6 * med / n_steps:7.1f} µs/step"
              f"  ({med / raw:.2f}x the raw loop)")


# ---------------------------------------------------------------- 3. profile


def profile_step(xb, yb, lora: bool, steps: int, top: int = 18) -> None:
    model = lowrank_model(lora)
    _, one_step = lowrank_stepper(model, xb, yb, 1)
    with thread_limit(1):
        for _ in range(20):
            one_step()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            one_step()
        profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = f"{Path(filename).name}:{line}({func})" if line else func
        rows.append((tottime, cumtime, ncalls, where))
    total = sum(r[0] for r in rows)
    print(f"\ncProfile of the lowrank {'LoRA r=8' if lora else 'full'} step, 1 thread, {steps} steps: "
          f"{1e6 * total / steps:.0f} µs/step under the profiler (its overhead inflates Python-heavy code)")
    print(f"  {'self µs/step':>12} {'cum µs/step':>12} {'calls/step':>10}  function")
    for tottime, cumtime, ncalls, where in sorted(rows, reverse=True)[:top]:
        print(f"  {1e6 * tottime / steps:12.1f} {1e6 * cumtime / steps:12.1f} {ncalls / steps:10.1f}  {where}")


def print_header(args: argparse.Namespace, torch, settings: list, torch_default: int) -> None:
    """What is measured, on which machine and libraries, and the load before."""
    print(f"Training-step benchmark: MLP({SIZES}, 'tanh'), float32, batch {BATCH}, Adam(lr={LR}); "
          f"LoRA r={R}, alpha={ALPHA} on both layers")
    print(f"NumPy {np.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"{args.reps} interleaved reps x {args.steps} steps each, medians")
    if torch is None:
        print("torch not importable: skipped the PyTorch comparison (pip install torch)")
    else:
        foreach = torch.optim.Adam([torch.zeros(1, requires_grad=True)]).defaults["foreach"]
        print(f"torch {torch.__version__} eager, default torch.optim.Adam (foreach={foreach}); "
              f"start-up torch.get_num_threads() = {torch_default}")
    if settings == [None]:
        print("threadpoolctl not installed: only the default thread setting is measured (pip install threadpoolctl)")
    print(f"before: {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21, help="interleaved repetitions of each step case (default 21)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repetition (default 20)")
    parser.add_argument("--fit-reps", type=int, default=5, help="interleaved epochs of each fit case (default 5)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile section")
    parser.add_argument("--profile", action="store_true", help="profile the lowrank steps even if they meet the target")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        torch = None
    try:
        import threadpoolctl  # noqa: F401
        settings = [1, None]
    except ImportError:
        settings = [None]
    torch_default = torch.get_num_threads() if torch is not None else 0

    tasks = make_tasks(random_state=0)
    task = tasks.pretrain
    xb, yb = task.X_train[:BATCH], task.y_train[:BATCH]
    print_header(args, torch, settings, torch_default)

    all_ratios = {}
    for threads in settings:
        all_ratios[threads] = bench_steps(torch, xb, yb, args.reps, args.steps, threads, torch_default)
    if torch is not None:
        torch.set_num_threads(torch_default)

    for threads in settings:
        bench_fit(task, args.fit_reps, threads)

    missed = {kind for ratios in all_ratios.values() for kind, r in ratios.items() if r > TARGET}
    if args.profile:
        missed = {"full", "LoRA r=8"}
    if missed and not args.no_profile:
        for kind in ("full", "LoRA r=8"):
            if kind in missed:
                profile_step(xb, yb, kind != "full", steps=500)
    print(f"\nafter: {load()}")


if __name__ == "__main__":
    main()
