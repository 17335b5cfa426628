"""Which LoRA factor starts at zero? Train both starts and print what happens.

A LoRA layer learns a planted rank-2 change of a frozen 16×16 linear map
(mean squared error, full batch). Three starts, each with ΔW = 0 at step 0:

- ``A random, B = 0``: the default (LoRA paper §4.1, PEFT);
- ``A = 0, B random``: the mirror image;
- ``A = 0, B = 0``: the dead start.

Run it from the repository root: ``python docs/examples/lora_init.py``.
"""

from __future__ import annotations

import numpy as np

from lowrank import nn
from lowrank.nn import functional as F
from lowrank.nn.optim import SGD, Adam

IN = OUT = 16
R = 4
STEPS = 200


def task(seed: int = 0) -> tuple[np.ndarray, np.ndarray, nn.Linear]:
    """Inputs, targets ``x @ (W + ΔW*).T`` with a planted rank-2 ``ΔW*``, and the frozen base layer."""
    rng = np.random.default_rng(seed)
    base = nn.Linear(IN, OUT, bias=False, dtype=np.float64, random_state=seed)
    delta = rng.standard_normal((OUT, 2)) @ rng.standard_normal((2, IN)) / np.sqrt(IN)  # (out, in), rank 2
    x = rng.standard_normal((256, IN))
    return x, x @ (base.weight.data + delta).T, base


def adapter(start: str, seed: int = 0) -> nn.LoRALinear:
    """A LoRALinear (r = 4, alpha = 4) whose factors start as ``start`` says; ΔW = 0 in every case."""
    _, _, base = task(seed)
    layer = nn.LoRALinear(base, r=R, alpha=R, random_state=seed)  # A ~ U(±1/√in), B = 0
    rng = np.random.default_rng(seed + 1)
    if start == "A = 0, B random":
        layer.B.data[...] = rng.uniform(-1 / np.sqrt(R), 1 / np.sqrt(R), size=layer.B.data.shape)
        layer.A.data[...] = 0.0
    elif start == "A = 0, B = 0":
        layer.A.data[...] = 0.0
    return layer


def train(start: str, optimizer: str, lr: float) -> tuple[list[float], float, float]:
    """Full-batch training; returns the losses, and ‖dA‖, ‖dB‖ at the first step."""
    x, y, _ = task()
    layer = adapter(start)
    opt = (Adam if optimizer == "adam" else SGD)(layer.named_parameters(), lr=lr)
    losses, first = [], (0.0, 0.0)
    for step in range(STEPS):
        out = layer(x)
        loss, dout = F.mse_loss(out, y)
        losses.append(loss)
        opt.zero_grad()
        layer.backward(dout)
        if step == 0:
            first = (float(np.linalg.norm(layer.A.grad)), float(np.linalg.norm(layer.B.grad)))
        opt.step()
    return losses, *first


STARTS = ("A random, B = 0", "A = 0, B random", "A = 0, B = 0")
RUNS = (("adam", 1e-2), ("sgd", 0.5))


def main() -> None:
    """Print one row per start and optimizer: first gradients and the loss after 0, 20 and 200 steps."""
    print(f"{'start':<17} {'optimizer':<12} {'|dA| step 1':>11} {'|dB| step 1':>11} "
          f"{'loss 0':>9} {'loss 20':>9} {'loss 200':>9}")
    for optimizer, lr in RUNS:
        for start in STARTS:
            losses, da, db = train(start, optimizer, lr)
            print(f"{start:<17} {optimizer + ' ' + str(lr):<12} {da:>11.4f} {db:>11.4f} "
                  f"{losses[0]:>9.4f} {losses[20]:>9.4f} {losses[-1]:>9.3g}")


if __name__ == "__main__":
    main()
