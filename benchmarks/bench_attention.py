"""How fast are the attention kernels, next to PyTorch eager on the same arrays?

Run by hand: ``python benchmarks/bench_attention.py [--reps N] [--threads T] [--vocab V]``.

Each case is one forward and one backward pass of a kernel of
``lowrank.nn.functional`` (through its unchecked core, as the layers call it)
on the shapes of the GPT-2 training-step benchmark (n_embd 128, n_head 4,
batch 16, T = 64, float32), against the same computation in PyTorch eager
with autograd:

============================  =================================================
case                          shapes
============================  =================================================
layer_norm                    x (16, 64, 128), weight and bias (128,)
scaled_dot_product_attention  q, k, v (16, 4, 64, 32), causal (torch: its SDPA
                              and the same maths written out, transformers'
                              "eager" attention)
gelu_tanh                     (16, 64, 512) (torch: gelu(approximate="tanh")
                              and transformers' NewGELUActivation, gelu_new)
softmax                       (16, 4, 64, 64), last axis
embedding                     1024 token ids into (V, 128), backward scatters
cross_entropy                 logits (1024, V), every 10th target ignored
conv1d                        x (1024, 128) @ weight (128, 384) + bias
============================  =================================================

All cases run interleaved, one repetition of each in turn (rotating who goes
first), and the medians are compared, so drift on a shared machine hits every
side alike. Both sides run on ``--threads`` threads (default 1:
``threadpoolctl`` limits NumPy's BLAS, ``torch.set_num_threads`` torch's).
The ratio is lowrank / torch: below 1, lowrank is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, installed or not
from lowrank.nn import functional as F

B, T, C, H = 16, 64, 128, 4
DTYPE = np.float32


def load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unavailable"


@contextlib.contextmanager
def thread_limit(n: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("threadpoolctl not installed: NumPy's BLAS threads are not limited")
        yield
        return
    with threadpool_limits(n):
        yield


def lowrank_cases(rng: np.random.Generator, vocab: int) -> tuple[dict[str, Callable[[], object]], dict]:
    """One forward + backward of each kernel's core, and the arrays (drawn once) the torch side reads too."""
    normal = lambda *shape: rng.standard_normal(shape, dtype=DTYPE)  # noqa: E731
    x, w, b, dy = normal(B, T, C), normal(C), normal(C), normal(B, T, C)
    q, k, v, dya = (normal(B, H, T, C // H) for _ in range(4))
    g, dg = normal(B, T, 4 * C), normal(B, T, 4 * C)
    s, ds = normal(B, H, T, T), normal(B, H, T, T)
    ids = rng.integers(0, vocab, (B, T))
    table = normal(vocab, C)
    logits = normal(B * T, vocab)
    target = rng.integers(0, vocab, B * T)
    target[::10] = -100
    xc, wc, bc, dyc = normal(B * T, C), normal(C, 3 * C), normal(3 * C), normal(B * T, 3 * C)

    def layer_norm():
        _, cache = F.layer_norm_core(x, w, b, 1e-5)
        F.layer_norm_backward_core(dy, cache)

    def attention():
        _, cache = F.scaled_dot_product_attention_core(q, k, v, None, True, None, None)
        F.scaled_dot_product_attention_backward_core(dya, cache)

    def gelu_tanh():
        _, cache = F.gelu_tanh_core(g)
        F.gelu_tanh_backward_core(dg, cache)

    def softmax():
        _, cache = F.softmax_core(s.copy(), -1)  # the core works in place: it gets its own copy, as torch makes one
        F.softmax_backward_core(ds, cache)

    def embedding():
        _, cache = F.embedding_core(ids, table)
        F.embedding_backward_core(dy, cache)

    def cross_entropy():
        F.cross_entropy_core(logits, target)

    def conv1d():
        _, cache = F.conv1d_core(xc, wc, bc)
        F.conv1d_backward_core(dyc, cache)

    arrays = dict(x=x, w=w, b=b, dy=dy, q=q, k=k, v=v, dya=dya, g=g, dg=dg, s=s, ds=ds, ids=ids, table=table,
                  logits=logits, target=target, xc=xc, wc=wc, bc=bc, dyc=dyc)
    return {"layer_norm": layer_norm, "scaled_dot_product_attention": attention, "gelu_tanh": gelu_tanh,
            "softmax": softmax, "embedding": embedding, "cross_entropy": cross_entropy, "conv1d": conv1d}, arrays


def torch_cases(torch, a: dict) -> dict[str, list[tuple[str, Callable[[], object]]]]:
    """The same computations in torch eager, autograd for the backward: (label, step) per kernel."""
    tF = torch.nn.functional
    leaf = lambda arr: torch.from_numpy(arr).requires_grad_()  # noqa: E731
    t = {k: torch.from_numpy(v) for k, v in a.items()}
    x, w, b = leaf(a["x"]), leaf(a["w"]), leaf(a["b"])
    q, k, v = leaf(a["q"]), leaf(a["k"]), leaf(a["v"])
    g, s, table, logits = leaf(a["g"]), leaf(a["s"]), leaf(a["table"]), leaf(a["logits"])
    xc, wc, bc = leaf(a["xc"]), leaf(a["wc"]), leaf(a["bc"])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    d = C // H

    def eager_attention():  # transformers' GPT-2 "eager" attention, the maths written out
        scores = (q @ k.transpose(-1, -2)) / d**0.5
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        (torch.softmax(scores, dim=-1) @ v).backward(t["dya"])

    try:
        from transformers.activations import NewGELUActivation

        gelu_new = NewGELUActivation()
        gelu_cases = [("transformers gelu_new", lambda: gelu_new(g).backward(t["dg"]))]
    except ImportError:
        gelu_cases = []

    return {
        "layer_norm": [("torch layer_norm", lambda: tF.layer_norm(x, (C,), w, b, 1e-5).backward(t["dy"]))],
        "scaled_dot_product_attention": [
            ("torch SDPA causal", lambda: tF.scaled_dot_product_attention(q, k, v, is_causal=True).backward(t["dya"])),
            ("torch eager (GPT-2's)", eager_attention),
        ],
        "gelu_tanh": [("torch gelu tanh", lambda: tF.gelu(g, approximate="tanh").backward(t["dg"])), *gelu_cases],
        "softmax": [("torch softmax", lambda: torch.softmax(s, dim=-1).backward(t["ds"]))],
        "embedding": [("torch embedding", lambda: tF.embedding(t["ids"], table).backward(t["dy"]))],
        "cross_entropy": [("torch cross_entropy", lambda: tF.cross_entropy(logits, t["target"]).backward())],
        "conv1d": [("torch addmm", lambda: torch.addmm(bc, xc, wc).backward(t["dyc"]))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21, help="interleaved repetitions (default 21)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS / torch threads, both sides (default 1)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary of embedding and cross_entropy (1024)")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: pip install torch (the peer)")
        return
    torch.set_num_threads(args.threads)
    ours, arrays = lowrank_cases(np.random.default_rng(0), args.vocab)
    theirs = torch_cases(torch, arrays)
    cases: dict[str, Callable[[], object]] = {f"lowrank {name}": fn for name, fn in ours.items()}
    for name, peers in theirs.items():
        for label, fn in peers:
            cases[f"{name}|{label}"] = fn

    print(f"attention kernels, forward + backward, float32, B {B} T {T} C {C} H {H}, vocab {args.vocab}, "
          f"{args.threads} thread(s); torch {torch.__version__}; {load()}")
    with thread_limit(args.threads):
        for fn in cases.values():  # warm up: first-touch pages, allocators, BLAS buffers
            fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
            for name in order:
                gc.collect()
                start = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - start)
    med = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    print(f"{'kernel':<30} {'lowrank ms':>10}  {'peer':<24} {'peer ms':>9}  {'ratio':>5}")
    for name in ours:
        for label, _ in theirs[name]:
            peer = med[f"{name}|{label}"]
            print(f"{name:<30} {med[f'lowrank {name}']:10.3f}  {label:<24} {peer:9.3f}  "
                  f"{med[f'lowrank {name}'] / peer:5.2f}")
    print(f"medians of {args.reps} interleaved repetitions; {load()}")


if __name__ == "__main__":
    main()
