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
from lowrank.utils.validation import as_float_array, check_finite

__all__ = [
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


def cross_entropy(logits: Any, target: Any) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy with integer class targets, mean over all leading dims.

    ``loss = mean(logsumexp(logits) - logits[target])`` and
    ``dlogits = (softmax(logits) - onehot(target)) / n``, computed in float64
    after subtracting each row's maximum, so large logits stay finite.

    Parameters
    ----------
    logits : ndarray of shape (..., C)
    target : ndarray of int of shape (...)
        Class indices in ``[0, C)``.

    Returns
    -------
    loss : float
    dlogits : ndarray of logits' shape and dtype
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
    check_nonempty(target, "target")
    n_classes = logits.shape[-1]
    bad = (target < 0) | (target >= n_classes)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"target must hold class indices in [0, C-1] = [0, {n_classes - 1}], got {target[index]} at index {index}"
        )
    check_finite(logits, "logits")
    return cross_entropy_core(logits, target)


def cross_entropy_core(logits: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """:func:`cross_entropy` without validation: finite logits (..., C), class indices (...) in [0, C)."""
    n_classes, n = logits.shape[-1], target.size
    z = logits.reshape(n, n_classes).astype(np.float64)  # (n, C), a float64 copy
    z -= z.max(axis=1, keepdims=True)  # each row's max is 0: exp never overflows
    lse = np.log(np.exp(z).sum(axis=1))  # (n,)
    rows, t = np.arange(n), target.reshape(n)
    loss = float(np.mean(lse - z[rows, t]))
    dz = np.exp(z - lse[:, None])  # softmax, (n, C)
    dz[rows, t] -= 1.0
    dz /= n
    return loss, dz.astype(logits.dtype).reshape(logits.shape)


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
