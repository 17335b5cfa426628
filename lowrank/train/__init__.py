"""The training application: the fit loop, its config and checkpoints, and the demo's synthetic tasks.

Above :mod:`lowrank.nn` and :mod:`lowrank.io`. ``lowrank.train.fit`` and the
names below keep the import paths of the single module this package replaced.
"""

from lowrank.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from lowrank.train.config import FitConfig
from lowrank.train.fit import CHECKPOINT_FORMAT, LOSSES, Evaluation, History, NonFiniteError, evaluate, fit

__all__ = [
    "CHECKPOINT_FORMAT",
    "LOSSES",
    "Evaluation",
    "FitConfig",
    "History",
    "NonFiniteError",
    "TrainState",
    "evaluate",
    "fit",
    "load_checkpoint",
    "save_checkpoint",
]
