"""Exact and randomized truncated SVD.

Moved to :mod:`lowrank.factor.svd`; this module keeps the old import path working.
"""

from lowrank.factor.svd import *  # noqa: F403
from lowrank.factor.svd import __all__  # noqa: F401
