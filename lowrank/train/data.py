"""Small synthetic classification tasks, generated in memory, for the LoRA demo.

Nothing is downloaded: every task is drawn from a seeded generator, so the
same ``random_state`` gives the same bits everywhere.

The design
----------
A fixed random *teacher* network labels inputs ``x ~ N(0, I_d)`` into ``C``
classes::

    label(x) = argmax( tanh(x @ W1.T) @ W2.T + b2 )     W1 (hidden, d), W2 (C, hidden)

- **pretrain** (task A) is labelled by the teacher ``(W1, W2, b2)``.
- **downstream** (task B) is labelled by the same teacher with ``W1 + ΔW``,
  where ``ΔW = U diag(s) V^T`` has rank ``delta_rank`` (2 by default) and a
  flat spectrum. The change in every hidden pre-activation, ``ΔW x = U s V^T
  x``, depends on the input only through the ``delta_rank`` directions of
  ``V``: the new task is the old one plus a *low-rank* change, which is the
  hypothesis under which LoRA should match full fine-tuning at a small rank.
- **contrast** is labelled by ``W1 + ΔW_full``, a full-rank ``ΔW`` (rank
  ``min(hidden, d)``) with a flat spectrum. Its inputs are the downstream
  task's inputs, so the two differ in labels only, and by default its norm
  is calibrated so that it moves the *same fraction of labels* as the
  low-rank change: both tasks are equally far from task A, and what differs
  is only how many input directions the change spreads over.

  Why not the same Frobenius norm? For ``x ~ N(0, I)`` equal norms give equal
  expected perturbation energy, ``E‖ΔW x‖² = ‖ΔW‖²_F``, but the low-rank
  change concentrates that energy in a few directions, where tanh saturates,
  so at equal norm the full-rank change moves more labels (0.31, 0.45 and
  0.42 against 0.29, 0.33 and 0.30 for seeds 0, 1, 2 at the defaults): the
  contrast task would be harder for every method, not only for LoRA.
  ``contrast_match="norm"`` gives the equal-norm version.

The norm of ``ΔW`` is not a magic number: it is found by bisection so that
the low-rank change relabels a fraction ``label_change`` (30 % by default) of
a fixed probe set: enough that the pretrained model must be fine-tuned, not
so much that task B is unrelated to task A. The bias ``b2`` is set the same
way so that task A's classes are equally frequent. Each ``Dataset`` records
the rank of its planted change and the fraction of its validation labels that
differ from what task A's teacher would say.

Defaults (32 inputs, a teacher 32 hidden units wide, 6 classes, 20,000
pretraining and 4,000 downstream samples) let a NumPy MLP of width ~128
pretrain in a few seconds and fine-tune in about a second per run, so
``lowrank demo`` can run the whole comparison in well under a minute.

Streams: the seed is split into independent streams for the teacher, the
two changes, the probe set and each task's training and validation inputs,
so changing a sample count changes nothing else. Every function defaults to
``random_state=0`` rather than None because the tasks are only related if
they come from the same teacher: ``make_task("pretrain")`` and
``make_task("downstream")`` share one when they get the same int seed. Pass
the same int, not a Generator (which advances between calls), when building
tasks one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.utils.validation import RandomState, check_bool, check_choice, check_int, check_random_state, check_real

__all__ = [
    "TASK_NAMES",
    "Dataset",
    "Tasks",
    "Teacher",
    "downstream_task",
    "make_task",
    "make_tasks",
    "make_teacher",
    "planted_delta",
    "pretrain_task",
]

TASK_NAMES = ("pretrain", "downstream", "contrast")

_N_PROBE = 4096  # probe inputs for calibrating b2 and ‖ΔW‖: label fractions to about ±1 %


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields, not objects
class Dataset:
    """A classification task split into training and validation sets.

    Attributes
    ----------
    X_train : ndarray of shape (n_train, n_features), float32
    y_train : ndarray of shape (n_train,), int64
        Class indices in ``[0, n_classes)``.
    X_val : ndarray of shape (n_val, n_features), float32
    y_val : ndarray of shape (n_val,), int64
    n_classes : int
    name : str
        One of ``TASK_NAMES``.
    delta_rank : int
        Rank of the change planted in the teacher relative to the pretraining
        task: 0 for ``"pretrain"``.
    label_change : float
        Fraction of ``y_val`` that differs from the pretraining teacher's
        labels of the same inputs: 0.0 for ``"pretrain"``.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    n_classes: int
    name: str
    delta_rank: int
    label_change: float

    @property
    def n_features(self) -> int:
        """The number of input features, ``X_train.shape[1]``."""
        return self.X_train.shape[1]

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train {self.X_train.shape}, val {self.X_val.shape}, "
            f"n_classes={self.n_classes}, delta_rank={self.delta_rank}, "
            f"label_change={self.label_change:.3f})"
        )


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields, not objects
class Teacher:
    """The labelling network ``argmax(tanh(x @ W1.T) @ W2.T + b2)``, in float64.

    Attributes
    ----------
    W1 : ndarray of shape (n_hidden, n_features)
    W2 : ndarray of shape (n_classes, n_hidden)
    b2 : ndarray of shape (n_classes,)
    """

    W1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Class scores, ndarray of shape (n, n_classes), for ``X`` of shape (n, n_features)."""
        h = np.tanh(np.asarray(X, dtype=np.float64) @ self.W1.T)  # (n, n_hidden)
        return h @ self.W2.T + self.b2  # (n, n_classes)

    def labels(self, X: np.ndarray) -> np.ndarray:
        """Class indices, int64 ndarray of shape (n,)."""
        return np.argmax(self.logits(X), axis=1).astype(np.int64)

    def with_delta(self, delta: np.ndarray) -> Teacher:
        """The same teacher with ``W1 + delta``; ``delta`` of shape (n_hidden, n_features)."""
        return Teacher(self.W1 + delta, self.W2, self.b2)


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields, not objects
class Tasks:
    """The three related tasks of one teacher, and the changes that relate them.

    Attributes
    ----------
    pretrain, downstream, contrast : Dataset
        See the module docstring. ``downstream`` and ``contrast`` share their inputs.
    teacher : Teacher
        Task A's teacher.
    delta_low : ndarray of shape (n_hidden, n_features)
        Task B's change to ``W1``, of rank ``downstream.delta_rank``.
    delta_full : ndarray of shape (n_hidden, n_features)
        The contrast task's change, of rank ``min(n_hidden, n_features)``;
        it moves as many labels as ``delta_low`` (``contrast_match="labels"``)
        or has its Frobenius norm (``"norm"``).
    """

    pretrain: Dataset
    downstream: Dataset
    contrast: Dataset
    teacher: Teacher
    delta_low: np.ndarray
    delta_full: np.ndarray


def make_teacher(
    n_features: int = 32, n_hidden: int = 32, n_classes: int = 6, *, random_state: RandomState = 0
) -> Teacher:
    """Draw a random teacher whose classes are equally frequent on ``x ~ N(0, I)``.

    ``W1 ~ N(0, 1/n_features)`` gives hidden pre-activations of unit variance
    (tanh neither linear nor saturated), ``W2 ~ N(0, 1/n_hidden)``, and ``b2``
    is adjusted on a probe set until each class takes about ``1/n_classes`` of it.

    Parameters
    ----------
    n_features, n_hidden : int
        >= 1.
    n_classes : int
        >= 2.
    random_state : None, int or numpy.random.Generator, default 0

    Returns
    -------
    Teacher
    """
    d = check_int(n_features, "n_features", 1)
    h = check_int(n_hidden, "n_hidden", 1)
    c = check_int(n_classes, "n_classes", 2)
    rng = check_random_state(random_state)
    W1 = rng.standard_normal((h, d)) / np.sqrt(d)  # (hidden, d)
    W2 = rng.standard_normal((c, h)) / np.sqrt(h)  # (C, hidden)
    probe = rng.standard_normal((_N_PROBE, d))  # (n_probe, d)
    scores = Teacher(W1, W2, np.zeros(c)).logits(probe)  # (n_probe, C)
    return Teacher(W1, W2, _balancing_bias(scores))


def _balancing_bias(scores: np.ndarray, n_iter: int = 100) -> np.ndarray:
    """A bias ``b`` under which ``argmax(scores + b)`` picks every class about equally often.

    Gradient-style steps ``b -= step * (frequency - 1/C)``, the step shrinking
    as 1/sqrt(iteration) so the frequencies settle instead of oscillating.
    """
    n, c = scores.shape
    b = np.zeros(c)
    scale = float(np.std(scores)) or 1.0
    for i in range(n_iter):
        freq = np.bincount(np.argmax(scores + b, axis=1), minlength=c) / n  # (C,)
        b -= scale / np.sqrt(i + 1) * (freq - 1 / c)
    return b


def planted_delta(
    shape: tuple[int, int], rank: int, norm: float = 1.0, *, random_state: RandomState = None
) -> np.ndarray:
    """A random matrix of exactly ``rank`` with a flat spectrum and Frobenius norm ``norm``.

    ``ΔW = (norm / sqrt(rank)) · U @ V.T`` with ``U (m, rank)`` and ``V (n, rank)``
    having orthonormal columns (QR of Gaussian matrices): ``rank`` equal
    singular values, so no rank-``r < rank`` approximation keeps more than
    ``r / rank`` of its energy.

    Parameters
    ----------
    shape : (int, int)
        (m, n), both >= 1.
    rank : int
        In ``[1, min(m, n)]``.
    norm : float, default 1.0
        >= 0.
    random_state : None, int or numpy.random.Generator

    Returns
    -------
    ndarray of shape (m, n), float64
    """
    if not isinstance(shape, tuple) or len(shape) != 2:
        raise TypeError(f"shape must be a pair (m, n), got {shape!r}")
    m = check_int(shape[0], "shape[0]", 1)
    n = check_int(shape[1], "shape[1]", 1)
    r = check_int(rank, "rank", 1, min(m, n), rule="[1, min(m, n)]")
    norm = check_real(norm, "norm", 0.0)
    rng = check_random_state(random_state)
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))  # (m, r), orthonormal columns
    V, _ = np.linalg.qr(rng.standard_normal((n, r)))  # (n, r)
    return (norm / np.sqrt(r)) * (U @ V.T)  # (m, n), singular values all norm / sqrt(r)


def _calibrate_norm(teacher: Teacher, direction: np.ndarray, probe: np.ndarray,
                    target: float) -> float:
    """The norm ``t`` at which ``teacher.with_delta(t * direction)`` relabels ``target`` of ``probe``.

    ``direction`` has Frobenius norm 1. Doubles an upper bound until it
    relabels at least ``target``, then bisects to a relative width of 1e-3:
    finer than the probe set can resolve a label fraction.
    """
    base = teacher.labels(probe)
    z0 = probe @ teacher.W1.T  # (n_probe, hidden): the pre-activations, computed once
    dz = probe @ direction.T  # (n_probe, hidden): their change per unit of t

    def changed(t: float) -> float:  # teacher.with_delta(t * direction).labels(probe), cheaper
        labels = np.argmax(np.tanh(z0 + t * dz) @ teacher.W2.T + teacher.b2, axis=1)
        return float(np.mean(labels != base))

    lo, hi = 0.0, float(np.linalg.norm(teacher.W1))
    for _ in range(20):
        if changed(hi) >= target:
            break
        lo, hi = hi, 2 * hi
    else:
        raise ValueError(
            f"label_change must be reachable by a rank-{np.linalg.matrix_rank(direction)} change "
            f"of this teacher, got {target!r} (at most {changed(hi):.3f} of the labels moved)"
        )
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if changed(mid) < target else (lo, mid)
    return hi


def make_tasks(
    *,
    n_features: int = 32,
    n_hidden: int = 32,
    n_classes: int = 6,
    delta_rank: int = 2,
    label_change: float = 0.3,
    n_pretrain: int = 20_000,
    n_downstream: int = 4_000,
    n_val: int = 2_000,
    contrast_match: str = "labels",
    random_state: RandomState = 0,
) -> Tasks:
    """Build the pretraining, low-rank downstream and full-rank contrast tasks of one teacher.

    See the module docstring for the design.

    Parameters
    ----------
    n_features : int, default 32
        Input dimension ``d``, >= 2.
    n_hidden : int, default 32
        The teacher's hidden width, >= 2. The contrast change has rank
        ``min(n_hidden, n_features)``.
    n_classes : int, default 6
        >= 2.
    delta_rank : int, default 2
        Rank of the downstream change, in ``[1, min(n_hidden, n_features) - 1]``
        so that the contrast's is higher.
    label_change : float, default 0.3
        Fraction of labels the downstream change moves, in (0, 0.5].
    n_pretrain, n_downstream : int, default 20,000 and 4,000
        Training samples of the pretraining task and of the two downstream
        tasks, >= 1.
    n_val : int, default 2,000
        Validation samples of each task, >= 1.
    contrast_match : {"labels", "norm"}, default "labels"
        What the full-rank contrast change has in common with the low-rank
        one: the fraction of probe labels it moves (its norm calibrated
        separately), or its Frobenius norm. See the module docstring.
    random_state : None, int or numpy.random.Generator, default 0
        Fixes the teacher, the changes and the inputs.

    Returns
    -------
    Tasks
        X float32, y int64.

    Examples
    --------
    >>> tasks = make_tasks(n_pretrain=100, n_downstream=50, n_val=20, random_state=0)
    >>> tasks.downstream.X_train.shape, tasks.downstream.y_train.dtype
    ((50, 32), dtype('int64'))
    >>> tasks.downstream.delta_rank, tasks.contrast.delta_rank
    (2, 32)
    """
    d = check_int(n_features, "n_features", 2)
    h = check_int(n_hidden, "n_hidden", 2)
    c = check_int(n_classes, "n_classes", 2)
    k = check_int(delta_rank, "delta_rank", 1, min(h, d) - 1,
                  rule="[1, min(n_hidden, n_features) - 1]")
    target = check_real(label_change, "label_change", 0.0, 0.5, low_open=True)
    n_pre = check_int(n_pretrain, "n_pretrain", 1)
    n_down = check_int(n_downstream, "n_downstream", 1)
    n_v = check_int(n_val, "n_val", 1)
    check_choice(contrast_match, "contrast_match", ("labels", "norm"))
    rng = check_random_state(random_state)
    # Independent child streams, so that no sample count shifts another stream.
    s_teacher, s_low, s_full, s_probe, s_pre, s_pre_val, s_down, s_down_val = (
        np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=8)
    )

    teacher = make_teacher(d, h, c, random_state=s_teacher)
    delta_low, delta_full = _planted_changes(teacher, k, target, contrast_match, s_low, s_full, s_probe)
    X_pre, X_pre_val = _inputs(s_pre, n_pre, d), _inputs(s_pre_val, n_v, d)
    X_down, X_down_val = _inputs(s_down, n_down, d), _inputs(s_down_val, n_v, d)
    y_a_val = teacher.labels(X_down_val)  # what task A says of the downstream inputs
    return Tasks(
        pretrain=_dataset("pretrain", teacher, X_pre, X_pre_val, 0, y_a_val),
        downstream=_dataset("downstream", teacher.with_delta(delta_low), X_down, X_down_val, k, y_a_val),
        contrast=_dataset("contrast", teacher.with_delta(delta_full), X_down, X_down_val, min(h, d), y_a_val),
        teacher=teacher,
        delta_low=delta_low,
        delta_full=delta_full,
    )


def _planted_changes(teacher: Teacher, rank: int, label_change: float, contrast_match: str,
                     s_low: np.random.Generator, s_full: np.random.Generator,
                     s_probe: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The low-rank and the full-rank change ``(h, d)``, each calibrated on one probe set.

    The low-rank change's norm moves ``label_change`` of the probe labels; the
    full-rank one's does too (``contrast_match="labels"``) or equals it (``"norm"``).
    """
    h, d = teacher.W1.shape
    direction_low = planted_delta((h, d), rank, 1.0, random_state=s_low)  # ‖·‖_F = 1
    direction_full = planted_delta((h, d), min(h, d), 1.0, random_state=s_full)
    probe = s_probe.standard_normal((_N_PROBE, d))
    norm = _calibrate_norm(teacher, direction_low, probe, label_change)
    if contrast_match == "labels":
        norm_full = _calibrate_norm(teacher, direction_full, probe, label_change)
    else:
        norm_full = norm
    return norm * direction_low, norm_full * direction_full


def _inputs(stream: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``n`` inputs ``x ~ N(0, I_d)`` in float32, shape (n, d).

    float32 first, then labelled: the labels are exactly those of the stored inputs.
    """
    return stream.standard_normal((n, d)).astype(np.float32)  # (n, d)


def _dataset(name: str, teacher: Teacher, X: np.ndarray, X_val: np.ndarray, rank: int,
             y_a_val: np.ndarray) -> Dataset:
    """Label ``X`` and ``X_val`` by ``teacher``; ``y_a_val`` (task A's labels of ``X_val``) measures the change."""
    y_val = teacher.labels(X_val)
    moved = 0.0 if rank == 0 else float(np.mean(y_val != y_a_val))
    return Dataset(X, teacher.labels(X), X_val, y_val, teacher.W2.shape[0], name, rank, moved)


def make_task(name: str, *, random_state: RandomState = 0, **kwargs: Any) -> Dataset:
    """One task of ``make_tasks(random_state=random_state, **kwargs)``, by name.

    Parameters
    ----------
    name : {"pretrain", "downstream", "contrast"}
    random_state : None, int or numpy.random.Generator, default 0
        The same int gives tasks of the same teacher.
    **kwargs
        Passed to ``make_tasks``.
    """
    check_choice(name, "name", TASK_NAMES)
    return getattr(make_tasks(random_state=random_state, **kwargs), name)


def pretrain_task(*, random_state: RandomState = 0, **kwargs: Any) -> Dataset:
    """Task A: ``make_task("pretrain", ...)``."""
    return make_task("pretrain", random_state=random_state, **kwargs)


def downstream_task(*, low_rank: bool = True, random_state: RandomState = 0,
                    **kwargs: Any) -> Dataset:
    """Task B (``low_rank=True``) or its full-rank contrast (``low_rank=False``)."""
    check_bool(low_rank, "low_rank")
    name = "downstream" if low_rank else "contrast"
    return make_task(name, random_state=random_state, **kwargs)
