"""What every command shares: the one-line error, and the parser that prints it."""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

__all__ = ["EXPECTED_ERRORS", "CLIError", "Parser", "error_line"]


class CLIError(Exception):
    """A failure to report as one line, with exit code 2 (the command could not run)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not usage text plus a line."""

    def error(self, message: str) -> NoReturn:
        """Print ``lowrank: error: MESSAGE`` on one line and exit with code 2."""
        sys.stderr.write(f"lowrank: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


# What a command raises for something the user can fix (a file, a flag, a value
# out of range: see the error vocabulary in docs/architecture.md) or the
# machine cannot do (MemoryError); anything else is a bug in lowrank.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    CLIError, ValueError, TypeError, OSError, ImportError, FloatingPointError, RuntimeError, MemoryError,
)


def error_line(exc: BaseException) -> str:
    """The one line ``lowrank: error: …`` that reports ``exc`` (without a newline at the end).

    An exception outside :data:`EXPECTED_ERRORS` is a bug: the line names its
    type and asks for a report, since the user could not have caused it.
    """
    message = re.sub(r"\s*\n\s*", " ", str(exc)).strip() or type(exc).__name__
    if isinstance(exc, MemoryError):
        return f"lowrank: error: out of memory: {message}"
    if isinstance(exc, EXPECTED_ERRORS):
        return f"lowrank: error: {message}"
    return (f"lowrank: error: {type(exc).__name__}: {message} (this is a bug in lowrank, please report it; "
            "LOWRANK_DEBUG=1 shows the traceback)")
