"""The state of a training run, and the checkpoint file that holds it.

:class:`TrainState` gathers everything a resumed run needs to continue the
same trajectory: the config, the model, the optimizer, the schedule, the
shuffling generator, the :class:`History` and the early-stopping
bookkeeping. :func:`save_checkpoint` writes it; :func:`load_checkpoint`
checks a file against it and then restores it in place.

The file
    One ``.npz`` (``lowrank.io.files.save_npz``: written to a temporary file
    and moved into place, so a crash never leaves a half-written one; read
    back with ``allow_pickle=False``). Keys: ``"format"``, ``"epoch"``
    (epochs completed), ``"config"`` (the :class:`FitConfig` as JSON),
    ``"rng"`` (the shuffling Generator's ``bit_generator.state`` as JSON),
    ``"module_rng.<module>"`` (the same for every layer with its own
    generator, from ``Module.named_generators()``), ``"model.<name>"`` (every
    parameter), ``"optim.<key>"`` and ``"schedule.<key>"`` (their
    ``state_dict()``), ``"history.<field>"``, ``"early.<field>"`` and
    ``"best.<name>"`` (early stopping's state and best trainable weights).
"""

from __future__ import annotations

import copy
import json
import math
import os
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from lowrank.io.files import load_npz, save_npz
from lowrank.nn.modules import Module, Parameter
from lowrank.train.config import FitConfig

__all__ = ["CHECKPOINT_FORMAT", "EarlyStopping", "History", "TrainState", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "lowrank.fit/1"


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
        lists: dict[str, Any] = {k: arrays[k].tolist() for k in cls._LISTS}
        ints: dict[str, Any] = {k: (None if int(arrays[k]) < 0 else int(arrays[k]))
                                for k in ("best_epoch", "stopped_epoch")}
        return cls(**lists, **ints)


@dataclass
class EarlyStopping:
    """Patience bookkeeping on the validation loss, and the best trainable weights.

    Parameters
    ----------
    patience : int
        Stop after this many epochs in a row without a strictly lower
        validation loss (``fit`` checked it: >= 1).
    """

    patience: int
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    best: dict[str, np.ndarray] = field(default_factory=dict)

    _KEYS = ("early.best_loss", "early.best_epoch", "early.bad_epochs")

    def update(self, epoch: int, val_loss: float, trainable: list[tuple[str, Parameter]]) -> bool:
        """Record the epoch's validation loss; True when training should stop."""
        if val_loss < self.best_loss:  # strictly lower: ties keep the earlier, cheaper-to-reach weights
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            self.best = {name: p.data.copy() for name, p in trainable}
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore_best(self, model: Module) -> None:
        """Put the best epoch's trainable weights back into ``model`` (nothing if no epoch was recorded)."""
        if self.best:
            model.load_state_dict(self.best, strict=False)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The bookkeeping as 0-d arrays and the best weights under ``"best.<name>"``."""
        out = {"early.best_loss": np.asarray(self.best_loss, dtype=np.float64),
               "early.best_epoch": np.asarray(self.best_epoch, dtype=np.int64),
               "early.bad_epochs": np.asarray(self.bad_epochs, dtype=np.int64)}
        out.update(_prefixed("best", self.best))
        return out

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`to_arrays` wrote (``arrays`` has every key it needs: checked by the caller)."""
        self.best_loss = float(arrays["early.best_loss"])
        self.best_epoch = int(arrays["early.best_epoch"])
        self.bad_epochs = int(arrays["early.bad_epochs"])
        self.best = {k: v.copy() for k, v in _unprefixed("best", arrays).items()}


@dataclass
class TrainState:
    """Everything a checkpoint holds; ``fit`` updates it in place as it trains.

    Attributes
    ----------
    config : FitConfig
    model : Module
    optimizer : lowrank.nn.optim.Optimizer
    schedule : lowrank.nn.optim.LRSchedule or None
    rng : numpy.random.Generator
        Draws every epoch's shuffle.
    history : History
    early : EarlyStopping or None
        None without early stopping.
    epoch : int
        Epochs completed.
    """

    config: FitConfig
    model: Module
    optimizer: Any
    schedule: Any
    rng: np.random.Generator
    history: History = field(default_factory=History)
    early: EarlyStopping | None = None
    epoch: int = 0


# ---------------------------------------------------------------- the file


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


def save_checkpoint(path: str | os.PathLike, state: TrainState) -> None:
    """Write ``state`` to ``path`` atomically (see the module docstring for the keys)."""
    arrays: dict[str, np.ndarray] = {
        "format": np.asarray(CHECKPOINT_FORMAT),
        "epoch": np.asarray(state.epoch, dtype=np.int64),
        "config": _json_array(state.config.to_json()),
        "rng": _json_array(state.rng.bit_generator.state),
    }
    for name, g in state.model.named_generators():
        arrays[f"module_rng.{name}"] = _json_array(g.bit_generator.state)
    arrays.update(_prefixed("model", state.model.state_dict()))
    arrays.update(_prefixed("optim", state.optimizer.state_dict()))
    if state.schedule is not None:
        arrays.update(_prefixed("schedule", state.schedule.state_dict()))
    arrays.update(_prefixed("history", state.history._to_arrays()))
    if state.early is not None:
        arrays.update(state.early.to_arrays())
    save_npz(path, arrays)


def load_checkpoint(path: str | os.PathLike, state: TrainState) -> None:
    """Check the checkpoint at ``path`` against ``state``, then restore ``state`` from it, in place.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Not a checkpoint of ``fit``; written under other settings
        (:meth:`FitConfig.check_resume`); more epochs done than
        ``state.config.epochs``; with or without a schedule or layer
        generators where ``state`` differs; incomplete, or a field that is
        not what ``save_checkpoint`` writes (the message names the file and
        the field), or holding state that does not fit the model or
        optimizer. Nothing is changed then.
    TypeError
        A parameter or optimizer buffer of another dtype than the model's.
    """
    where = f"resume={os.fspath(path)!r}"
    arrays = load_npz(path)
    try:
        _check_compatible(arrays, state, where)
        _restore(arrays, state, where)
    except KeyError as exc:
        raise ValueError(f"{where} is an incomplete checkpoint: it has no key {exc}") from None


def _field_error(where: str, key: str, rule: str) -> ValueError:
    """The one-line error for a checkpoint field that is not what ``save_checkpoint`` writes."""
    return ValueError(f"{where}: the checkpoint's {key!r} {rule}")


def _json_field(arrays: Mapping[str, np.ndarray], key: str, where: str) -> dict[str, Any]:
    """The JSON object stored under ``key`` (a 0-d unicode array), or a ValueError naming the field."""
    arr = arrays[key]
    if arr.shape != () or arr.dtype.kind != "U":
        raise _field_error(where, key, f"must be a JSON text, got an array of shape {arr.shape} and dtype {arr.dtype}")
    try:
        value = json.loads(str(arr[()]))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; RecursionError: nested too deep
        raise _field_error(where, key, f"is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _field_error(where, key, f"must be a JSON object, got a JSON {type(value).__name__}")
    return value


def _epoch_field(arrays: Mapping[str, np.ndarray], where: str, epochs: int) -> int:
    """The epochs the checkpoint completed: one integer in [0, ``epochs``]."""
    arr = arrays["epoch"]
    if arr.shape != () or arr.dtype.kind not in "iu":
        raise _field_error(where, "epoch", f"must be one integer, got an array of shape {arr.shape} "
                                           f"and dtype {arr.dtype}")
    epoch = int(arr)
    if epoch < 0:
        raise _field_error(where, "epoch", f"(epochs completed) must be >= 0, got {epoch}")
    if epoch > epochs:
        raise ValueError(f"{where} has completed {epoch} epochs, more than epochs={epochs}: "
                         f"pass epochs >= {epoch} to continue it")
    return epoch


def _generator_state(arrays: Mapping[str, np.ndarray], key: str, g: np.random.Generator,
                     where: str) -> dict[str, Any]:
    """The bit-generator state under ``key``, tried on a copy of ``g``'s so a bad one changes nothing."""
    saved = _json_field(arrays, key, where)
    probe = copy.deepcopy(g.bit_generator)
    try:
        probe.state = saved
    except KeyError as exc:
        raise _field_error(where, key, f"is not a {type(probe).__name__} state: it has no key {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise _field_error(where, key, f"is not a {type(probe).__name__} state: {exc}") from None
    return saved


def _history_field(arrays: Mapping[str, np.ndarray], where: str, epoch: int) -> History:
    """The History stored under ``"history.*"``, one entry per completed epoch."""
    try:
        history = History._from_arrays(_unprefixed("history", arrays))
    except (TypeError, ValueError) as exc:  # arrays of the wrong shape or kind
        raise _field_error(where, "history.*", f"is not a History: {exc}") from None
    if history.epoch != list(range(1, epoch + 1)) or len(history.train_loss) != epoch:
        raise _field_error(where, "history.epoch", f"must count the {epoch} epochs completed, "
                                                   f"got {reprlib.repr(history.epoch)}")
    return history


def _check_compatible(arrays: Mapping[str, np.ndarray], state: TrainState, where: str) -> None:
    """Refuse a file that is not a checkpoint of a run ``state`` could continue."""
    fmt = arrays.get("format")
    if fmt is None or fmt.shape != () or str(fmt[()]) != CHECKPOINT_FORMAT:
        raise ValueError(f"{where} is not a checkpoint written by lowrank.train.fit (format {CHECKPOINT_FORMAT!r})")
    state.config.check_resume(_json_field(arrays, "config", where), where)
    _epoch_field(arrays, where, state.config.epochs)
    if (state.schedule is None) != (not _unprefixed("schedule", arrays)):
        raise ValueError(f"{where}: the checkpoint {'has' if state.schedule is None else 'has no'} schedule state, "
                         f"but this call passes {'no' if state.schedule is None else 'a'} schedule")
    names = [name for name, _ in state.model.named_generators()]
    saved = sorted(_unprefixed("module_rng", arrays))
    if saved != sorted(names):
        raise ValueError(f"{where}: the checkpoint holds generators for layers {saved}, "
                         f"the model has them for {sorted(names)}")


def _restore(arrays: Mapping[str, np.ndarray], state: TrainState, where: str) -> None:
    """Load every part of ``state``; everything is read and checked first, so a bad field changes nothing."""
    epoch = _epoch_field(arrays, where, state.config.epochs)
    history = _history_field(arrays, where, epoch)
    rng_state = _generator_state(arrays, "rng", state.rng, where)
    generators = state.model.named_generators()
    module_states = [_generator_state(arrays, f"module_rng.{name}", g, where) for name, g in generators]
    early: dict[str, np.ndarray] = {}
    if state.early is not None:
        early = {k: arrays[k] for k in EarlyStopping._KEYS}
        early.update((k, v) for k, v in arrays.items() if k.startswith("best."))
    _load_states(arrays, state, where)
    state.rng.bit_generator.state = rng_state
    for (_, g), saved in zip(generators, module_states, strict=True):
        g.bit_generator.state = saved  # the layer holds this Generator: its stream continues from here
    if state.early is not None:
        state.early.load(early)
    state.epoch, state.history = epoch, history


def _load_states(arrays: Mapping[str, np.ndarray], state: TrainState, where: str) -> None:
    """The model's, optimizer's and schedule's ``load_state_dict``: all or nothing, errors naming the file.

    Each ``load_state_dict`` checks its whole snapshot before writing; the
    model's weights are put back if a later one refuses its part.
    """
    before = state.model.state_dict()
    part = "model"
    try:
        state.model.load_state_dict(_unprefixed("model", arrays))
        part = "optim"
        state.optimizer.load_state_dict(_unprefixed("optim", arrays))
        if state.schedule is not None:
            part = "schedule"
            state.schedule.load_state_dict(_unprefixed("schedule", arrays))
    except (TypeError, ValueError) as exc:
        if part != "model":
            state.model.load_state_dict(before)
        raise type(exc)(f"{where}: the checkpoint's '{part}.*' arrays: {exc}") from None
