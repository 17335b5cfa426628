"""What every command shares: the one-line error, and the parser that prints it."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["CLIError", "Parser"]


class CLIError(Exception):
    """A failure to report as one line, with exit code 2 (the command could not run)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not usage text plus a line."""

    def error(self, message: str) -> NoReturn:
        """Print ``lowrank: error: MESSAGE`` on one line and exit with code 2."""
        sys.stderr.write(f"lowrank: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)
