"""The finite-difference gradient checker.

Moved to :mod:`lowrank.reference.gradcheck`; this module keeps the old import path working.
"""

from lowrank.reference.gradcheck import *  # noqa: F403
from lowrank.reference.gradcheck import __all__  # noqa: F401
