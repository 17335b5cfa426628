"""``lowrank precision``: round values to a low-precision format, and a LoRA layer's error against its bounds.

``lowrank precision round 0.1 1e5 --to bfloat16`` prints each value rounded
(and its bits); ``lowrank precision bound --shape 64,1024,1024,8 --fmt
bfloat16`` builds a layer with typical magnitudes, runs the emulated forward
unmerged, merged, and after merge-then-unmerge, and prints each one's
largest error against the float64 result beside the derived bound;
``lowrank precision bound --adapter DIR --base model.safetensors`` does the
same for every adapted weight of a real model (its W, A, B and scaling, on a
typical input). ``bound`` is a checking command: exit 1 if an error exceeds
its bound.
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


def _layer_report(
    x: np.ndarray, W: np.ndarray, bias: np.ndarray | None, A: np.ndarray, B: np.ndarray, scaling: float, fmt: str
) -> dict[str, Any]:
    """The emulated forward's error in each form beside its bound, and the merged-vs-unmerged drift."""
    from lowrank import precision

    base = x @ W.T  # (N, out)
    if bias is not None:
        base += bias
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
    return {"within_bounds": ok, "merged_vs_unmerged_drift": drift, "forms": rows}


def _print_forms(report: dict[str, Any]) -> None:
    print(f"{'form':<10} {'max error':>11} {'max bound':>11} {'error/bound':>12}")
    for row in report["forms"]:
        print(f"{row['form']:<10} {row['max_error']:>11.3g} {row['max_bound']:>11.3g} "
              f"{row['max_error_over_bound']:>12.3g}")  # fmt: skip
    print(f"merged vs unmerged drift: {report['merged_vs_unmerged_drift']:.3g}")


def _cmd_bound(args: argparse.Namespace) -> int:
    if (args.adapter is None) != (args.base is None):
        raise CLIError("give --adapter and --base together (a PEFT adapter folder and its base .safetensors file)")
    if (args.shape is None) == (args.adapter is None):
        raise CLIError("give either --shape N,in,out,r (a typical layer) or --adapter DIR --base FILE, not both")
    if args.adapter is not None:
        return _bound_adapter(args)
    n, d_in, d_out, r = args.shape
    if n * max(d_in, d_out) > 1 << 26:
        raise CLIError(f"--shape {n},{d_in},{d_out},{r} is too large for a float64 reference: N*max(in, out) > 2**26")
    if r > min(d_in, d_out):
        raise CLIError(f"--shape: r must be at most min(in, out) = {min(d_in, d_out)}, got {r}")
    scaling = (args.alpha if args.alpha is not None else 2.0 * r) / r
    L = typical_layer(n, d_in, d_out, r, args.seed)
    report = _layer_report(L["x"], L["W"], L["bias"], L["A"], L["B"], scaling, args.fmt)
    report = {"fmt": args.fmt, "shape": [n, d_in, d_out, r], "scaling": scaling, "seed": args.seed, **report}
    ok = report["within_bounds"]
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.fmt} LoRA layer N={n} in={d_in} out={d_out} r={r} scaling={scaling:g} (seed {args.seed}); "
              "error against float64, largest over the outputs")  # fmt: skip
        _print_forms(report)
        print("every error within its bound" if ok else "FAILED: an error exceeds its bound")
    return 0 if ok else 1


def _bound_adapter(args: argparse.Namespace) -> int:
    """``bound --adapter DIR --base FILE``: every adapted weight of a real model, on a typical input."""
    from lowrank.io.adapter import adapted_weights

    if args.alpha is not None:
        raise CLIError("--alpha is for --shape: an adapter's scaling comes from its adapter_config.json")
    n = args.rows
    rng = np.random.default_rng(args.seed)
    modules, ok = [], True
    for layer in adapted_weights(args.base, args.adapter):
        x = rng.standard_normal((n, layer.weight.shape[1]))  # (N, in): a typical input, N(0, 1)
        report = _layer_report(x, layer.weight, None, layer.A, layer.B, layer.scaling, args.fmt)
        shape = [n, layer.weight.shape[1], layer.weight.shape[0], layer.A.shape[0]]  # N, in, out, r
        modules.append({"module": layer.name, "stored": layer.stored, "scaling": layer.scaling, "shape": shape,
                        **report})  # fmt: skip
        ok &= report["within_bounds"]
    if not modules:
        raise CLIError(f"{args.adapter}: no Linear or Conv1D module is adapted (Embedding adapters have no bound here)")
    if args.json:
        print(json.dumps({"fmt": args.fmt, "rows": n, "seed": args.seed, "within_bounds": ok, "modules": modules}))
        return 0 if ok else 1
    print(f"{args.fmt}: each adapted weight of {args.base} with {args.adapter}, on x ~ N(0, 1) of {n} rows "
          f"(seed {args.seed}, bias left out); error against float64, largest over the outputs")  # fmt: skip
    for m in modules:
        sizes = "x".join(str(d) for d in m["shape"][1:3])
        print(f"\n{m['module']}  ({sizes}, r={m['shape'][3]}, scaling={m['scaling']:g}, stored {m['stored']})")
        _print_forms(m)
    print("\nevery error within its bound" if ok else "\nFAILED: an error exceeds its bound")
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

    bnd = what.add_parser(
        "bound", help="a LoRA layer's rounding error beside its derived bound (a typical layer, or a real adapter's)"
    )
    bnd.add_argument("--shape", type=_parse_layer_shape, help="a typical layer: N,in,out,r, e.g. 64,1024,1024,8")
    bnd.add_argument("--adapter", help="instead of --shape: a PEFT adapter folder (with --base)")
    bnd.add_argument("--base", help="the base model's .safetensors file the adapter is for")
    bnd.add_argument("--rows", type=int, default=16, help="with --adapter: rows of the typical input (default 16)")
    bnd.add_argument("--fmt", choices=FORMATS, default="bfloat16", help="default: bfloat16")
    bnd.add_argument("--alpha", type=float, help="LoRA alpha; scaling = alpha / r (default alpha = 2r)")
    bnd.add_argument("--seed", type=int, default=0, help="seed of the layer's random values (default 0)")
    bnd.add_argument("--json", action="store_true", help="print one JSON object")
    bnd.set_defaults(run=_cmd_bound)
