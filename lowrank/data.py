"""The demo's synthetic tasks.

Moved to :mod:`lowrank.train.data`; this module keeps the old import path working.
"""

from lowrank.train.data import *  # noqa: F403
from lowrank.train.data import __all__  # noqa: F401
