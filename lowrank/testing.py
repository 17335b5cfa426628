"""The hypothesis harness for a candidate LoRA implementation.

Moved to :mod:`lowrank.reference.harness`; this module keeps the old import path working.
"""

from lowrank.reference.harness import *  # noqa: F403
from lowrank.reference.harness import __all__  # noqa: F401
