"""How fast are LoRA on Conv1D, on an Embedding and on a fused qkv projection (enable_lora)?

Run by hand: ``python benchmarks/bench_lora_variants.py [--reps N]``.

One training step (``y = layer(x); layer.backward(dy)``, frozen base, float32)
of GPT-2-like sizes: ``c_attn`` with n_embd 768 (in 768, out 2304), r = 8,
B·T = 2048 rows; ``wte`` with a 50257 × 768 table and 2048 token ids. Compared,
interleaved repetition by repetition (medians; ratio below 1: the first is faster):

1. LoRALinear on a Conv1D (the kernel reads the ``(out, in)`` view ``weight.T``)
   against LoRALinear on a Linear holding the same weight contiguous: what the
   transposed layout costs;
2. LoRAMergedLinear with enable_lora=[True, False, True] against LoRALinear
   on the whole c_attn at the same r (the per-block einsums against one product);
3. PyTorch eager peers when installed, torch limited to NumPy's BLAS thread
   count: PEFT's LoRA on transformers' Conv1D (``fan_in_fan_out``), loralib's
   MergedLinear, PEFT's LoRA on an Embedding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, installed or not
from lowrank import nn

N, IN, OUT, R, VOCAB = 2048, 768, 2304, 8, 50257
DTYPE = np.float32


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(cases: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per case, one repetition of each in turn (rotating who goes first), after one warm-up."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            times[name].append(timed(cases[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def step(layer: nn.Module, x: np.ndarray, dy: np.ndarray) -> Callable[[], object]:
    def run() -> object:
        layer.zero_grad()
        layer(x)
        return layer.backward(dy)

    return run


def torch_cases(rng: np.random.Generator, conv_weight: np.ndarray, x: np.ndarray, dy: np.ndarray,
                idx: np.ndarray, dy_emb: np.ndarray, table: np.ndarray) -> dict[str, Callable[[], object]]:  # fmt: skip
    try:
        import torch
    except ImportError:
        print("skipped torch peers: pip install torch peft transformers loralib")
        return {}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    cases: dict[str, Callable[[], object]] = {}
    tx, tdy = torch.tensor(x, requires_grad=True), torch.tensor(dy)
    tidx, tdy_emb = torch.tensor(idx), torch.tensor(dy_emb)

    def torch_step(module: object, inp: object, grad: object) -> Callable[[], object]:
        def run() -> object:
            module.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
            out = module(inp)  # type: ignore[operator]
            out.backward(grad)
            return out

        return run

    try:
        import peft
        from transformers.pytorch_utils import Conv1D

        conv = torch.nn.Sequential(Conv1D(OUT, IN))
        with torch.no_grad():
            conv[0].weight.copy_(torch.tensor(conv_weight))
        pm = peft.get_peft_model(conv, peft.LoraConfig(r=R, lora_alpha=16, target_modules=["0"], fan_in_fan_out=True))
        cases["PEFT LoRA on Conv1D (torch)"] = torch_step(pm, tx, tdy)
        emb = torch.nn.Sequential(torch.nn.Embedding(VOCAB, IN))
        with torch.no_grad():
            emb[0].weight.copy_(torch.tensor(table))
        pe = peft.get_peft_model(emb, peft.LoraConfig(r=R, lora_alpha=16, target_modules=["0"]))
        cases["PEFT LoRA on Embedding (torch)"] = torch_step(pe, tidx, tdy_emb)
    except ImportError:
        print("skipped PEFT peers: pip install peft transformers")
    try:
        import loralib

        merged = loralib.MergedLinear(IN, OUT, r=R, lora_alpha=16, enable_lora=[True, False, True],
                                      fan_in_fan_out=True, merge_weights=False)  # fmt: skip
        with torch.no_grad():
            merged.weight.copy_(torch.tensor(conv_weight))
            merged.lora_B.normal_(std=0.01)
        cases["loralib MergedLinear [q, v] (torch)"] = torch_step(merged, tx, tdy)
    except ImportError:
        print("skipped loralib peer: pip install loralib")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, IN), dtype=DTYPE)
    dy = rng.standard_normal((N, OUT), dtype=DTYPE)
    conv = nn.Conv1D(IN, OUT, dtype=DTYPE, random_state=rng)
    lin = nn.Linear(IN, OUT, dtype=DTYPE, random_state=rng)
    lin.load_state_dict({"weight": np.ascontiguousarray(conv.weight.data.T), "bias": conv.bias.data})
    on_conv = nn.LoRALinear(conv, r=R, alpha=16, random_state=0)
    on_lin = nn.LoRALinear(lin, r=R, alpha=16, random_state=0)
    merged = nn.LoRAMergedLinear(nn.Conv1D(IN, OUT, dtype=DTYPE, random_state=1), r=R, alpha=16,
                                 enable_lora=[True, False, True], random_state=0)  # fmt: skip
    for layer in (on_conv, on_lin, merged):
        layer.B.data = (0.01 * rng.standard_normal(layer.B.shape)).astype(DTYPE)
    table = rng.standard_normal((VOCAB, IN), dtype=DTYPE)
    emb = nn.Embedding(VOCAB, IN, dtype=DTYPE)
    emb.weight.data = table
    lora_emb = nn.LoRAEmbedding(emb, r=R, alpha=16, random_state=0)
    lora_emb.A.data = (0.01 * rng.standard_normal(lora_emb.A.shape)).astype(DTYPE)
    idx = rng.integers(0, VOCAB, (N,))
    dy_emb = rng.standard_normal((N, IN), dtype=DTYPE)

    cases = {
        "LoRALinear on Conv1D": step(on_conv, x, dy),
        "LoRALinear on Linear": step(on_lin, x, dy),
        "LoRAMergedLinear [q, v]": step(merged, x, dy),
        "LoRAEmbedding": step(lora_emb, idx, dy_emb),
    }
    cases.update(torch_cases(rng, conv.weight.data, x, dy, idx, dy_emb, table))
    print(f"load average before: {os.getloadavg()}")
    med = interleaved(cases, args.reps)
    print(f"load average after: {os.getloadavg()}; {args.reps} repetitions, medians")
    for name, t in med.items():
        print(f"  {name:40s} {1e3 * t:8.2f} ms")

    def ratio(a: str, b: str) -> None:
        if a in med and b in med:
            print(f"  {a} / {b}: {med[a] / med[b]:.2f}x")

    print("ratios (below 1: the first is faster)")
    ratio("LoRALinear on Conv1D", "LoRALinear on Linear")
    ratio("LoRAMergedLinear [q, v]", "LoRALinear on Conv1D")
    ratio("LoRALinear on Conv1D", "PEFT LoRA on Conv1D (torch)")
    ratio("LoRAMergedLinear [q, v]", "loralib MergedLinear [q, v] (torch)")
    ratio("LoRAEmbedding", "PEFT LoRA on Embedding (torch)")


if __name__ == "__main__":
    main()
