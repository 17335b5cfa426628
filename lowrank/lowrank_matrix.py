"""The LowRank matrix.

Moved to :mod:`lowrank.factor.lowrank_matrix`; this module keeps the old import path working.
"""

from lowrank.factor.lowrank_matrix import *  # noqa: F403
from lowrank.factor.lowrank_matrix import __all__  # noqa: F401
