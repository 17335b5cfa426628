"""``lowrank precision``: round values to a low-precision format, and a LoRA layer's error against its bounds.

``lowrank precision round 0.1 1e5 --to bfloat16`` prints each value rounded
(and its bits); ``lowrank precision bound --shape 64,1024,1024,8 --fmt
bfloat16`` builds a layer with typical magnitudes, runs the emulated forward
unmerged, merged, and after merge-then-unmerge, and prints each one's
largest error against the float64 result beside the derived bound. ``bound``
is a checking command: exit 1 if an error exceeds its bound.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import numpy as np

from lowrank.cli.common import CLIError

FORMATS = ("bfloat16", "float16", "float32")


def _parse_layer_shape(text: str) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be N,in,out,r with positive integers, got {text!r}")
    return dims[0], dims[1], dims[2], dims[3]


def _cmd_round(args: argparse.Namespace) -> int:
    from lowrank import precision

    values = np.array(args.values, np.float64)
    rounded = precision.round_to(values, args.to)
    rows = []
    for v, r in zip(values.tolist(), rounded.tolist(), strict=True):
        row: dict[str, Any] = {"value": v, "rounded": r}
        if args.to != "float32":
            row["bits"] = f"0x{int(precision.to_bits(np.array([v]), args.to)[0]):04x}"
        row["relative_error"] = abs(r - v) / abs(v) if v != 0 and math.isfinite(r) else (0.0 if r == v else None)
        rows.append(row)
    if args.json:
        print(json.dumps({"fmt": args.to, "unit_roundoff": precision.unit_roundoff(args.to), "values": rows}))
        return 0
    for row in rows:
        bits = f"  bits {row['bits']}" if "bits" in row else ""
        rel = "" if row["relative_error"] is None else f"  relative error {row['relative_error']:.3g}"
        print(f"{row['value']!r} -> {row['rounded']!r}{bits}{rel}")
    print(f"unit roundoff of {args.to}: {precision.unit_roundoff(args.to):.3g}")
    return 0


def typical_layer(n: int, d_in: int, d_out: int, r: int, seed: int) -> dict[str, np.ndarray]:
    """A layer of typical magnitudes.

    ``x ~ N(0, 1)``; ``W, A ~ U(±1/sqrt(in))`` (kaiming-uniform); ``B ~ N(0, 1/r)``
    (a trained ``B``); ``bias ~ N(0, 0.01)``.
    """
    rng = np.random.default_rng(seed)
    bound = 1 / math.sqrt(d_in)
    return {
        "x": rng.standard_normal((n, d_in)),
        "W": rng.uniform(-bound, bound, (d_out, d_in)),
        "bias": 0.1 * rng.standard_normal(d_out),
        "A": rng.uniform(-bound, bound, (r, d_in)),
        "B": rng.standard_normal((d_out, r)) / math.sqrt(r),
    }


def _cmd_bound(args: argparse.Namespace) -> int:
    from lowrank import precision

    n, d_in, d_out, r = args.shape
    if n * max(d_in, d_out) > 1 << 26:
        raise CLIError(f"--shape {n},{d_in},{d_out},{r} is too large for a float64 reference: N*max(in, out) > 2**26")
    if r > min(d_in, d_out):
        raise CLIError(f"--shape: r must be at most min(in, out) = {min(d_in, d_out)}, got {r}")
    scaling = (args.alpha if args.alpha is not None else 2.0 * r) / r
    L = typical_layer(n, d_in, d_out, r, args.seed)
    x, W, bias, A, B, fmt = L["x"], L["W"], L["bias"], L["A"], L["B"], args.fmt
    base = x @ W.T + bias  # (N, out)
    exact = base + scaling * ((x @ A.T) @ B.T)  # (N, out)
    merged = precision.lora_merge(W, A, B, scaling, fmt)  # (out, in)
    outputs = {
        "unmerged": precision.lora_linear(x, W, bias, A, B, scaling, fmt)[0],
        "merged": precision.linear(x, merged, bias, fmt),
        "remerged": precision.linear(x, precision.lora_unmerge(merged, A, B, scaling, fmt), bias, fmt),
    }
    rows, ok = [], True
    for form, y in outputs.items():
        err = np.abs(y - (base if form == "remerged" else exact))
        bound = precision.lora_linear_bound(x, W, bias, A, B, scaling, fmt, form)
        ok &= bool((err <= bound).all())
        rows.append({
            "form": form, "max_error": float(err.max()), "max_bound": float(bound.max()),
            "max_error_over_bound": float((err / bound).max()),
        })  # fmt: skip
    drift = float(np.abs(outputs["merged"] - outputs["unmerged"]).max())
    report = {
        "fmt": fmt, "shape": [n, d_in, d_out, r], "scaling": scaling, "seed": args.seed,
        "within_bounds": ok, "merged_vs_unmerged_drift": drift, "forms": rows,
    }  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{fmt} LoRA layer N={n} in={d_in} out={d_out} r={r} scaling={scaling:g} (seed {args.seed}); "
              "error against float64, largest over the outputs")
        print(f"{'form':<10} {'max error':>11} {'max bound':>11} {'error/bound':>12}")
        for row in rows:
            print(f"{row['form']:<10} {row['max_error']:>11.3g} {row['max_bound']:>11.3g} "
                  f"{row['max_error_over_bound']:>12.3g}")
        print(f"merged vs unmerged drift: {drift:.3g}")
        print("every error within its bound" if ok else "FAILED: an error exceeds its bound")
    return 0 if ok else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``precision round`` and ``precision bound`` to the ``lowrank`` command line."""
    from lowrank.cli.common import Parser

    prec = sub.add_parser("precision", help="low-precision rounding and LoRA error bounds")
    what = prec.add_subparsers(dest="precision_command", required=True, parser_class=Parser, metavar="COMMAND")
    rnd = what.add_parser("round", help="round values to bfloat16, float16 or float32 (nearest, ties to even)")
    rnd.add_argument("values", nargs="+", type=float, help="real numbers (inf and nan too)")
    rnd.add_argument("--to", choices=FORMATS, default="bfloat16", help="default: bfloat16")
    rnd.add_argument("--json", action="store_true", help="print one JSON object")
    rnd.set_defaults(run=_cmd_round)

    bnd = what.add_parser("bound", help="a typical LoRA layer's rounding error beside its derived bound")
    bnd.add_argument("--shape", type=_parse_layer_shape, required=True, help="N,in,out,r, e.g. 64,1024,1024,8")
    bnd.add_argument("--fmt", choices=FORMATS, default="bfloat16", help="default: bfloat16")
    bnd.add_argument("--alpha", type=float, help="LoRA alpha; scaling = alpha / r (default alpha = 2r)")
    bnd.add_argument("--seed", type=int, default=0, help="seed of the layer's random values (default 0)")
    bnd.add_argument("--json", action="store_true", help="print one JSON object")
    bnd.set_defaults(run=_cmd_bound)
