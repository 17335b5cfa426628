"""``lowrank gradcheck`` and ``lowrank vectors``: the checking commands (exit 0 passed, 1 failed, 2 could not run)."""

from __future__ import annotations

import argparse
import json
import sys

from lowrank.cli.common import Parser


def _cmd_gradcheck(args: argparse.Namespace) -> int:
    from lowrank.reference.gradcheck import format_table, run_all

    # a checking command: 0 all passed, 1 something failed, 2 it could not run
    try:
        rows = run_all(random_state=args.seed)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"lowrank: error: gradcheck could not run: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0 if all(row.passed for row in rows) else 1


def _cmd_vectors_write(args: argparse.Namespace) -> int:
    from lowrank.reference.vectors import write_vectors

    cases = write_vectors(args.directory, random_state=args.seed, dtypes=args.dtypes)
    print(f"wrote {len(cases)} reference cases and manifest.json to {args.directory}")
    return 0


def _cmd_vectors_check(args: argparse.Namespace) -> int:
    from lowrank.reference.vectors import check_vectors

    # a checking command: 0 all selected cases passed, 1 something failed, 2 it could not run
    try:
        report = check_vectors(args.reference, args.candidate, kinds=args.kinds, cases=args.cases)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"lowrank: error: vectors check could not run: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0 if report.passed else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``gradcheck`` and ``vectors write|check`` to the ``lowrank`` command line."""
    grad = sub.add_parser("gradcheck", help="check every backward pass against finite differences")
    grad.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    grad.set_defaults(run=_cmd_gradcheck)

    vec = sub.add_parser("vectors", help="reference test vectors for other implementations")
    vec_sub = vec.add_subparsers(dest="action", required=True, parser_class=Parser, metavar="ACTION")
    write = vec_sub.add_parser("write", help="write the reference cases and their manifest to DIR")
    write.add_argument("directory", metavar="DIR")
    write.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    write.add_argument(
        "--dtypes", metavar="FMT,...",
        help="also write the linear, LoRA and merge cases in these 16-bit formats (bfloat16,float16), each "
        "output with its own per-element tolerance, the derived rounding bound",
    )  # fmt: skip
    write.set_defaults(run=_cmd_vectors_write)
    check = vec_sub.add_parser(
        "check", help="compare a candidate's outputs with the reference",
        description="Compare a candidate's outputs with the reference, per case and output tensor. Exit codes: "
        "0 every selected case passed, 1 a mismatch or a missing selected output, 2 the reference or "
        "candidate folder cannot be read or the selection is invalid (one line on stderr).",
    )  # fmt: skip
    check.add_argument("reference", metavar="REF", help="a folder written by 'lowrank vectors write'")
    check.add_argument("candidate", metavar="CANDIDATE", help="the candidate's outputs, same layout and names")
    check.add_argument(
        "--kinds", metavar="K,...",
        help="check only the cases of these kinds, comma-separated (e.g. linear,lora_linear), for a candidate "
        "that implements only some; a kind the reference does not hold is an error that lists those it holds",
    )  # fmt: skip
    check.add_argument(
        "--cases", metavar="PATTERN",
        help="check only the cases whose name matches this shell-style glob (fnmatch: *, ?, [seq]; "
        "case-sensitive; quote it), e.g. 'lora_linear_*_f32'; combined with --kinds, a case must match both",
    )  # fmt: skip
    check.add_argument("--json", action="store_true",
                       help="print the report as one JSON object on stdout, and nothing else")  # fmt: skip
    check.set_defaults(run=_cmd_vectors_check)
