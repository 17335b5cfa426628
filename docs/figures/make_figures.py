"""Draw the course's figures as SVG files into docs/figures/ (needs the ``plot`` extra: matplotlib).

Run from the repository root: ``python docs/figures/make_figures.py [OUT_DIR]``.
It runs ``lowrank demo --quick`` (seed 0) for the demo's figures, so the
pictures show the numbers a learner gets from that command.

- ``lora_paths.svg``: the two paths of a LoRA layer (docs/lora.md);
- ``spectrum.svg``: a singular spectrum and the rank cut (docs/lowrank_approximation.md);
- ``demo_spectrum.svg``, ``demo_loss.svg``, ``demo_phi.svg``: the demo's ΔW
  spectrum, validation-loss curves and φ heat map (docs/why_lora.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

FIGURES = ("lora_paths.svg", "spectrum.svg", "demo_spectrum.svg", "demo_loss.svg", "demo_phi.svg")


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the figures need matplotlib: pip install 'lowrank[plot]'") from None
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "lowrank"  # stable ids: a rerun changes only what changed
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")


def lora_paths(path: Path) -> None:
    """The two paths: ``x`` through the frozen W, and through dropout, A (down to r), B (up), scaled."""
    plt = _plt()
    from matplotlib.patches import FancyArrowPatch, Rectangle

    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ax.set(xlim=(0, 10), ylim=(0, 5))
    ax.axis("off")

    def box(x: float, y: float, w: float, h: float, text: str, color: str) -> None:
        ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="black"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=10)

    def arrow(a: tuple[float, float], b: tuple[float, float]) -> None:
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12))

    box(0.2, 2.0, 1.2, 1.0, "x\n(N, in)", "white")
    box(3.3, 3.4, 2.6, 1.1, "W (out, in)\nfrozen", "#dddddd")
    box(2.0, 0.4, 1.5, 1.1, "× mask\ndropout", "white")
    box(4.0, 0.2, 1.1, 1.5, "A\n(r, in)", "#cfe8ff")
    box(5.6, 0.4, 1.4, 1.1, "B (out, r)\n× scaling", "#cfe8ff")
    ax.text(7.75, 2.5, "+", ha="center", va="center", fontsize=20)
    box(8.6, 2.0, 1.3, 1.0, "y\n(N, out)", "white")
    arrow((1.4, 2.7), (3.3, 3.9))
    arrow((1.4, 2.3), (2.0, 1.0))
    arrow((3.5, 1.0), (4.0, 1.0))
    arrow((5.1, 1.0), (5.6, 1.0))
    ax.text(5.35, 1.95, "xa (N, r)", ha="center", fontsize=8)
    arrow((5.9, 3.9), (7.6, 2.75))
    arrow((7.0, 1.0), (7.6, 2.25))
    arrow((7.9, 2.5), (8.6, 2.5))
    ax.text(5.0, 4.75, "base path: x @ W.T + b", ha="center", fontsize=9)
    ax.text(5.0, -0.15, "LoRA path: scaling * (xm @ A.T) @ B.T — trainable, r ≪ in, out", ha="center", fontsize=9)
    _save(fig, path)
    plt.close(fig)


def spectrum(path: Path) -> None:
    """The 9×9 demo matrix's singular values, the rank cut at r = 1, and the tail Eckart–Young sums."""
    plt = _plt()
    rng = np.random.default_rng(0)
    k = np.arange(1.0, 10.0)
    M = np.outer(k, k) + 0.5 * rng.standard_normal((9, 9))  # the demo's part 1 matrix, seed 0
    s = np.linalg.svd(M, compute_uv=False)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    idx = np.arange(s.size)
    ax.semilogy(idx[:1], s[:1], "o", color="tab:blue", label="kept: s[0]")
    ax.semilogy(idx[1:], s[1:], "o", color="tab:red", label="dropped: s[1:], error² = Σ s[r:]²")
    ax.axvline(0.5, color="grey", ls="--", label="rank cut r = 1")
    ax.set(title="Singular values of the 9×9 table plus noise", xlabel="index k (from 0)",
           ylabel="s[k]")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def demo_figures(out: Path, results: dict[str, Any]) -> None:
    """ΔW's spectrum, the loss curves and the φ heat map from ``run_demo``'s results."""
    plt = _plt()
    a = results["adaptation"]
    d = a["delta_w"]
    s = np.asarray(d["singular_values"])
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.semilogy(np.arange(1, s.size + 1), s, "o-", ms=3)
    ax.axvline(a["planted_rank"] + 0.5, color="grey", ls="--", label=f"planted rank {a['planted_rank']}")
    ax.set(title=f"Singular values of ΔW (layer {d['layer']}, full fine-tuning on task B)",
           xlabel="index", ylabel="singular value")
    ax.legend()
    _save(fig, out / "demo_spectrum.svg")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for row in a["methods"]:
        curve = row["val_loss_curve"]
        ax.plot(np.arange(1, len(curve) + 1), curve, label=row["method"])
    ax.set(title="Validation loss while adapting to task B", xlabel="epoch", ylabel="cross-entropy")
    ax.legend(fontsize=8)
    _save(fig, out / "demo_loss.svg")
    plt.close(fig)

    tops = sorted({int(key.split(",")[0]) for key in d["similarity_lora8_vs_full"]})
    phi = np.array([[d["similarity_lora8_vs_full"][f"{i},{j}"] for j in tops] for i in tops])
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    im = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis")
    ax.set(xticks=range(len(tops)), xticklabels=tops, yticks=range(len(tops)), yticklabels=tops,
           xlabel="j: top directions of full fine-tuning's ΔW", ylabel="i: top directions of LoRA r=8",
           title="φ(i, j)")
    for (r, col), value in np.ndenumerate(phi):
        ax.text(col, r, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    fig.colorbar(im, ax=ax)
    _save(fig, out / "demo_phi.svg")
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Write every figure into ``argv[0]`` (default: this file's folder)."""
    from lowrank.demo import run_demo

    out = Path(argv[0]) if argv else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    lora_paths(out / "lora_paths.svg")
    spectrum(out / "spectrum.svg")
    demo_figures(out, run_demo(seed=0, quick=True))
    for name in FIGURES:
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
