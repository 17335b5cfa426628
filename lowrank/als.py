"""Alternating least squares.

Moved to :mod:`lowrank.factor.als`; this module keeps the old import path working.
"""

from lowrank.factor.als import *  # noqa: F403
from lowrank.factor.als import __all__  # noqa: F401
