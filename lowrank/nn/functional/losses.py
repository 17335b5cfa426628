"""Losses: mean squared error, softmax cross-entropy, binary cross-entropy on logits.

Each returns ``(loss, gradient)``: the loss a Python float accumulated in
float64, the gradient with respect to the prediction in its dtype. The
reduction is the mean. Each public loss checks its arguments (shapes,
finiteness in :func:`lowrank.utils.validation.check_finite`'s wording,
target ranges) and calls its ``*_core``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowrank.nn.functional.activations import logistic
from lowrank.nn.functional.checks import as_input, check_nonempty
from lowrank.utils.validation import as_float_array, check_finite, check_int

__all__ = [
    "IGNORE_INDEX",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_core",
    "cross_entropy",
    "cross_entropy_core",
    "mse_loss",
    "mse_loss_core",
]


def mse_loss(pred: Any, target: Any) -> tuple[float, np.ndarray]:
    """Mean squared error ``mean((pred - target)**2)`` and ``dpred = 2 (pred - target) / n``.

    Parameters
    ----------
    pred : ndarray of any non-empty shape
    target : ndarray of pred's shape
        Cast to ``pred``'s float computation.

    Returns
    -------
    loss : float
    dpred : ndarray of pred's shape and dtype
    """
    pred = as_float_array(pred, "pred")
    target = as_float_array(target, "target")
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {pred.shape}, got shape {target.shape}")
    check_nonempty(pred, "pred")
    check_finite(pred, "pred")
    check_finite(target, "target")
    return mse_loss_core(pred, target)


def mse_loss_core(pred: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """:func:`mse_loss` without validation: finite float arrays of one non-empty shape."""
    diff = pred.astype(np.float64) - target  # float64
    loss = float(np.mean(diff * diff))
    return loss, (diff * (2.0 / diff.size)).astype(pred.dtype)


IGNORE_INDEX = -100  # cross_entropy's default ignore_index, PyTorch's


def cross_entropy(logits: Any, target: Any, ignore_index: int = IGNORE_INDEX) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy with integer class targets, mean over the positions not ignored.

    ``loss = mean over kept positions of (logsumexp(logits) - logits[target])``
    and ``dlogits = (softmax(logits) - onehot(target)) / n_kept`` at kept
    positions, 0 at ignored ones, where a position is kept unless its target
    equals ``ignore_index`` (PyTorch's rule: the mean divides by the number of
    kept positions). Each row's maximum is subtracted first, so large logits
    stay finite; the softmax is computed in logits' dtype and the loss
    accumulated in float64 (``docs/attention.md``).

    Parameters
    ----------
    logits : ndarray of shape (..., C)
    target : ndarray of int of shape (...)
        Class indices in ``[0, C)``, or ``ignore_index``.
    ignore_index : int, default -100
        Targets equal to it are skipped (no loss, zero gradient). It may be
        a class index too, as in PyTorch: that class is then never scored.

    Returns
    -------
    loss : float
    dlogits : ndarray of logits' shape and dtype

    Raises
    ------
    ValueError
        A target outside ``[0, C)`` that is not ``ignore_index``; every
        target ignored (PyTorch returns NaN there; lowrank refuses rather than
        return a silent NaN); non-finite logits.
    """
    logits = as_input(logits, "logits")
    target = np.asarray(target)
    if target.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target must have shape logits.shape[:-1] = {logits.shape[:-1]} for logits of shape "
            f"{logits.shape}, got target of shape {target.shape}"
        )
    ignore_index = check_int(ignore_index, "ignore_index")
    check_nonempty(target, "target")
    n_classes = logits.shape[-1]
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"target must hold class indices in [0, C-1] = [0, {n_classes - 1}], got {target[index]} at "
            f"index {index} (a target equal to ignore_index = {ignore_index} is skipped)"
        )
    check_finite(logits, "logits")
    return cross_entropy_core(logits, target, ignore_index)


def cross_entropy_core(
    logits: np.ndarray, target: np.ndarray, ignore_index: int = IGNORE_INDEX
) -> tuple[float, np.ndarray]:
    """:func:`cross_entropy` without validation: finite logits (..., C), targets (...) in [0, C) or ignore_index.

    Still raises the ValueError for targets that are all ``ignore_index``:
    the mean over no position is not a number.
    """
    n_classes, n = logits.shape[-1], target.size
    z = logits.reshape(n, n_classes)  # (n, C), a view when possible
    t = target.reshape(n)  # (n,)
    kept = t != ignore_index  # (n,)
    n_kept = int(np.count_nonzero(kept))
    if n_kept == 0:
        raise ValueError(
            f"target must keep at least one position for the mean, got every target equal to "
            f"ignore_index = {ignore_index}"
        )
    rows = np.flatnonzero(kept)  # (n_kept,)
    t_kept = t[rows]
    e = z - z.max(axis=1, keepdims=True)  # (n, C), fresh; each row's max is 0: exp never overflows
    picked = e[rows, t_kept].astype(np.float64)  # (n_kept,), the shifted target logits
    np.exp(e, out=e)
    total = e.sum(axis=1, dtype=np.float64)  # (n,), in [1, C]
    lse = np.log(total[rows])  # (n_kept,), logsumexp of the shifted rows
    loss = float(np.sum(lse - picked) / n_kept)
    # dlogits = (softmax - onehot) / n_kept at kept rows, 0 at ignored ones: one pass over (n, C),
    # then the n_kept target entries rewritten as (p_t - 1) / n_kept, subtracting before dividing
    factor = np.where(kept, 1.0 / (total * n_kept), 0.0).astype(logits.dtype)  # (n,)
    e *= factor[:, None]
    p_target = np.exp(picked - lse)  # (n_kept,), float64
    e[rows, t_kept] = (p_target - 1.0) / n_kept
    return loss, e.reshape(logits.shape)


def binary_cross_entropy_with_logits(logits: Any, target: Any) -> tuple[float, np.ndarray]:
    """Binary cross-entropy on logits, mean reduction, in the stable form.

    ``loss_i = max(z, 0) - z t + log1p(exp(-|z|))`` (equal to
    ``-t log σ(z) - (1 - t) log(1 - σ(z))`` without overflow) and
    ``dlogits = (σ(z) - t) / n``.

    Parameters
    ----------
    logits : ndarray of any non-empty shape
    target : ndarray of logits' shape
        Values in [0, 1] (soft labels allowed).

    Returns
    -------
    loss : float
    dlogits : ndarray of logits' shape and dtype
    """
    logits = as_float_array(logits, "logits")
    target = as_float_array(target, "target")
    if target.shape != logits.shape:
        raise ValueError(f"target must have logits' shape {logits.shape}, got shape {target.shape}")
    check_nonempty(logits, "logits")
    check_finite(logits, "logits")
    inside = (target >= 0) & (target <= 1)  # False for NaN too
    if not inside.all():
        index = tuple(int(i) for i in np.argwhere(~inside)[0])
        raise ValueError(f"target must hold values in [0, 1], got {target[index]} at index {index}")
    return binary_cross_entropy_with_logits_core(logits, target)


def binary_cross_entropy_with_logits_core(logits: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """:func:`binary_cross_entropy_with_logits` without validation: finite logits, targets in [0, 1]."""
    z = logits.astype(np.float64)
    t = target.astype(np.float64)
    loss = float(np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
    return loss, ((logistic(z) - t) / z.size).astype(logits.dtype)
