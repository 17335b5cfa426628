"""The ``lowrank`` command: ``demo``, ``factorize``, ``params``, ``gradcheck``, ``vectors``.

Every failure the user can cause (a missing file, a bad rank, a flag out of
range, a malformed command line, a hostile file) ends in one line on stderr,
``lowrank: error: …``, and exit code 2: the command could not run. So does
any other exception, named as a bug to report. Never a traceback, unless
``LOWRANK_DEBUG=1`` is set.
Exit code 1 means only that a checking command (``gradcheck``, ``vectors
check``) ran and found a failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lowrank.cli import adapter, demo, factor, precision, reference, verify
from lowrank.cli.common import CLIError, Parser, error_line

__all__ = ["CLIError", "build_parser", "main"]

# Each module adds its commands; a new command group is a new module here.
COMMAND_GROUPS = (demo, factor, reference, adapter, precision, verify)


def build_parser() -> Parser:
    """The ``lowrank`` command line: one subcommand each for demo, factorize, params, gradcheck, vectors.

    Returns
    -------
    Parser
        A usage error prints one line and exits with code 2. The namespace
        it parses holds ``run``, the chosen subcommand's function, which
        takes that namespace and returns the exit code (see :func:`main`).
    """
    parser = Parser(prog="lowrank", description="Low-rank factorization and LoRA, by hand in NumPy.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


def _version() -> str:
    from lowrank import __version__

    return f"lowrank {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lowrank`` command line; returns the exit code.

    Any exception a command raises becomes one line on stderr and exit code
    2 (see :func:`lowrank.cli.common.error_line`); Ctrl-C exits with 130, and a
    closed output pipe (``| head``) with 141, silently.
    With the environment variable ``LOWRANK_DEBUG=1`` the exception
    propagates instead, with its traceback.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        code = args.run(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
        return code
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        print("lowrank: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`lowrank ... | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, as 130 is 128 + SIGINT
    except Exception as exc:
        if os.environ.get("LOWRANK_DEBUG", "") not in ("", "0"):
            raise
        print(error_line(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
