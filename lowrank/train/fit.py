"""The training loop: minibatches, validation, early stopping, checkpoints.

``fit`` runs epochs of seeded minibatch gradient descent over any
:class:`lowrank.nn.Module` and any optimizer of :mod:`lowrank.nn.optim`::

    for each epoch:
        model.train(); order = rng.permutation(n)           # one Generator, resolved once
        for each batch:
            model.zero_grad()
            for each micro-batch k of the batch (accumulate=K of them, n_k of its n rows):
                out = model(X_k); loss, dout = loss_fn(out, y_k)  # stop if out or loss is not finite
                model.backward(dout * c_k / Σ c)             # c_k: the terms its mean counts
            stop if a gradient is not finite
            clip_grads_(...); optimizer.step(); schedule.step()
        validate in eval mode; early stopping; checkpoint

The steps, each named once: ``fit`` checks its arguments into a
:class:`~lowrank.train.config.FitConfig` and a
:class:`~lowrank.train.checkpoint.TrainState` (resuming it from a checkpoint
if asked), then ``_Trainer`` runs the epochs: ``train_epoch`` (the step
loop and the training history), ``forward_backward`` (one minibatch, refusing
non-finite values), ``update`` (clipping, the optimizer and the schedule),
``validate`` (validation history and early stopping), and ``end_epoch``
(checkpoint and progress). ``_Progress`` draws the progress and
``_modes_restored`` puts the train/eval modes back at the end.

Reproducibility
    Every random draw of an epoch (the shuffle, and any LoRA dropout masks,
    which come from the layers' own generators) is restored from a
    checkpoint, along with the weights, the optimizer's and the schedule's
    state and the History, so ``fit(..., resume=path)`` continues exactly
    where the run that wrote ``path`` was: the final weights are
    bit-identical to an uninterrupted run's (given the same arguments).

Checkpoints
    One ``.npz`` file, written atomically at the end of every epoch; see
    :mod:`lowrank.train.checkpoint` for its keys.
"""

from __future__ import annotations

import math
import os
import reprlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from lowrank.nn.functional import IGNORE_INDEX
from lowrank.nn.modules import Module, Parameter, as_array_of
from lowrank.nn.optim import clip_grads_
from lowrank.train.checkpoint import (
    CHECKPOINT_FORMAT,
    EarlyStopping,
    History,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from lowrank.train.config import LOSSES, FitConfig, LossFn, resolve_loss
from lowrank.utils.validation import (
    RandomState,
    as_float_array,
    check_finite,
    check_int,
    check_random_state,
    describe_non_finite,
)

__all__ = ["CHECKPOINT_FORMAT", "LOSSES", "Evaluation", "History", "NonFiniteError", "evaluate", "fit"]


class NonFiniteError(FloatingPointError):
    """Training produced an inf or NaN: in the model's output, the loss, or a gradient.

    The message names the epoch, the step and what became non-finite. The
    checkpoint on disk, if any, is the one of the last completed epoch.
    """


# ---------------------------------------------------------------- evaluation


class Evaluation(NamedTuple):
    """``evaluate``'s result: the mean loss, and the accuracy (None when the loss has none)."""

    loss: float
    accuracy: float | None


def _model_dtype(model: Module) -> np.dtype | None:
    """The one float dtype of ``model``'s parameters, or None if it has none or several."""
    dtypes = {p.data.dtype for p in model.parameters()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _input_dtype(model: Module) -> np.dtype | None:
    """What ``model`` reads: integers for a model of token ids (``takes_token_ids``: ``nn.GPT2``), else floats."""
    if getattr(model, "takes_token_ids", False):
        return np.dtype(np.int64)  # stands for every integer dtype: token ids pass through unchanged
    return _model_dtype(model)


def _check_data(X: Any, y: Any, dtype: np.dtype | None, name_x: str = "X",
                name_y: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """``X`` as the model reads it and ``y``, checked.

    ``dtype`` is :func:`_input_dtype`'s: a float dtype converts ``X`` as the
    layers do (integers, bools and lists converted); an integer one keeps
    integer ``X`` (token ids) as it is and refuses anything else.
    """
    if dtype is not None and dtype.kind in "iu":
        X = np.asarray(X)
        if X.dtype.kind not in "iu":
            raise TypeError(f"{name_x} must hold integer token ids for a model that reads them, got dtype {X.dtype}")
    else:
        X = as_float_array(X, name_x) if dtype is None else as_array_of(X, name_x, dtype)
    y = np.asarray(y)
    if X.ndim < 1 or X.shape[0] == 0:
        raise ValueError(f"{name_x} must have at least one sample along axis 0, got shape {X.shape}")
    if y.ndim < 1 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"{name_y} must have one target per sample of {name_x} ({X.shape[0]}), got shape {y.shape}"
        )
    return (X if X.dtype.kind in "iu" else check_finite(X, name_x)), y


def _mean_count(loss: str | None, y: np.ndarray) -> int:
    """How many terms the named loss averages over a batch with targets ``y`` (for accumulation's weights).

    The kept targets (not ``IGNORE_INDEX``) for ``"cross_entropy"``, and for
    ``"lm"`` the kept next-token labels ``y[:, 1:]``; the rows otherwise
    (``"mse"`` and ``"bce"`` average the same number of terms per row, and a
    callable loss is taken to be a mean over rows).
    """
    if loss == "cross_entropy":
        return int(np.count_nonzero(y != IGNORE_INDEX))
    if loss == "lm" and y.ndim == 2:
        return int(np.count_nonzero(y[:, 1:] != IGNORE_INDEX))
    return int(y.shape[0])


def _call_loss(loss_fn: LossFn, out: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """``loss_fn(out, y)``, held to the contract ``loss(out, y) -> (loss, dout)``: a real number and out's shape."""
    result = loss_fn(out, y)
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"loss must follow loss(out, y) -> (loss, dout), a pair; "
                        f"the loss returned {type(result).__name__} {reprlib.repr(result)}")
    value, dout = result
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]  # a 0-d array is a number too
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"loss must follow loss(out, y) -> (loss, dout) with the loss a real number; "
                        f"it returned {type(value).__name__} {reprlib.repr(value)} as the loss")
    if not isinstance(dout, np.ndarray):
        raise TypeError(f"loss must follow loss(out, y) -> (loss, dout) with dout an ndarray; "
                        f"it returned {type(dout).__name__} as dout")
    if dout.shape != out.shape:
        raise ValueError(f"loss must follow loss(out, y) -> (loss, dout) with dout of out's shape {out.shape}; "
                         f"it returned dout of shape {dout.shape}")
    return float(value), dout


@contextmanager
def _modes_restored(model: Module) -> Iterator[None]:
    """Run the block, then put every module back in the train/eval mode it had."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _non_finite(arr: np.ndarray, name: str, where: str, hint: str = "") -> NonFiniteError:
    """The error for a computed ``arr`` that is not finite: ``describe_non_finite``'s wording, after where."""
    return NonFiniteError(f"{where}: {describe_non_finite(arr, name)}{hint}")


def _evaluate(model: Module, X: np.ndarray, y: np.ndarray, loss_name: str | None, loss_fn: LossFn,
              acc_fn: Callable[..., float] | None, batch_size: int, where: str) -> Evaluation:
    """Batched loss and accuracy in eval mode; the caller validated everything.

    Each batch's mean is weighted by the terms it averages (:func:`_mean_count`),
    so the result is the mean over the whole data whatever ``batch_size``; a
    batch whose targets are all ignored is skipped (unless all of them are:
    the loss then refuses the first batch).
    """
    all_ignored = _mean_count(loss_name, y) == 0
    with _modes_restored(model):
        model.eval()
        n = X.shape[0]
        total_loss = total_acc = 0.0
        total_count = 0
        for start in range(0, n, batch_size):
            xb, yb = X[start:start + batch_size], y[start:start + batch_size]
            count = _mean_count(loss_name, yb)
            if count == 0 and not all_ignored:
                continue  # nothing to average: no share of the mean
            with np.errstate(over="ignore", invalid="ignore"):  # reported just below
                out = model(xb)
            if not np.isfinite(out).all():
                raise _non_finite(out, "the model's output", f"{where} (rows {start}..)")
            value, _ = _call_loss(loss_fn, out, yb)
            total_loss += value * count  # each batch's mean over its count terms: weight by it
            if acc_fn is not None:
                total_acc += acc_fn(out, yb) * count
            total_count += count
    return Evaluation(total_loss / total_count, None if acc_fn is None else total_acc / total_count)


def evaluate(model: Module, X: Any, y: Any, *, loss: str | LossFn = "cross_entropy",
             batch_size: int = 1024) -> Evaluation:
    """The mean loss and accuracy of ``model`` on ``(X, y)``, in eval mode, in batches.

    Parameters
    ----------
    model : Module
        Put in eval mode for the pass, then back in the modes it had.
    X : array_like of shape (n, ...)
        Finite; converted to the model's dtype as in :func:`fit`.
    y : array_like of shape (n, ...)
        Targets as the loss takes them (class indices for ``"cross_entropy"``).
    loss : {"cross_entropy", "mse", "bce", "lm"} or callable, default "cross_entropy"
        A callable ``loss(out, y) -> (loss, dout)`` returns the mean over
        its batch (a real number) and an ndarray of ``out``'s shape.
    batch_size : int, default 1024
        Only changes memory use, not the result (beyond rounding).

    Returns
    -------
    Evaluation
        ``(loss, accuracy)``: the mean over all n samples (over the targets
        not ``-100`` for ``"cross_entropy"`` and ``"lm"``, a batch of ignored
        targets only skipped); accuracy is None for ``"mse"`` and custom callables.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    loss_name, loss_fn, acc_fn = resolve_loss(loss)
    X, y = _check_data(X, y, _input_dtype(model))
    batch_size = check_int(batch_size, "batch_size", low=1)
    return _evaluate(model, X, y, loss_name, loss_fn, acc_fn, batch_size, "during evaluate")


# ---------------------------------------------------------------- progress


class _Progress:
    """A bar on a terminal, one line per epoch otherwise, or nothing; always on stderr."""

    def __init__(self, verbose: bool | str, epochs: int) -> None:
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


# ---------------------------------------------------------------- the loop


class _Trainer:
    """The epochs of one ``fit`` call, over data and a state that ``fit`` checked; one method per step."""

    def __init__(self, state: TrainState, X: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None,
                 loss_fn: LossFn, acc_fn: Callable[..., float] | None,
                 trainable: list[tuple[str, Parameter]]) -> None:
        self.state, self.config = state, state.config
        self.X, self.y, self.val = X, y, val
        self.loss_fn, self.acc_fn = loss_fn, acc_fn
        self.trainable = trainable
        self.params = [p for _, p in trainable]  # collected once: clipping takes them every step
        self.progress = _Progress(state.config.verbose, state.config.epochs)

    def run(self) -> None:
        """Every epoch not done yet, then the best epoch's weights (with early stopping)."""
        state = self.state
        for epoch in range(state.epoch + 1, self.config.epochs + 1):
            if state.history.stopped_epoch is not None:  # a resumed run that had already stopped
                break
            started = time.perf_counter()
            self.train_epoch(epoch)
            stop = self.validate(epoch)
            self.end_epoch(epoch, time.perf_counter() - started)
            if stop:
                break
        if state.early is not None:
            state.early.restore_best(state.model)

    def train_epoch(self, epoch: int) -> None:
        """One pass over the data in minibatches; appends the epoch's training loss (and accuracy) to the history."""
        config, acc_fn, X, y = self.config, self.acc_fn, self.X, self.y
        n, batch_size, n_steps = config.n_samples, config.batch_size, config.n_steps
        self.state.model.train()
        order = self.state.rng.permutation(n) if config.shuffle else np.arange(n)
        total_loss = total_acc = 0.0
        total_count = 0
        for step in range(n_steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            xb, yb = X[idx], y[idx]
            out, value = self.forward_backward(xb, yb, epoch, step)
            self.update()
            count = _mean_count(config.loss, yb)  # the terms the batch's mean averages: weight by them
            total_loss += value * count
            if acc_fn is not None:
                total_acc += acc_fn(out, yb) * count
            total_count += count
            self.progress.step(epoch, step + 1, n_steps, value)
        history = self.state.history
        history.epoch.append(epoch)
        history.train_loss.append(total_loss / total_count)
        if acc_fn is not None:
            history.train_acc.append(total_acc / total_count)

    def where(self, epoch: int, step: int) -> str:
        """Where in the run a step is, for error messages; ``step`` counts from 0."""
        n_steps = self.config.n_steps
        return f"at epoch {epoch}, step {step + 1} of {n_steps} (update {(epoch - 1) * n_steps + step + 1} of the run)"

    def forward_backward(self, xb: np.ndarray, yb: np.ndarray, epoch: int, step: int) -> tuple[np.ndarray, float]:
        """Forward, loss and backward of one minibatch, refusing any non-finite value; returns ``(out, loss)``.

        With ``accumulate = K`` the batch of ``n`` rows runs as ``min(K, n)``
        contiguous micro-batches (sizes differing by at most one). Each
        loss is a mean over its ``c_k`` terms (:func:`_mean_count`: its rows,
        or its kept targets for ``"cross_entropy"`` and ``"lm"``), and the
        modules *sum* the gradients of successive backward passes, so each
        micro-batch's ``dout`` is scaled by ``c_k / Σ c``: the gradients then
        add up to the gradient of the whole batch's mean loss, to rounding,
        and the reported loss is the same weighted sum. A micro-batch whose
        targets are all ignored (``c_k = 0``) only runs forward.
        """
        model = self.state.model
        n, k = xb.shape[0], min(self.config.accumulate, xb.shape[0])
        bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        counts = [_mean_count(self.config.loss, yb[lo:hi]) for lo, hi in bounds]
        total = sum(counts)
        if total == 0:  # every target of the batch ignored: the loss refuses it, as without accumulation
            counts, total = [hi - lo for lo, hi in bounds], n
        model.zero_grad()
        outs, value = [], 0.0
        for (lo, hi), count in zip(bounds, counts, strict=True):
            out, part = self.micro_step(xb[lo:hi], yb[lo:hi], count / total, epoch, step)
            outs.append(out)
            value += part
        for name, p in self.trainable:
            if p.grad is not None and not np.isfinite(p.grad).all():
                raise _non_finite(p.grad, f"the gradient of parameter {name!r}", self.where(epoch, step))
        return (outs[0] if k == 1 else np.concatenate(outs)), value

    def micro_step(self, xb: np.ndarray, yb: np.ndarray, weight: float, epoch: int,
                   step: int) -> tuple[np.ndarray, float]:
        """Forward, loss, and the backward of ``weight · loss`` added to the gradients.

        Returns ``(out, weight · loss)``. With ``weight == 0`` (targets all
        ignored, no mean to take) only the forward runs: ``(out, 0.0)``.
        """
        model = self.state.model
        with np.errstate(over="ignore", invalid="ignore"):  # diverging weights: reported just below
            out = model(xb)
        if not np.isfinite(out).all():
            raise _non_finite(out, "the model's output", self.where(epoch, step),
                              "; the weights diverged (try a lower learning rate or clip_grad_norm)")
        if weight == 0.0:
            return out, 0.0
        value, dout = _call_loss(self.loss_fn, out, yb)
        if not math.isfinite(value):
            # describe_non_finite's wording; a scalar has no index to name
            raise NonFiniteError(f"{self.where(epoch, step)}: the loss must be finite, got {value}")
        if weight != 1.0:
            dout = dout * weight  # d(weight · loss)/d out; a new array: the loss's own is left alone
            value *= weight
        with np.errstate(over="ignore", invalid="ignore"):  # the caller checks the gradients
            model.backward(dout)
        return out, value

    def update(self) -> None:
        """Clip the gradients (if asked), step the optimizer, then the schedule."""
        state, clip = self.state, self.config.clip_grad_norm
        if clip is not None:
            clip_grads_(self.params, clip)  # the checked shell would re-collect the parameters every step
        state.optimizer.step()
        if state.schedule is not None:
            state.schedule.step()

    def validate(self, epoch: int) -> bool:
        """Evaluate on ``val`` into the history and let early stopping decide; True to stop."""
        if self.val is None:
            return False
        history, early = self.state.history, self.state.early
        result = _evaluate(self.state.model, *self.val, self.config.loss, self.loss_fn, self.acc_fn,
                           max(self.config.batch_size, 1024), f"on val after epoch {epoch}")
        history.val_loss.append(result.loss)
        if result.accuracy is not None:
            history.val_acc.append(result.accuracy)
        if early is None:
            return False
        stop = early.update(epoch, result.loss, self.trainable)
        history.best_epoch = early.best_epoch
        if stop:
            history.stopped_epoch = epoch
        return stop

    def end_epoch(self, epoch: int, seconds: float) -> None:
        """Count the epoch as done, write the checkpoint (if asked) and report progress."""
        self.state.epoch = epoch
        if self.config.checkpoint is not None:
            save_checkpoint(self.config.checkpoint, self.state)
        self.progress.epoch_end(self.state.history, seconds)


# ---------------------------------------------------------------- fit


def _check_optimizer(optimizer: Any) -> None:
    for attr in ("step", "state_dict", "load_state_dict"):
        if not callable(getattr(optimizer, attr, None)):
            raise TypeError(f"optimizer must be a lowrank.nn.optim optimizer (with .{attr}()), "
                            f"got {type(optimizer).__name__}")
    if not hasattr(optimizer, "named_params"):
        raise TypeError(f"optimizer must be a lowrank.nn.optim optimizer (with .named_params), "
                        f"got {type(optimizer).__name__}")


def _names(names: list[str]) -> str:
    """At most five names, then how many more: one line however big the model."""
    shown = ", ".join(map(repr, names[:5]))
    return shown if len(names) <= 5 else f"{shown} and {len(names) - 5} more"


def _check_optimizer_holds(optimizer: Any, model: Module, trainable: list[tuple[str, Parameter]]) -> None:
    """Refuse an optimizer that misses a trainable parameter of ``model`` or holds one that is not the model's.

    An optimizer built before ``inject_lora`` holds the base weights (now
    frozen) and none of the adapters: fit would step nothing. Frozen
    parameters of the model may be held: the optimizer skips them.
    """
    held = {id(p) for _, p in optimizer.named_params}
    missing = [name for name, p in trainable if id(p) not in held]
    if missing:
        raise ValueError(
            f"optimizer must hold every trainable parameter of the model, but it misses {len(missing)}: "
            f"{_names(missing)}; build the optimizer after inject_lora or freezing, "
            f"e.g. Adam(model.named_parameters())")
    own = {id(p) for p in model.parameters()}
    foreign = [key for key, p in optimizer.named_params if id(p) not in own]
    if foreign:
        raise ValueError(
            f"optimizer must hold only parameters of the model (fit computes no gradient for others), "
            f"but {len(foreign)} are not the model's: {_names(foreign)}; build it from model.named_parameters()")


def _check_val(val: Any, dtype: np.dtype | None) -> tuple[np.ndarray, np.ndarray] | None:
    if val is None:
        return None
    if not isinstance(val, (tuple, list)) or len(val) != 2:
        raise TypeError(f"val must be a pair (X_val, y_val), got {type(val).__name__}")
    return _check_data(val[0], val[1], dtype, name_x="val[0]", name_y="val[1]")


def _trainable(model: Module) -> list[tuple[str, Parameter]]:
    trainable = [(name, p) for name, p in model.named_parameters() if p.trainable]
    if not trainable:
        raise ValueError("model has no trainable parameters: nothing to fit")
    return trainable


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
    accumulate: int = 1,
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
        Finite; in the model's dtype, as its layers take input: integers,
        bools and lists are converted to it, a float array of the other
        precision is a TypeError (cast it first). A model of token ids
        (``takes_token_ids``, as :class:`lowrank.nn.GPT2`) takes integer
        ``X`` of shape (n, T) unchanged, and refuses a float one (TypeError).
    y : array_like of shape (n, ...)
        Targets as ``loss`` takes them: int class indices for
        ``"cross_entropy"``, floats for ``"mse"``, values in [0, 1] for ``"bce"``,
        the token ids (n, T) themselves for ``"lm"`` (-100 where ignored).
    loss : {"cross_entropy", "mse", "bce", "lm"} or callable
        A name, or ``loss(out, y_batch) -> (mean loss, dout)`` like the
        losses of :mod:`lowrank.nn.functional`: a real number and an
        ndarray of ``out``'s shape. Accuracy is reported for
        ``"cross_entropy"`` (argmax) and ``"bce"`` (logit > 0), and for
        ``"lm"`` (:func:`lowrank.nn.lm_loss`, the next-token loss: the
        logits at position t against ``y[:, t + 1]``) the next-token accuracy.
        ``"cross_entropy"`` and ``"lm"`` (and their accuracies) average the
        targets that are not ``-100`` (the counted tokens), so the epoch's
        loss weighs each batch by that count: it is the mean over every
        kept target of the epoch, however they fall into batches.
    optimizer : lowrank.nn.optim.Optimizer
        Built on the model's parameters, e.g. ``Adam(model.named_parameters())``,
        *after* ``inject_lora`` and any freezing: it must hold every
        trainable parameter of the model and nothing that is not the
        model's. Frozen parameters of the model may be among them (as in
        PyTorch: the optimizer skips them, they stay bit-identical).
    epochs : int
        The total number of epochs, >= 1 (a resumed run counts the ones
        done, and ``epochs`` may not be fewer than those).
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
    accumulate : int, default 1
        Gradient accumulation: run each batch as ``K = accumulate``
        micro-batches (in ``[1, batch_size]``; a shorter last batch of
        ``n < K`` rows as ``n``), each forward and backward on at most
        ``ceil(batch_size / K)`` rows, then clip and step once. Every loss is
        a mean and modules *sum* successive backward passes, so K plain
        backward passes would give K times the batch's gradient (and SGD
        and clipping are not scale-invariant); ``fit`` scales micro-batch
        ``k``'s ``dout`` by ``c_k / Σ c`` instead, ``c_k`` the number of
        terms its loss averages (its ``n_k`` rows; its targets not ``-100``
        for ``"cross_entropy"`` and ``"lm"``, whose means skip ignored
        targets; a micro-batch with none left only runs forward), so the
        accumulated gradient, the clipping and the step equal the whole
        batch's to rounding, for the losses of :data:`LOSSES` (a callable
        loss is weighted by rows) and a model whose rows do not interact. Dropout masks are drawn per
        micro-batch, so with dropout the run is another draw of the same
        distribution, not the same numbers.
    checkpoint : path, optional
        Rewritten atomically at the end of every epoch (see the module
        docstring). Checked before training starts: a file path (not a
        folder) in a folder that exists and can be written.
    resume : path, optional
        A checkpoint to continue from. The call must use the same model
        architecture, optimizer and schedule types, batch size, number of
        samples, shuffling, loss and early stopping as the run that wrote it
        (``FitConfig.RESUME_FIELDS``); the data, too, for bit-identical
        weights. ``random_state``'s Generator is set to the saved state (so a
        Generator passed in is changed).
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
    TypeError
        An argument of the wrong kind: ``X`` of the other float precision,
        a ``loss`` callable that does not return ``(loss, dout)``.
    ValueError
        A value breaking a rule, among them an optimizer that misses a
        trainable parameter (named; typically built before ``inject_lora``)
        or holds one that is not the model's; a ``resume`` file that is
        corrupt (the message names the file and the field) or has done
        more epochs than ``epochs``.
    OSError
        ``checkpoint`` is a folder (IsADirectoryError), its folder does not
        exist (FileNotFoundError) or cannot be written (PermissionError):
        checked before the first epoch; ``resume`` does not exist
        (FileNotFoundError).
    NonFiniteError
        The model's output, the loss or a gradient became inf or NaN; the
        message names the epoch and step (and the parameter). Checkpoints
        are written only after a whole epoch went well, so the one on disk
        stays the last good one.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    loss_name, loss_fn, acc_fn = resolve_loss(loss)
    dtype = _input_dtype(model)
    X, y = _check_data(X, y, dtype)
    _check_optimizer(optimizer)
    checked_val = _check_val(val, dtype)
    config = FitConfig(n_samples=X.shape[0], epochs=epochs, batch_size=batch_size, loss=loss_name,
                       shuffle=shuffle, has_val=checked_val is not None, clip_grad_norm=clip_grad_norm,
                       early_stopping=early_stopping, accumulate=accumulate, checkpoint=checkpoint,
                       resume=resume, verbose=verbose)
    if schedule is not None and getattr(schedule, "optimizer", None) is not optimizer:
        raise ValueError("schedule must be built on the optimizer passed to fit")
    trainable = _trainable(model)
    _check_optimizer_holds(optimizer, model, trainable)
    early = None if config.early_stopping is None else EarlyStopping(config.early_stopping)
    state = TrainState(config, model, optimizer, schedule, check_random_state(random_state), early=early)
    if config.resume is not None:
        load_checkpoint(config.resume, state)
    with _modes_restored(model):
        _Trainer(state, X, y, checked_val, loss_fn, acc_fn, trainable).run()
    return state.history
