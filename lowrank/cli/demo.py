"""``lowrank demo``: the whole story, printed, as JSON, or drawn."""

from __future__ import annotations

import argparse
import json


def _cmd_demo(args: argparse.Namespace) -> int:
    from lowrank.demo import check_plot_path, format_report, plot, run_demo

    if args.plot is not None:  # --plot "" is refused, not ignored
        check_plot_path(args.plot)
    results = run_demo(seed=args.seed, quick=args.quick)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_report(results))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the ``lowrank`` command line."""
    demo = sub.add_parser("demo", help="the whole story: low-rank approximation, then LoRA")
    demo.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    demo.add_argument("--quick", action="store_true", help="smaller sizes, a few seconds")
    demo.add_argument("--json", action="store_true", help="print the results as JSON on stdout, nothing else")
    demo.add_argument("--plot", metavar="FILE.png", help="draw ΔW's spectrum and the loss curves (needs matplotlib)")
    demo.set_defaults(run=_cmd_demo)

