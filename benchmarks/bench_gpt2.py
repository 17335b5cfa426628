"""How fast does nn.GPT2 train, next to transformers' GPT2LMHeadModel in PyTorch eager?

Run by hand: ``python benchmarks/bench_gpt2.py [--reps N] [--steps K] [--vocab V] [--dropout P] [--no-memory]``.

1. One training step of a GPT-2 with n_layer 4, n_embd 128, n_head 4, on a
   batch of 16 sequences of T = 64 tokens (``--vocab`` tokens, default 1024;
   n_positions = 64), float32: forward, the next-token loss
   (``nn.lm_loss``; transformers' ``labels=`` loss) and its backward, one
   AdamW step (lr 1e-3, weight decay 0.01 on every parameter, both sides).
   Dropout is off by default (``--dropout`` sets all three rates), so the
   two sides do the same arithmetic. Cases:

   (a) full fine-tuning: every parameter trainable;
   (b) LoRA r = 8 (alpha 16) on every ``c_attn`` (frozen base, no
       frozen-weight gradient computed): lowrank's ``nn.inject_lora`` against
       PEFT's ``LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True)``,
       when both are available (else skipped, with the reason).

   The same weights and batch on both sides (lowrank loads the transformers
   state dict). Both thread settings are measured, the same for both sides:
   1 thread (``threadpoolctl.threadpool_limits(1)``, ``torch.set_num_threads(1)``)
   and 2. Target: lowrank / torch <= 1.0.
2. Peak memory of each side's step, unless ``--no-memory``: each side runs
   in a fresh process (default threads) that imports only its own library,
   builds the model, reads its resident peak (``VmHWM``), runs ``1 + --steps`` steps and
   reads it again; printed are the resident peak and its growth during the
   steps (activations, gradients, optimizer state).

Every timing is a median over interleaved repetitions, the order of the cases
rotated each time, so drift on a shared machine hits every side alike. A
repetition times ``--steps`` consecutive steps and divides.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, installed or not
from lowrank import nn
from lowrank.nn.optim import AdamW

SIZES = dict(n_layer=4, n_embd=128, n_head=4, n_positions=64)
BATCH, T = 16, 64
LR, WEIGHT_DECAY = 1e-3, 0.01
R, ALPHA = 8, 16
TARGET = 1.0


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
        yield
        return
    with threadpool_limits(n):
        yield


def interleave(cases: dict, reps: int) -> dict[str, list[float]]:
    """Run each case ``reps`` times, rotating the order; seconds per call."""
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            gc.collect()
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------- the two sides


def torch_model(torch, transformers, vocab: int, dropout: float, lora: bool):
    config = transformers.GPT2Config(vocab_size=vocab, **SIZES, embd_pdrop=dropout, attn_pdrop=dropout,
                                     resid_pdrop=dropout, attn_implementation="eager",
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()
    if lora:
        import peft

        lora_config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["c_attn"], fan_in_fan_out=True,
                                      lora_dropout=0.0, bias="none")
        model = peft.get_peft_model(model, lora_config)
    return model


def lowrank_model(hf_state: dict, vocab: int, dropout: float, lora: bool) -> nn.GPT2:
    model = nn.GPT2(vocab_size=vocab, **SIZES, embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout,
                    dtype=np.float32, random_state=0)
    model.load_state_dict(hf_state)
    if lora:
        nn.inject_lora(model, r=R, alpha=ALPHA, target_modules=["c_attn"], random_state=0)
    return model.train()


def lowrank_stepper(model: nn.GPT2, ids: np.ndarray, steps: int):
    optimizer = AdamW(model.named_parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def run():
        for _ in range(steps):
            logits = model(ids)  # (B, T, V)
            _, dlogits = nn.lm_loss(logits, ids)
            model.zero_grad()
            model.backward(dlogits)
            optimizer.step()

    return run


def torch_stepper(torch, model, ids: np.ndarray, steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    t_ids = torch.tensor(ids)

    def run():
        for _ in range(steps):
            loss = model(input_ids=t_ids, labels=t_ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def build(case: str, vocab: int, dropout: float):
    """(lowrank model, torch model, ids) for case "full" or "lora"; raises ImportError when a peer is missing."""
    import torch
    import transformers

    lora = case == "lora"
    hf = torch_model(torch, transformers, vocab, dropout, lora=False)
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    ours = lowrank_model(state, vocab, dropout, lora)
    if lora:
        hf = torch_model(torch, transformers, vocab, dropout, lora=True)
    ids = np.random.default_rng(0).integers(0, vocab, (BATCH, T))
    return ours, hf, ids


def trainable(model) -> int:
    return sum(p.size for p in model.parameters() if p.trainable)


# ---------------------------------------------------------------- 1. time


def bench_steps(case: str, args: argparse.Namespace, threads: int) -> float | None:
    import torch

    try:
        ours, hf, ids = build(case, args.vocab, args.dropout)
    except ImportError as exc:
        print(f"  {case}: skipped: {exc} (pip install peft)")
        return None
    except (TypeError, ValueError) as exc:
        print(f"  {case}: skipped: {type(exc).__name__}: {exc}")
        return None
    with thread_limit(threads):
        torch.set_num_threads(threads)
        cases = {"lowrank": lowrank_stepper(ours, ids, args.steps), "torch": torch_stepper(torch, hf, ids, args.steps)}
        for run in cases.values():
            run()  # warm-up: optimizer state, allocator, BLAS
        times = interleave(cases, args.reps)
    ms = {k: 1e3 * statistics.median(v) / args.steps for k, v in times.items()}
    ratio = ms["lowrank"] / ms["torch"]
    verdict = "ok" if ratio <= TARGET else "MISSES the target"
    n_torch = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    print(f"  {case:<5} trainable {trainable(ours):>9,} (torch {n_torch:,})  lowrank {ms['lowrank']:8.2f} ms  "
          f"torch {ms['torch']:8.2f} ms  ratio {ratio:5.2f}  ({verdict}, {args.reps} reps x {args.steps} steps)")
    return ratio


# ---------------------------------------------------------------- 2. memory


def peak_rss_mib() -> float:
    """This process's resident high-water mark, MiB.

    Linux's ``VmHWM`` belongs to the process image: ``ru_maxrss`` would
    carry the parent's peak across ``fork`` and ``exec`` (the parent here
    holds torch), so it is read first; elsewhere ``ru_maxrss`` (KiB on
    Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def measure_memory(side: str, case: str, vocab: int, dropout: float, steps: int) -> dict:
    """In this (fresh) process: the resident peak after building, after one warm-up step and after ``steps`` more.

    Each side imports only what it needs (lowrank builds its own random
    model, without torch), so the growth is the step's own memory: weights,
    activations, gradients, optimizer state.
    """
    ids = np.random.default_rng(0).integers(0, vocab, (BATCH, T))
    if side == "lowrank":
        model = nn.GPT2(vocab_size=vocab, **SIZES, embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout,
                        dtype=np.float32, random_state=0)
        if case == "lora":
            nn.inject_lora(model, r=R, alpha=ALPHA, target_modules=["c_attn"], random_state=0)
        run = lowrank_stepper(model.train(), ids, 1)
    else:
        import torch
        import transformers

        run = torch_stepper(torch, torch_model(torch, transformers, vocab, dropout, case == "lora"), ids, 1)
    gc.collect()
    built = peak_rss_mib()
    run()
    warm = peak_rss_mib()
    for _ in range(steps):
        run()
    return {"built": built, "warm": warm, "peak": peak_rss_mib()}


def bench_memory(case: str, args: argparse.Namespace) -> None:
    rows = {}
    for side in ("lowrank", "torch"):
        cmd = [sys.executable, __file__, "--memory-child", side, "--case", case, "--vocab", str(args.vocab),
               "--dropout", str(args.dropout), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"  {case} {side}: failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
            return
        rows[side] = json.loads(out.stdout.strip().splitlines()[-1])
    for side, r in rows.items():
        print(f"  {case:<5} {side:<8} after imports and build {r['built']:7.1f} MiB, peak {r['peak']:7.1f} MiB "
              f"(+{r['peak'] - r['built']:6.1f} MiB for the training steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--case", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", choices=["lowrank", "torch"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args.case, args.vocab, args.dropout, args.steps)))
        return
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("skipped: pip install torch transformers")
        return
    print(f"GPT-2 {SIZES}, vocab {args.vocab}, batch {BATCH} x T {T}, float32, AdamW, dropout {args.dropout}; "
          f"{load()}")
    for threads in (1, 2):
        print(f"\n[{threads} thread{'s' if threads > 1 else ''}] one step, median per step")
        for case in ("full", "lora"):
            bench_steps(case, args, threads)
    if not args.no_memory:
        print("\n[memory] fresh process per side, default threads")
        for case in ("full", "lora"):
            bench_memory(case, args)
    print(f"\n{load()}")


if __name__ == "__main__":
    main()
