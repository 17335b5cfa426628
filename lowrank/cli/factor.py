"""``lowrank factorize`` and ``lowrank params``: a matrix from a ``.npy`` file, and parameter arithmetic."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from lowrank.cli.common import CLIError


def _load_matrix(path: str) -> np.ndarray:
    from lowrank.io.files import load_npy

    file = Path(path)
    if file.is_dir():
        raise CLIError(f"cannot read {path}: it is a folder, not a .npy file")
    if not file.is_file():
        raise CLIError(f"cannot read {path}: no such file")
    try:
        with open(file, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise CLIError(f"cannot read {path}: not a .npy file (write one with numpy.save)")
        return load_npy(file)  # checks the claimed shape against the file's size before allocating
    except ValueError as exc:  # names the file and the rule it breaks
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"cannot read {path} as a .npy array: {exc}") from None


def _relative_errors(M: np.ndarray, lr: Any, s_all: np.ndarray, rank: int) -> tuple[float, float]:
    """``‖M − L R‖_F / ‖M‖_F`` and the Eckart–Young optimum on the same scale (both 0 for M = 0).

    Both are ratios, right at any scale of M: ``LowRank.error`` scales before
    squaring, and the optimum is taken from ``s / 2**e`` (exact), whose
    absolute errors cannot overflow.
    """
    import lowrank
    from lowrank.factor.lowrank_matrix import magnitude_exponent, times_power_of_two

    if not np.any(M):
        return 0.0, 0.0
    errors = lowrank.eckart_young_errors(times_power_of_two(s_all, -magnitude_exponent(s_all)))  # (p + 1,)
    return lr.error(M, relative=True), float(errors[rank] / errors[0])


def _cmd_factorize(args: argparse.Namespace) -> int:
    import lowrank

    if args.out is not None:  # before the work, so a typo costs nothing
        from lowrank.io.files import check_writable

        check_writable(args.out, "--out")
    M = _load_matrix(args.file)
    M = lowrank.utils.validation.check_matrix(M, f"the matrix in {args.file}")
    m, n = M.shape
    s_all = np.linalg.svd(M, compute_uv=False)  # the whole spectrum, for the bound
    if args.rank is None:  # right at any scale: rank_for_energy squares s / 2**e
        rank = lowrank.rank_for_energy(s_all, args.energy)
    else:
        rank = args.rank
    rank = lowrank.utils.validation.check_rank(rank, M.shape, "--rank")

    if args.method == "svd":
        result = lowrank.truncated_svd(M, rank)
        factors = {"left": result.U * result.s, "right": result.Vt, "s": result.s}
    elif args.method == "randomized":
        result = lowrank.randomized_svd(M, rank, random_state=args.seed)
        factors = {"left": result.U * result.s, "right": result.Vt, "s": result.s}
    else:
        fit = lowrank.als(M, rank, random_state=args.seed)
        factors = {"left": fit.left, "right": fit.right}
    lr = lowrank.LowRank(factors["left"], factors["right"])

    error, bound = _relative_errors(M, lr, s_all, rank)
    ratio = f"{error / bound:.6f}" if bound > 0 else ("1 (both 0)" if error == 0 else "inf")
    report = [
        f"input     {args.file}: {m}×{n} {M.dtype}",
        f"method    {args.method}, rank {rank}" + (f" (keeps {args.energy:g} of the energy)" if args.energy else ""),
        f"factors   left {lr.left.shape}, right {lr.right.shape}",
        f"params    dense {lr.dense_params:,} vs low-rank {lr.n_params:,} ({lr.compression_ratio:.2f}× smaller)",
        f"error     ‖M − L R‖_F / ‖M‖_F = {error:.6e}",
        f"bound     Eckart–Young optimum at rank {rank}: {bound:.6e} (error / optimum = {ratio})",
    ]
    if args.out is not None:  # written before anything is printed, so a failed write prints only its error
        from lowrank.io.files import save_npz

        path = save_npz(args.out, factors)
        report.append(f"wrote     {path} ({', '.join(f'{k} {v.shape}' for k, v in factors.items())})")
    print("\n".join(report))
    return 0


def _parse_shape(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        m, n = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must look like 9x9, got {text!r}") from None
    if m < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"--shape sides must be positive, got {text!r}")
    return m, n


def _cmd_params(args: argparse.Namespace) -> int:
    import lowrank

    if args.shape is not None:
        budget = [flag for flag, value in (("--d-model", args.d_model), ("--layers", args.layers),
                                           ("--total", args.total)) if value is not None]
        if budget:
            raise CLIError(f"params takes --shape or a LoRA budget (--d-model, --layers), not both: got --shape "
                           f"with {', '.join(budget)}")
        m, n = args.shape
        rank = lowrank.utils.validation.check_rank(args.rank, (m, n), "--rank")
        dense, low = m * n, rank * (m + n)
        print(f"matrix      {m}×{n}, rank {rank}")
        print(f"dense       {m} × {n} = {dense:,} parameters")
        print(f"low-rank    {rank} × ({m} + {n}) = {low:,} parameters ({dense / low:.2f}× smaller)")
        return 0
    if args.d_model is None or args.layers is None:
        raise CLIError("params needs --shape MxN, or --d-model and --layers (with --matrices, --rank)")
    count = lowrank.lora_param_count(args.d_model, args.layers, args.matrices, args.rank)
    if args.total is not None and not (math.isfinite(args.total) and args.total >= count):
        raise CLIError(f"--total must be a model size of at least the {count:,} trainable parameters, "
                       f"got {args.total:g}")
    print(f"LoRA        {args.layers} layers × {args.matrices} matrices × r={args.rank} × "
          f"({args.d_model} + {args.d_model})")
    print(f"trainable   {count:,} parameters")
    if args.total is not None:
        print(f"total       {args.total:,.0f} parameters")
        print(f"trainable%  {100 * count / args.total:.4f} %")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``factorize`` and ``params`` to the ``lowrank`` command line."""
    fac = sub.add_parser("factorize", help="factorize a matrix stored with numpy.save")
    fac.add_argument("file", help="a .npy file holding a 2-D numeric array")
    how = fac.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="the rank to keep")
    how.add_argument("--energy", type=float, help="keep the smallest rank holding this fraction of ‖M‖_F² (0, 1]")
    fac.add_argument("--method", choices=("svd", "randomized", "als"), default="svd", help="default: svd")
    fac.add_argument("--out", help="write left, right (and s) to this .npz file")
    fac.add_argument("--seed", type=int, default=0, help="seed for randomized and als (default 0)")
    fac.set_defaults(run=_cmd_factorize)

    par = sub.add_parser("params", help="parameter arithmetic of a factorization or a LoRA budget")
    par.add_argument("--shape", type=_parse_shape, help="a matrix shape, e.g. 9x9")
    par.add_argument("--rank", type=int, default=1, help="rank r (default 1)")
    par.add_argument("--d-model", type=int, help="model width: each adapted matrix is d_model × d_model")
    par.add_argument("--layers", type=int, help="number of layers")
    par.add_argument("--matrices", type=int, default=2, help="adapted matrices per layer (default 2: W_q, W_v)")
    par.add_argument("--total", type=float, help="the model's total parameter count, for the percentage")
    par.set_defaults(run=_cmd_params)

