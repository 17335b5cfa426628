"""``lowrank adapter inspect|merge``: PEFT LoRA adapter folders, without a model.

``inspect`` is a checking command (exit 0 consistent, 1 problems found, 2 the
folder could not be read); ``merge`` exits 0 or, when it cannot merge, 2 with
one line on stderr and nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys

from lowrank.cli.common import Parser


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lowrank.io.adapter import inspect_adapter

    # a checking command: 0 consistent, 1 problems found, 2 it could not run
    try:
        report = inspect_adapter(args.directory)
    except (ValueError, TypeError, OSError) as exc:
        print(f"lowrank: error: adapter inspect could not read the folder: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format())
    return 0 if report.passed else 1


def _cmd_merge(args: argparse.Namespace) -> int:
    from lowrank.io.adapter import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype)
    print(f"merged {args.adapter} into {args.base}: wrote {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``adapter inspect`` and ``adapter merge`` to the ``lowrank`` command line."""
    adapter = sub.add_parser("adapter", help="PEFT LoRA adapter folders: inspect, merge into base weights")
    actions = adapter.add_subparsers(dest="action", required=True, parser_class=Parser, metavar="ACTION")
    inspect = actions.add_parser("inspect", help="describe each adapted module and check the folder's consistency")
    inspect.add_argument("directory", metavar="DIR", help="the adapter folder (adapter_config.json + safetensors)")
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    inspect.set_defaults(run=_cmd_inspect)
    merge = actions.add_parser("merge", help="write BASE with the adapter merged in (float64, rounded once)")
    merge.add_argument("base", metavar="BASE", help="the base weights, a .safetensors file of state_dict keys")
    merge.add_argument("adapter", metavar="ADAPTER_DIR", help="the PEFT adapter folder")
    merge.add_argument("out", metavar="OUT", help="the merged .safetensors file (written atomically)")
    merge.add_argument(
        "--dtype",
        choices=("keep", "float32", "float16", "bfloat16"),
        default="keep",
        help="the floating tensors' dtype in OUT (default: keep each base tensor's)",
    )
    merge.set_defaults(run=_cmd_merge)
