"""The training loop: minibatches, validation, early stopping, checkpoints.

``fit`` runs epochs of seeded minibatch gradient descent over any
:class:`lowrank.nn.Module` and any optimizer of :mod:`lowrank.nn.optim`::

    for each epoch:
        model.train(); order = rng.permutation(n)           # one Generator, resolved once
        for each batch:
            out = model(X_b); loss, dout = loss_fn(out, y_b)  # stop if out or loss is not finite
            model.zero_grad(); model.backward(dout)          # stop if a gradient is not finite
            clip_grad_norm_(...); optimizer.step(); schedule.step()
        validate in eval mode; early stopping; checkpoint

Reproducibility
    Every random draw of an epoch (the shuffle, and any LoRA dropout masks,
    which come from the layers' own generators) is restored from a
    checkpoint, along with the weights, the optimizer's and the schedule's
    state and the History, so ``fit(..., resume=path)`` continues exactly
    where the run that wrote ``path`` was: the final weights are
    bit-identical to an uninterrupted run's (given the same arguments).

Checkpoints
    One ``.npz`` file (``lowrank.io.save_npz``: written to a temporary file
    and moved into place, so a crash never leaves a half-written one; read
    back with ``allow_pickle=False``), rewritten at the end of every epoch.
    Keys: ``"format"``, ``"epoch"`` (epochs completed), ``"config"`` (JSON),
    ``"rng"`` (the shuffling Generator's ``bit_generator.state`` as JSON),
    ``"module_rng.<module>"`` (the same for layers with their own generator),
    ``"model.<name>"`` (every parameter), ``"optim.<key>"`` and
    ``"schedule.<key>"`` (their ``state_dict()``), ``"history.<field>"``,
    ``"early.<field>"`` and ``"best.<name>"`` (early stopping's state and
    best trainable weights).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np

from lowrank.io.files import load_npz, save_npz
from lowrank.nn import functional as F
from lowrank.nn.modules import Module, Parameter
from lowrank.nn.optim import clip_grad_norm_
from lowrank.utils.validation import RandomState, as_float_array, check_bool, check_int, check_random_state, check_real

__all__ = ["CHECKPOINT_FORMAT", "LOSSES", "Evaluation", "History", "NonFiniteError", "evaluate", "fit"]

CHECKPOINT_FORMAT = "lowrank.fit/1"

LossFn = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]


class NonFiniteError(FloatingPointError):
    """Training produced an inf or NaN: in the model's output, the loss, or a gradient.

    The message names the epoch, the step and what became non-finite. The
    checkpoint on disk, if any, is the one of the last completed epoch.
    """


# ---------------------------------------------------------------- losses and accuracy


def _class_accuracy(out: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows whose largest logit is at the target class: out (..., C), y (...)."""
    return float(np.mean(np.argmax(out, axis=-1) == y))


def _binary_accuracy(out: np.ndarray, y: np.ndarray) -> float:
    """Fraction of entries on the target's side: logit > 0 against target > 0.5."""
    return float(np.mean((out > 0) == (np.asarray(y) > 0.5)))


# name -> (loss function returning (loss, dout), accuracy or None)
LOSSES: dict[str, tuple[LossFn, Callable[[np.ndarray, np.ndarray], float] | None]] = {
    "cross_entropy": (F.cross_entropy, _class_accuracy),
    "mse": (F.mse_loss, None),
    "bce": (F.binary_cross_entropy_with_logits, _binary_accuracy),
}


def _resolve_loss(loss: Any) -> tuple[str | None, LossFn, Callable[..., float] | None]:
    """(name or None, loss function, accuracy or None) for a loss name or callable."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))} or a callable, got {loss!r}")
        return (loss, *LOSSES[loss])
    for name, (fn, acc) in LOSSES.items():  # F.cross_entropy itself gets its accuracy too
        if loss is fn:
            return name, fn, acc
    if not callable(loss):
        raise TypeError(f"loss must be a loss name or a callable (out, y) -> (loss, dout), got {type(loss).__name__}")
    return None, loss, None


# ---------------------------------------------------------------- History


@dataclass
class History:
    """What ``fit`` measured, one entry per epoch.

    Attributes
    ----------
    epoch : list of int
        1, 2, … (a resumed run continues the numbering).
    train_loss : list of float
        The mean loss over the epoch's minibatches, weighted by batch size,
        each measured in training mode before that batch's update.
    train_acc : list of float
        Likewise for accuracy; empty when the loss has none (``"mse"`` or a
        custom callable).
    val_loss, val_acc : list of float
        On ``val`` in eval mode after the epoch; empty without ``val``
        (``val_acc`` also without an accuracy).
    best_epoch : int or None
        With early stopping: the epoch of the lowest validation loss, whose
        weights the model holds at the end.
    stopped_epoch : int or None
        The epoch after which early stopping ended training, if it did.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, ints and None: ready for ``json.dumps``."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v) for f in fields(self)}

    # checkpoint encoding: lists as arrays, None as -1
    _LISTS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")

    def _to_arrays(self) -> dict[str, np.ndarray]:
        out = {k: np.asarray(getattr(self, k), dtype=np.int64 if k == "epoch" else np.float64) for k in self._LISTS}
        for k in ("best_epoch", "stopped_epoch"):
            value = getattr(self, k)
            out[k] = np.asarray(-1 if value is None else value, dtype=np.int64)
        return out

    @classmethod
    def _from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> History:
        lists = {k: arrays[k].tolist() for k in cls._LISTS}
        ints = {k: (None if int(arrays[k]) < 0 else int(arrays[k])) for k in ("best_epoch", "stopped_epoch")}
        return cls(**lists, **ints)


# ---------------------------------------------------------------- evaluation


class Evaluation(NamedTuple):
    """``evaluate``'s result: the mean loss, and the accuracy (None when the loss has none)."""

    loss: float
    accuracy: float | None


def _check_data(X: Any, y: Any, name_x: str = "X", name_y: str = "y") -> tuple[np.ndarray, np.ndarray]:
    X = as_float_array(X, name_x)
    y = np.asarray(y)
    if X.ndim < 1 or X.shape[0] == 0:
        raise ValueError(f"{name_x} must have at least one sample along axis 0, got shape {X.shape}")
    if y.ndim < 1 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"{name_y} must have one target per sample of {name_x} ({X.shape[0]}), got shape {y.shape}"
        )
    if not np.isfinite(X).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(X))[0])
        raise ValueError(f"{name_x} must be finite, got {X[index]} at index {index}")
    return X, y


def _modes(model: Module) -> list[tuple[Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _evaluate(model: Module, X: np.ndarray, y: np.ndarray, loss_fn: LossFn, acc_fn, batch_size: int,
              where: str) -> Evaluation:
    """Batched loss and accuracy in eval mode; the caller validated everything."""
    modes = _modes(model)
    model.eval()
    try:
        n = X.shape[0]
        total_loss = total_acc = 0.0
        for start in range(0, n, batch_size):
            xb, yb = X[start:start + batch_size], y[start:start + batch_size]
            with np.errstate(over="ignore", invalid="ignore"):  # reported just below
                out = model(xb)
            if not np.isfinite(out).all():
                raise NonFiniteError(f"the model's output became non-finite {where} (rows {start}..)")
            value, _ = loss_fn(out, yb)
            total_loss += value * len(xb)  # the mean losses are per sample: weight by batch size
            if acc_fn is not None:
                total_acc += acc_fn(out, yb) * len(xb)
    finally:
        _restore_modes(modes)
    return Evaluation(total_loss / n, None if acc_fn is None else total_acc / n)


def evaluate(model: Module, X: Any, y: Any, *, loss: str | LossFn = "cross_entropy",
             batch_size: int = 1024) -> Evaluation:
    """The mean loss and accuracy of ``model`` on ``(X, y)``, in eval mode, in batches.

    Parameters
    ----------
    model : Module
        Put in eval mode for the pass, then back in the modes it had.
    X : array_like of shape (n, ...)
    y : array_like of shape (n, ...)
        Targets as the loss takes them (class indices for ``"cross_entropy"``).
    loss : {"cross_entropy", "mse", "bce"} or callable, default "cross_entropy"
        A callable ``loss(out, y) -> (loss, dout)`` returns the mean over its batch.
    batch_size : int, default 1024
        Only changes memory use, not the result (beyond rounding).

    Returns
    -------
    Evaluation
        ``(loss, accuracy)``: the mean over all n samples; accuracy is None
        for ``"mse"`` and custom callables.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    _, loss_fn, acc_fn = _resolve_loss(loss)
    X, y = _check_data(X, y)
    batch_size = check_int(batch_size, "batch_size", low=1)
    return _evaluate(model, X, y, loss_fn, acc_fn, batch_size, "during evaluate")


# ---------------------------------------------------------------- progress


class _Progress:
    """A bar on a terminal, one line per epoch otherwise, or nothing; always on stderr."""

    def __init__(self, verbose: Any, epochs: int) -> None:
        if verbose not in (True, False, "auto", "bar", "lines"):
            raise ValueError(f"verbose must be True, False, 'auto', 'bar' or 'lines', got {verbose!r}")
        self.stream = sys.stderr
        if verbose in (True, "auto"):
            isatty = getattr(self.stream, "isatty", None)
            verbose = "bar" if isatty is not None and isatty() else "lines"
        self.mode = verbose or None
        self.epochs = epochs
        self.width = len(str(epochs))
        self._last_draw = 0.0

    def step(self, epoch: int, done: int, total: int, loss: float) -> None:
        if self.mode != "bar":
            return
        now = time.perf_counter()
        if done < total and now - self._last_draw < 0.1:  # redraw at most 10 times a second
            return
        self._last_draw = now
        filled = round(30 * done / total)
        self.stream.write(
            f"\repoch {epoch:>{self.width}}/{self.epochs} [{'#' * filled}{'.' * (30 - filled)}] "
            f"{done}/{total} loss {loss:.4f}"
        )
        self.stream.flush()

    def epoch_end(self, history: History, seconds: float) -> None:
        if self.mode is None:
            return
        parts = [f"epoch {history.epoch[-1]:>{self.width}}/{self.epochs}", f"train_loss {history.train_loss[-1]:.4f}"]
        for key in ("train_acc", "val_loss", "val_acc"):
            values = getattr(history, key)
            if len(values) == len(history.epoch):
                parts.append(f"{key} {values[-1]:.4f}")
        parts.append(f"{seconds:.2f}s")
        prefix = "\r\033[K" if self.mode == "bar" else ""  # the bar's line is overwritten by the summary
        self.stream.write(prefix + "  ".join(parts) + "\n")
        self.stream.flush()


# ---------------------------------------------------------------- checkpoints


def _json_array(obj: Any) -> np.ndarray:
    """A JSON document as a 0-d unicode array: .npz stores it without pickle."""
    return np.asarray(json.dumps(obj))


def _from_json_array(arr: np.ndarray) -> Any:
    return json.loads(str(arr[()]))


def _prefixed(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v for k, v in arrays.items()}


def _unprefixed(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in arrays.items() if k.startswith(prefix + ".")}


def _module_rngs(model: Module) -> dict[str, np.random.Generator]:
    """Every layer's own generator (dropout masks), by module name."""
    return dict(model.named_generators())


@dataclass
class _EarlyStopping:
    """Patience bookkeeping on the validation loss, and the best trainable weights."""

    patience: int
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best: dict[str, np.ndarray] = field(default_factory=dict)

    def update(self, epoch: int, val_loss: float, trainable: list[tuple[str, Parameter]]) -> bool:
        """Record the epoch; True when training should stop."""
        if val_loss < self.best_loss:  # strictly lower: ties keep the earlier, cheaper-to-reach weights
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            self.best = {name: p.data.copy() for name, p in trainable}
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"early.best_loss": np.asarray(self.best_loss, dtype=np.float64),
               "early.best_epoch": np.asarray(self.best_epoch, dtype=np.int64),
               "early.bad_epochs": np.asarray(self.bad_epochs, dtype=np.int64)}
        out.update(_prefixed("best", self.best))
        return out

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.best_loss = float(arrays["early.best_loss"])
        self.best_epoch = int(arrays["early.best_epoch"])
        self.bad_epochs = int(arrays["early.bad_epochs"])
        self.best = {k: v.copy() for k, v in _unprefixed("best", arrays).items()}


def _save_checkpoint(path: Any, *, epoch: int, config: dict[str, Any], rng: np.random.Generator, model: Module,
                     optimizer: Any, schedule: Any, history: History, early: _EarlyStopping | None) -> None:
    arrays: dict[str, np.ndarray] = {
        "format": np.asarray(CHECKPOINT_FORMAT),
        "epoch": np.asarray(epoch, dtype=np.int64),
        "config": _json_array(config),
        "rng": _json_array(rng.bit_generator.state),
    }
    arrays.update({f"module_rng.{name}": _json_array(g.bit_generator.state) for name, g in _module_rngs(model).items()})
    arrays.update(_prefixed("model", model.state_dict()))
    arrays.update(_prefixed("optim", optimizer.state_dict()))
    if schedule is not None:
        arrays.update(_prefixed("schedule", schedule.state_dict()))
    arrays.update(_prefixed("history", history._to_arrays()))
    if early is not None:
        arrays.update(early.to_arrays())
    save_npz(path, arrays)


def _load_checkpoint(path: Any, *, config: dict[str, Any], rng: np.random.Generator, model: Module, optimizer: Any,
                     schedule: Any, early: _EarlyStopping | None) -> tuple[int, History]:
    """Restore everything ``_save_checkpoint`` wrote; returns (epochs completed, History)."""
    where = f"resume={os.fspath(path)!r}"
    try:
        return _restore(load_npz(path), where, config=config, rng=rng, model=model, optimizer=optimizer,
                        schedule=schedule, early=early)
    except KeyError as exc:
        raise ValueError(f"{where} is an incomplete checkpoint: it has no key {exc}") from None


def _restore(arrays: Mapping[str, np.ndarray], where: str, *, config: dict[str, Any], rng: np.random.Generator,
             model: Module, optimizer: Any, schedule: Any, early: _EarlyStopping | None) -> tuple[int, History]:
    if "format" not in arrays or str(arrays["format"][()]) != CHECKPOINT_FORMAT:
        raise ValueError(f"{where} is not a checkpoint written by lowrank.train.fit (format {CHECKPOINT_FORMAT!r})")
    saved = _from_json_array(arrays["config"])
    differ = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{where} was written by a run with other settings, so it cannot continue it: {details}")
    if (schedule is None) != (not _unprefixed("schedule", arrays)):
        raise ValueError(f"{where}: the checkpoint {'has' if schedule is None else 'has no'} schedule state, "
                         f"but this call passes {'no' if schedule is None else 'a'} schedule")
    rngs = _module_rngs(model)
    saved_rngs = {k[len("module_rng."):] for k in arrays if k.startswith("module_rng.")}
    if saved_rngs != set(rngs):
        raise ValueError(f"{where}: the checkpoint holds generators for layers {sorted(saved_rngs)}, "
                         f"the model has them for {sorted(rngs)}")
    # read everything first, so that a missing key changes nothing
    epoch = int(arrays["epoch"])
    history = History._from_arrays(_unprefixed("history", arrays))
    rng_state = _from_json_array(arrays["rng"])
    early_arrays = {k: arrays[k] for k in ("early.best_loss", "early.best_epoch", "early.bad_epochs")} if early else {}
    # each load_state_dict checks its whole snapshot before writing; the model's comes first
    model.load_state_dict(_unprefixed("model", arrays))
    optimizer.load_state_dict(_unprefixed("optim", arrays))
    if schedule is not None:
        schedule.load_state_dict(_unprefixed("schedule", arrays))
    rng.bit_generator.state = rng_state
    for name, g in rngs.items():
        g.bit_generator.state = _from_json_array(arrays[f"module_rng.{name}"])
    if early is not None:
        early.load({**early_arrays, **{k: v for k, v in arrays.items() if k.startswith("best.")}})
    return epoch, history


# ---------------------------------------------------------------- fit


def _where(epoch: int, step: int, n_steps: int) -> str:
    """Where in the run a step is, for error messages; ``step`` counts from 0."""
    return f"at epoch {epoch}, step {step + 1} of {n_steps} (update {(epoch - 1) * n_steps + step + 1} of the run)"


def _first_non_finite(trainable: list[tuple[str, Parameter]]) -> str | None:
    for name, p in trainable:
        if p.grad is not None and not np.isfinite(p.grad).all():
            return name
    return None


def _train_step(
    model: Module, xb: np.ndarray, yb: np.ndarray, loss_fn: LossFn, trainable: list[tuple[str, Parameter]], where: str
) -> tuple[np.ndarray, float]:
    """Forward, loss and backward of one minibatch, refusing any non-finite value; returns ``(out, loss)``."""
    with np.errstate(over="ignore", invalid="ignore"):  # diverging weights: reported just below
        out = model(xb)
    if not np.isfinite(out).all():
        raise NonFiniteError(f"the model's output became non-finite {where}: "
                             "the weights diverged (try a lower learning rate or clip_grad_norm)")
    value, dout = loss_fn(out, yb)
    if not math.isfinite(value):
        raise NonFiniteError(f"the loss became non-finite ({value}) {where}")
    model.zero_grad()
    with np.errstate(over="ignore", invalid="ignore"):  # checked by _first_non_finite
        model.backward(dout)
    bad = _first_non_finite(trainable)
    if bad is not None:
        raise NonFiniteError(f"the gradient of parameter {bad!r} became non-finite {where}")
    return out, value


def fit(
    model: Module,
    X: Any,
    y: Any,
    *,
    loss: str | LossFn,
    optimizer: Any,
    epochs: int,
    batch_size: int,
    val: tuple[Any, Any] | None = None,
    random_state: RandomState = None,
    schedule: Any = None,
    clip_grad_norm: float | None = None,
    early_stopping: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    shuffle: bool = True,
    verbose: bool | str = True,
) -> History:
    """Train ``model`` on ``(X, y)`` by minibatch gradient descent; see the module docstring.

    Parameters
    ----------
    model : Module
        Trained in place; its trainable parameters are those the optimizer
        updates (frozen ones are never touched). Its train/eval modes are
        restored at the end.
    X : array_like of shape (n, ...)
        Finite; in the model's dtype (integers are converted).
    y : array_like of shape (n, ...)
        Targets as ``loss`` takes them: int class indices for
        ``"cross_entropy"``, floats for ``"mse"``, values in [0, 1] for ``"bce"``.
    loss : {"cross_entropy", "mse", "bce"} or callable
        A name, or ``loss(out, y_batch) -> (mean loss, dout)`` like the
        losses of :mod:`lowrank.nn.functional`. Accuracy is reported for
        ``"cross_entropy"`` (argmax) and ``"bce"`` (logit > 0).
    optimizer : lowrank.nn.optim.Optimizer
        Built on the model's parameters, e.g. ``Adam(model.named_parameters())``.
    epochs : int
        The total number of epochs, >= 1 (a resumed run counts the ones done).
    batch_size : int
        >= 1; the last batch of an epoch may be smaller.
    val : (X_val, y_val), optional
        Evaluated in eval mode after every epoch.
    random_state : None, int or numpy.random.Generator
        Resolved once; draws every epoch's shuffle.
    schedule : lowrank.nn.optim.LRSchedule, optional
        Stepped after every optimizer step.
    clip_grad_norm : float, optional
        Clip the trainable gradients' global L2 norm to this, > 0, before each step.
    early_stopping : int, optional
        Patience, >= 1: stop when the validation loss has not decreased for
        this many epochs in a row. Needs ``val``. At the end (stopped or not)
        the model holds the trainable weights of the best epoch.
    checkpoint : path, optional
        Rewritten atomically at the end of every epoch (see the module docstring).
    resume : path, optional
        A checkpoint to continue from. The call must use the same model
        architecture, optimizer and schedule types, batch size, number of
        samples, loss and early stopping as the run that wrote it; the data,
        too, for bit-identical weights. ``random_state``'s Generator is set to
        the saved state (so a Generator passed in is changed).
    shuffle : bool, default True
        Draw a new order of the samples every epoch; else keep their order.
    verbose : True, False, "auto", "bar" or "lines", default True
        Progress on stderr. True and "auto": a bar when stderr is a
        terminal, one line per epoch otherwise. False: silent.

    Returns
    -------
    History

    Raises
    ------
    NonFiniteError
        The model's output, the loss or a gradient became inf or NaN; the
        message names the epoch and step (and the parameter). Checkpoints
        are written only after a whole epoch went well, so the one on disk
        stays the last good one.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    loss_name, loss_fn, acc_fn = _resolve_loss(loss)
    X, y = _check_data(X, y)
    for attr in ("step", "state_dict", "load_state_dict"):
        if not callable(getattr(optimizer, attr, None)):
            raise TypeError(f"optimizer must be a lowrank.nn.optim optimizer (with .{attr}()), "
                            f"got {type(optimizer).__name__}")
    epochs = check_int(epochs, "epochs", low=1)
    batch_size = check_int(batch_size, "batch_size", low=1)
    if val is not None:
        if not isinstance(val, (tuple, list)) or len(val) != 2:
            raise TypeError(f"val must be a pair (X_val, y_val), got {type(val).__name__}")
        X_val, y_val = _check_data(*val, name_x="val[0]", name_y="val[1]")
    if clip_grad_norm is not None:
        clip_grad_norm = check_real(clip_grad_norm, "clip_grad_norm", 0.0, low_open=True)
    early = None
    if early_stopping is not None:
        if val is None:
            raise ValueError("early_stopping needs val=(X_val, y_val): it watches the validation loss")
        early = _EarlyStopping(check_int(early_stopping, "early_stopping", low=1))
    if schedule is not None and getattr(schedule, "optimizer", None) is not optimizer:
        raise ValueError("schedule must be built on the optimizer passed to fit")
    if checkpoint is not None:
        folder = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint={os.fspath(checkpoint)!r}: the folder {folder} does not exist")
    shuffle = check_bool(shuffle, "shuffle")
    progress = _Progress(verbose, epochs)
    trainable = [(name, p) for name, p in model.named_parameters() if p.trainable]
    if not trainable:
        raise ValueError("model has no trainable parameters: nothing to fit")
    rng = check_random_state(random_state)

    n = X.shape[0]
    config = {"n_samples": n, "batch_size": batch_size, "shuffle": bool(shuffle), "loss": loss_name,
              "early_stopping": early_stopping}
    history, done = History(), 0
    if resume is not None:
        done, history = _load_checkpoint(resume, config=config, rng=rng, model=model, optimizer=optimizer,
                                         schedule=schedule, early=early)

    modes = _modes(model)
    n_steps = math.ceil(n / batch_size)
    try:
        for epoch in range(done + 1, epochs + 1):
            if history.stopped_epoch is not None:  # a resumed run that had already stopped
                break
            started = time.perf_counter()
            model.train()
            order = rng.permutation(n) if shuffle else np.arange(n)
            total_loss = total_acc = 0.0
            for step in range(n_steps):
                idx = order[step * batch_size:(step + 1) * batch_size]
                xb, yb = X[idx], y[idx]

                out, value = _train_step(model, xb, yb, loss_fn, trainable, _where(epoch, step, n_steps))
                if clip_grad_norm is not None:
                    clip_grad_norm_(trainable, clip_grad_norm)
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                total_loss += value * len(idx)
                if acc_fn is not None:
                    total_acc += acc_fn(out, yb) * len(idx)
                progress.step(epoch, step + 1, n_steps, value)

            history.epoch.append(epoch)
            history.train_loss.append(total_loss / n)
            if acc_fn is not None:
                history.train_acc.append(total_acc / n)
            stop = False
            if val is not None:
                result = _evaluate(model, X_val, y_val, loss_fn, acc_fn, max(batch_size, 1024),
                                   f"on val after epoch {epoch}")
                history.val_loss.append(result.loss)
                if result.accuracy is not None:
                    history.val_acc.append(result.accuracy)
                if early is not None:
                    stop = early.update(epoch, result.loss, trainable)
                    history.best_epoch = early.best_epoch
                    if stop:
                        history.stopped_epoch = epoch
            if checkpoint is not None:
                _save_checkpoint(checkpoint, epoch=epoch, config=config, rng=rng, model=model, optimizer=optimizer,
                                 schedule=schedule, history=history, early=early)
            progress.epoch_end(history, time.perf_counter() - started)
            if stop:
                break
        if early is not None and early.best:
            model.load_state_dict(early.best, strict=False)  # the trainable weights of the best epoch
    finally:
        _restore_modes(modes)
    return history
