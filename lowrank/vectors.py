"""Reference test vectors: write them, check a candidate against them.

Moved to :mod:`lowrank.reference.vectors`; this module keeps the old import path working.
"""

from lowrank.reference.vectors import *  # noqa: F403
from lowrank.reference.vectors import __all__  # noqa: F401
