"""``fit``'s settings, checked once: :class:`FitConfig`, and the table of named losses.

``fit`` builds one :class:`FitConfig` from its arguments before anything
runs; every later step reads the checked values from it. A checkpoint stores
the config (as JSON) and a resume compares the settings that decide the
trajectory (:attr:`FitConfig.RESUME_FIELDS`) with the new call's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lowrank.io.files import check_writable
from lowrank.nn import functional as F
from lowrank.nn.gpt2 import lm_accuracy, lm_loss
from lowrank.utils.validation import check_bool, check_int, check_real

__all__ = ["LOSSES", "VERBOSE", "FitConfig", "LossFn", "resolve_loss"]

LossFn = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]
AccuracyFn = Callable[[np.ndarray, np.ndarray], float]


def _class_accuracy(out: np.ndarray, y: np.ndarray) -> float:
    """Fraction of the kept rows whose largest logit is at the target class: out (..., C), y (...).

    A target equal to ``IGNORE_INDEX`` is left out, as ``cross_entropy`` leaves
    it out of the loss; NaN when every target is ignored.
    """
    y = np.asarray(y)
    kept = y != F.IGNORE_INDEX
    if not kept.any():
        return float("nan")
    return float(np.mean((np.argmax(out, axis=-1) == y)[kept]))


def _binary_accuracy(out: np.ndarray, y: np.ndarray) -> float:
    """Fraction of entries on the target's side: logit > 0 against target > 0.5."""
    return float(np.mean((out > 0) == (np.asarray(y) > 0.5)))


# name -> (loss function returning (loss, dout), accuracy or None)
LOSSES: dict[str, tuple[LossFn, AccuracyFn | None]] = {
    "cross_entropy": (F.cross_entropy, _class_accuracy),
    "mse": (F.mse_loss, None),
    "bce": (F.binary_cross_entropy_with_logits, _binary_accuracy),
    "lm": (lm_loss, lm_accuracy),  # next-token loss of a language model: y = the token ids (labels), shifted inside
}

# the accepted values of fit's ``verbose``
VERBOSE = (True, False, "auto", "bar", "lines")


def resolve_loss(loss: Any) -> tuple[str | None, LossFn, AccuracyFn | None]:
    """The loss function and accuracy of a loss name or callable.

    Parameters
    ----------
    loss : {"cross_entropy", "mse", "bce", "lm"} or callable
        A callable ``loss(out, y) -> (mean loss, dout)``. One of the
        functions of :data:`LOSSES` passed as a callable gets its name and
        accuracy too.

    Returns
    -------
    (name or None, loss function, accuracy function or None)
        The name is None for a custom callable, which has no accuracy.
    """
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))} or a callable, got {loss!r}")
        return (loss, *LOSSES[loss])
    for name, (fn, acc) in LOSSES.items():
        if loss is fn:
            return name, fn, acc
    if not callable(loss):
        raise TypeError(f"loss must be a loss name or a callable (out, y) -> (loss, dout), got {type(loss).__name__}")
    return None, loss, None


@dataclass(frozen=True)
class FitConfig:
    """The settings of one ``fit`` call, each checked when the config is built.

    Construction raises the error ``fit`` documents for a bad argument, so a
    config that exists is valid. The argument names and rules are ``fit``'s;
    see its docstring for what each does.

    Attributes
    ----------
    n_samples : int
        Rows of ``X``, >= 1.
    epochs : int
        >= 1.
    batch_size : int
        >= 1.
    loss : str or None
        A name of :data:`LOSSES`, or None for a custom callable.
    shuffle : bool, default True
    has_val : bool, default False
        Whether ``fit`` got validation data (early stopping needs it).
    clip_grad_norm : float or None, default None
        > 0.
    accumulate : int, default 1
        Micro-batches per batch, in ``[1, batch_size]``.
    early_stopping : int or None, default None
        Patience, >= 1; needs ``has_val``.
    checkpoint : str, path-like or None, default None
        A file path (not a folder) whose folder exists and is writable
        (``lowrank.io.files.check_writable``); kept as a str.
    resume : str, path-like or None, default None
        Kept as a str.
    verbose : bool or str, default True
        One of :data:`VERBOSE`.
    """

    n_samples: int
    epochs: int
    batch_size: int
    loss: str | None
    shuffle: bool = True
    has_val: bool = False
    clip_grad_norm: float | None = None
    early_stopping: int | None = None
    accumulate: int = 1
    checkpoint: str | os.PathLike[str] | None = None  # stored as str
    resume: str | os.PathLike[str] | None = None  # stored as str
    verbose: bool | str = True

    # the settings a resumed run must share with the run that wrote the checkpoint:
    # with any other value the saved state would not continue the same trajectory
    RESUME_FIELDS = ("n_samples", "batch_size", "shuffle", "loss", "early_stopping")

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {
            "n_samples": check_int(self.n_samples, "n_samples", low=1),
            "epochs": check_int(self.epochs, "epochs", low=1),
            "batch_size": check_int(self.batch_size, "batch_size", low=1),
            "shuffle": check_bool(self.shuffle, "shuffle"),
            "has_val": check_bool(self.has_val, "has_val"),
            "checkpoint": _checked_checkpoint(self.checkpoint),
            "resume": None if self.resume is None else os.fsdecode(self.resume),
        }
        checked["accumulate"] = check_int(self.accumulate, "accumulate", 1, checked["batch_size"],
                                          rule="[1, batch_size]")
        if self.loss is not None and self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))} or None, got {self.loss!r}")
        if self.clip_grad_norm is not None:
            checked["clip_grad_norm"] = check_real(self.clip_grad_norm, "clip_grad_norm", 0.0, low_open=True)
        if self.early_stopping is not None:
            if not checked["has_val"]:
                raise ValueError("early_stopping needs val=(X_val, y_val): it watches the validation loss")
            checked["early_stopping"] = check_int(self.early_stopping, "early_stopping", low=1)
        if self.verbose not in VERBOSE:
            raise ValueError(f"verbose must be True, False, 'auto', 'bar' or 'lines', got {self.verbose!r}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: the checked, normalised values

    @property
    def n_steps(self) -> int:
        """Minibatches per epoch: ``ceil(n_samples / batch_size)``."""
        return math.ceil(self.n_samples / self.batch_size)

    def to_json(self) -> dict[str, Any]:
        """Every field as a plain JSON value, for the checkpoint."""
        return asdict(self)

    def check_resume(self, saved: Mapping[str, Any], where: str) -> None:
        """Refuse to continue a run whose :attr:`RESUME_FIELDS` in ``saved`` differ from this config's.

        Raises ValueError naming every setting that differs, with both values.
        """
        current = self.to_json()
        differ = [k for k in self.RESUME_FIELDS if saved.get(k) != current[k]]
        if differ:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differ)
            raise ValueError(f"{where} was written by a run with other settings, so it cannot continue it: {details}")


def _checked_checkpoint(checkpoint: Any) -> str | None:
    """``checkpoint`` as a str path that fit can write at the end of every epoch, or None.

    Checked before any training (``lowrank.io.files.check_writable``), so a
    bad path fails in a second, not after the first epoch.
    """
    if checkpoint is None:
        return None
    return os.fsdecode(check_writable(checkpoint, "checkpoint"))
