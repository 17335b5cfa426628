"""The training application: the fit loop, its checkpoints, and the demo's synthetic tasks.

Above :mod:`lowrank.nn` and :mod:`lowrank.io`. ``lowrank.train.fit`` and the
names below keep the import paths of the single module this package replaced.
"""

from lowrank.train.fit import CHECKPOINT_FORMAT, LOSSES, Evaluation, History, NonFiniteError, evaluate, fit

__all__ = ["CHECKPOINT_FORMAT", "LOSSES", "Evaluation", "History", "NonFiniteError", "evaluate", "fit"]
