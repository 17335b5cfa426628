"""Finite-difference gradient checks: see for yourself that every backward pass is right.

The numeric gradient of a scalar function ``f`` at ``x`` along coordinate ``i``
is the central difference, computed in float64::

    numeric[i] = (f(x + eps e_i) - f(x - eps e_i)) / (2 eps)

Its error is ``O(eps²)`` from truncation plus about ``ε |f| / eps`` from
rounding (``ε = 2.2e-16``), so ``eps = 1e-6`` gives roughly ten correct digits
for a function of size 1. :func:`check_gradients` compares it with the
gradient a backward pass computed (the *analytic* one) coordinate by
coordinate and fails loudly, naming the argument, the index and both values.
:func:`check_module_gradients` does the same for a whole layer or model of
:mod:`lowrank.nn`: its input and every trainable parameter.

Relative error, as used here::

    rel_err = |analytic - numeric| / max(|analytic|, |numeric|, atol / rtol)

and a coordinate passes when ``rel_err <= rtol``, that is when
``|analytic - numeric| <= max(rtol * max(|analytic|, |numeric|), atol)``. The
floor ``atol / rtol`` keeps coordinates whose true gradient is (nearly) zero
from being judged on the rounding noise of the central difference alone.

Example
-------
>>> import numpy as np
>>> from lowrank.nn import functional as F
>>> x = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
>>> y, cache = F.tanh(x)
>>> dy = np.ones_like(x)
>>> report = check_gradients(lambda x: F.tanh(x)[0].sum(), {"x": x},
...                          {"x": F.tanh_backward(dy, cache)})
>>> report.passed, report.arguments["x"].n_checked
(True, 6)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.utils.validation import RandomState, as_float_array, check_int, check_random_state, check_real

__all__ = [
    "ArgumentCheck",
    "GradcheckError",
    "GradcheckReport",
    "GradcheckRow",
    "check_gradients",
    "check_module_gradients",
    "format_table",
    "numerical_gradient",
    "run_all",
]

_EPS64 = float(np.finfo(np.float64).eps)


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with the finite differences.

    The message names the argument, the index, and the analytic and numeric
    values of the worst coordinate of each failing argument; ``.report`` holds
    the full :class:`GradcheckReport`.
    """

    def __init__(self, message: str, report: GradcheckReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ArgumentCheck:
    """The outcome of the check of one argument.

    Attributes
    ----------
    name : str
    max_abs_err, max_rel_err : float
        Over the checked coordinates (``inf`` if a value was not finite).
    n_checked, n_total : int
        Coordinates compared, out of the argument's size.
    worst_index : tuple of int or None
        The index with the largest relative error (None if nothing was checked).
    worst_analytic, worst_numeric : float
        Both gradients at ``worst_index``.
    n_failed : int
    """

    name: str
    max_abs_err: float
    max_rel_err: float
    n_checked: int
    n_total: int
    worst_index: tuple[int, ...] | None
    worst_analytic: float
    worst_numeric: float
    n_failed: int

    @property
    def passed(self) -> bool:
        """True when no checked coordinate failed."""
        return self.n_failed == 0


@dataclass(frozen=True)
class GradcheckReport:
    """Per argument, how well the analytic gradient matched; the tolerances used."""

    arguments: dict[str, ArgumentCheck]
    eps: float
    rtol: float
    atol: float

    @property
    def passed(self) -> bool:
        """True when every argument passed."""
        return all(a.passed for a in self.arguments.values())

    def __str__(self) -> str:
        lines = [f"gradient check (eps={self.eps:g}, rtol={self.rtol:g}, atol={self.atol:.3g})"]
        for a in self.arguments.values():
            lines.append(
                f"  {a.name}: max abs err {a.max_abs_err:.3g}, max rel err {a.max_rel_err:.3g}, "
                f"{a.n_checked}/{a.n_total} coordinates, {'pass' if a.passed else 'FAIL'}"
            )
        return "\n".join(lines)


def _scalar(value: Any) -> float:
    """The value of ``fn`` as a float; anything but one real number is refused."""
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "biuf":
        raise TypeError(f"fn must return a real scalar, got {type(value).__name__} of shape {arr.shape}")
    return float(arr.reshape(()))


def _check_inputs(fn: Any, inputs: Any) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping from argument names to arrays, got {type(inputs).__name__}")


def numerical_gradient(
    fn: Callable[..., Any],
    inputs: Mapping[str, Any],
    name: str,
    *,
    eps: float = 1e-6,
    indices: Any = None,
) -> np.ndarray:
    """Central-difference gradient of ``fn(**inputs)`` with respect to ``inputs[name]``, in float64.

    Parameters
    ----------
    fn : callable
        Called as ``fn(**inputs)``; must return a real scalar.
    inputs : mapping from str to array_like
        ``inputs[name]`` is copied to float64 and perturbed; the other
        entries are passed through unchanged.
    name : str
        The argument to differentiate.
    eps : float, default 1e-6
        Step. The difference is divided by the step actually taken,
        ``(x + eps) - (x - eps)`` in floating point.
    indices : array_like of int, optional
        Flat (C-order) indices of the coordinates to compute; all of them by default.

    Returns
    -------
    ndarray of float64
        Of ``inputs[name]``'s shape, or of shape ``(len(indices),)`` when
        ``indices`` is given.
    """
    _check_inputs(fn, inputs)
    if name not in inputs:
        raise ValueError(f"name must be one of the inputs {sorted(inputs)}, got {name!r}")
    eps = check_real(eps, "eps", 0.0, low_open=True)
    x = np.array(as_float_array(inputs[name], name, np.dtype(np.float64)), dtype=np.float64, order="C", copy=True)
    flat = x.reshape(-1)  # a view: x is a fresh contiguous copy
    if indices is None:
        idx = np.arange(flat.size)
    else:
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be a 1-D array of integers, got dtype {idx.dtype} shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= flat.size):
            raise ValueError(f"indices must be flat indices in [0, {flat.size - 1}], got {idx.min()}..{idx.max()}")
    args = dict(inputs)
    args[name] = x
    out = np.empty(idx.size)
    for k, i in enumerate(idx):
        orig = flat[i]
        flat[i] = orig + eps
        f_plus, up = _scalar(fn(**args)), flat[i]
        flat[i] = orig - eps
        f_minus, down = _scalar(fn(**args)), flat[i]
        flat[i] = orig
        out[k] = (f_plus - f_minus) / (up - down)
    return out.reshape(x.shape) if indices is None else out


def check_gradients(
    fn: Callable[..., Any],
    inputs: Mapping[str, Any],
    analytic: Mapping[str, Any],
    *,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float | None = None,
    max_coords: int | None = None,
    random_state: RandomState = 0,
) -> GradcheckReport:
    """Compare analytic gradients with central differences of ``fn``, argument by argument.

    Parameters
    ----------
    fn : callable
        ``fn(**inputs)`` returns a real scalar, e.g. ``sum(y * dy)`` for a
        layer's output ``y`` and a fixed random ``dy`` (whose gradient is
        what the backward pass computes from ``dy``).
    inputs : mapping from str to array_like
        The arguments of ``fn``. Those named in ``analytic`` are copied to
        float64 before ``fn`` sees them; the rest pass through unchanged.
    analytic : mapping from str to ndarray
        The gradient of ``fn`` with respect to each checked argument, of that
        argument's shape. Compute it in float64: a float32 gradient cannot
        meet ``rtol=1e-6``.
    eps : float, default 1e-6
        Central-difference step.
    rtol : float, default 1e-6
        Largest relative error accepted (see the module docstring).
    atol : float, optional
        Absolute floor of the comparison. By default ``100 * ε * max(1, |f(x)|) / eps``
        (``ε`` float64's machine epsilon; about ``2.2e-8 * max(1, |f(x)|)`` at
        the default ``eps``): the rounding error of the central difference
        itself is ``ε |f| / eps`` times a small factor. The 100 was calibrated
        on 12,000 random LoRA, activation and loss checks, where no correct
        coordinate needed more than 6.
    max_coords : int, optional
        Check at most this many coordinates per argument, drawn without
        replacement; all of them when None or when the argument is small enough.
    random_state : None, int or numpy.random.Generator, default 0
        Draws the sampled coordinates (seeded by default: reproducible).

    Returns
    -------
    GradcheckReport

    Raises
    ------
    GradcheckError
        If any checked coordinate fails (its ``.report`` holds the report).
    """
    _check_inputs(fn, inputs)
    if not isinstance(analytic, Mapping) or not analytic:
        raise TypeError("analytic must be a non-empty mapping from argument names to gradient arrays")
    eps = check_real(eps, "eps", 0.0, low_open=True)
    rtol = check_real(rtol, "rtol", 0.0, low_open=True)
    if max_coords is not None:
        max_coords = check_int(max_coords, "max_coords", low=1)
    rng = check_random_state(random_state)

    args = dict(inputs)
    grads: dict[str, np.ndarray] = {}
    for name, grad in analytic.items():
        if name not in inputs:
            raise ValueError(f"analytic names {name!r}, which is not one of the inputs {sorted(inputs)}")
        if grad is None:
            raise ValueError(f"analytic[{name!r}] is None: pass only the gradients that were computed")
        args[name] = np.array(as_float_array(inputs[name], name, np.dtype(np.float64)), dtype=np.float64, copy=True)
        grads[name] = np.asarray(as_float_array(grad, f"analytic[{name!r}]"), dtype=np.float64)
        if grads[name].shape != args[name].shape:
            raise ValueError(
                f"analytic[{name!r}] must have the shape of inputs[{name!r}], "
                f"{args[name].shape}, got {grads[name].shape}"
            )
    if atol is None:
        f0 = _scalar(fn(**args))
        atol = 100 * _EPS64 * max(1.0, abs(f0)) / eps  # see the docstring
    else:
        atol = check_real(atol, "atol", 0.0)

    results: dict[str, ArgumentCheck] = {}
    for name, grad in grads.items():
        size = grad.size
        if max_coords is None or size <= max_coords:
            idx = np.arange(size)
        else:
            idx = np.sort(rng.choice(size, size=max_coords, replace=False))
        numeric = numerical_gradient(fn, args, name, eps=eps, indices=idx)
        ana = grad.reshape(-1)[idx]
        with np.errstate(invalid="ignore"):
            abs_err = np.abs(ana - numeric)
            rel_err = abs_err / np.maximum(np.maximum(np.abs(ana), np.abs(numeric)), atol / rtol)
        rel_err = np.where(np.isfinite(rel_err), rel_err, np.inf)  # NaN or inf anywhere fails
        abs_err = np.where(np.isfinite(abs_err), abs_err, np.inf)
        failed = rel_err > rtol
        if idx.size:
            k = int(np.argmax(rel_err))
            worst = tuple(int(i) for i in np.unravel_index(idx[k], grad.shape))
            results[name] = ArgumentCheck(
                name, float(abs_err.max()), float(rel_err.max()), int(idx.size), size,
                worst, float(ana[k]), float(numeric[k]), int(failed.sum()),
            )  # fmt: skip
        else:
            results[name] = ArgumentCheck(name, 0.0, 0.0, 0, size, None, math.nan, math.nan, 0)

    report = GradcheckReport(arguments=results, eps=eps, rtol=rtol, atol=atol)
    failures = [a for a in results.values() if not a.passed]
    if failures:
        lines = [
            f"gradient of {a.name!r} is wrong at index {a.worst_index}: analytic {a.worst_analytic!r}, "
            f"numeric {a.worst_numeric!r} (abs err {abs(a.worst_analytic - a.worst_numeric):.3g}, "
            f"rel err {a.max_rel_err:.3g} > rtol {rtol:g}); "
            f"{a.n_failed} of {a.n_checked} checked coordinates fail"
            for a in failures
        ]
        raise GradcheckError("\n".join(lines), report)
    return report


# ---------------------------------------------------------------- a whole module


def check_module_gradients(
    module: Any,
    x: Any,
    dy: Any = None,
    *,
    loss: Callable[[np.ndarray], tuple[Any, Any]] | None = None,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float | None = None,
    max_coords: int | None = None,
    random_state: RandomState = 0,
) -> GradcheckReport:
    """Check a module's backward pass: ``dx`` and every trainable parameter's ``.grad``.

    Runs ``y = module(x)`` and ``dx = module.backward(dy)`` once (after
    ``module.zero_grad()``), then compares ``dx`` and the ``.grad`` of every
    trainable parameter with central differences of the scalar
    ``sum(module(x) * dy)`` (or of ``loss(module(x))[0]``) through
    :func:`check_gradients`. Frozen parameters are not checked (they get no
    gradient). Every generator of the module (its dropout masks,
    ``module.named_generators()``) is rewound before each forward pass, so a
    module in training mode draws the same masks every time and its gradient
    is checked with dropout active.

    Parameters
    ----------
    module : lowrank.nn.Module
        A layer or a model whose parameters are float64 (a float32 gradient
        cannot meet ``rtol=1e-6``).
    x : array_like of shape (..., in_features)
        The input, converted to float64.
    dy : array_like of module(x)'s shape, optional
        The upstream gradient. By default standard normal values drawn from
        ``random_state``.
    loss : callable, optional
        Instead of ``dy``: ``loss(y) -> (value, dvalue_dy)``, e.g.
        ``lambda y: F.cross_entropy(y, target)``; the checked scalar is then
        the loss and ``dy`` its gradient.
    eps, rtol, atol, max_coords
        As :func:`check_gradients`.
    random_state : None, int or numpy.random.Generator, default 0
        Draws ``dy`` (when not given) and the sampled coordinates.

    Returns
    -------
    GradcheckReport
        One argument ``"x"``, and one per trainable parameter under its dotted
        name (``"0.lora_A.weight"``).

    Raises
    ------
    GradcheckError
        If any checked coordinate fails: the message names the argument, the
        index, and the analytic and numeric values.
    TypeError
        If ``module`` is not a module, a parameter is not float64, or both
        ``dy`` and ``loss`` are given.
    ValueError
        If ``dy`` does not have the output's shape, or a trainable parameter is named ``"x"``.

    Notes
    -----
    The module is left with its parameters' original arrays, ``.grad`` from the
    one backward pass, its generators as one forward pass leaves them, and no
    forward cache (:meth:`lowrank.nn.Module.clear_cache`).

    Examples
    --------
    >>> import numpy as np
    >>> from lowrank import nn
    >>> layer = nn.LoRALinear(nn.Linear(4, 3, dtype=np.float64, random_state=0), r=2, random_state=0)
    >>> layer.B.data = np.ones((3, 2))  # B = 0 at init would make dA = 0
    >>> report = check_module_gradients(layer, np.linspace(-1.0, 1.0, 8).reshape(2, 4))
    >>> sorted(report.arguments), report.passed
    (['lora_A.weight', 'lora_B.weight', 'x'], True)
    """
    for method in ("named_parameters", "named_generators", "zero_grad", "backward", "clear_cache"):
        if not callable(getattr(module, method, None)):
            raise TypeError(f"module must be a lowrank.nn.Module, got {type(module).__name__} (no {method}())")
    if dy is not None and loss is not None:
        raise TypeError("give dy or loss, not both: loss(y) returns the dy it checks")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be callable, got {type(loss).__name__}")
    for name, p in module.named_parameters():
        if p.dtype != np.float64:
            raise TypeError(
                f"check_module_gradients needs float64 parameters, got {p.dtype} for {name!r}: "
                f"build the module with dtype=np.float64"
            )
    trainable = {name: p for name, p in module.named_parameters() if p.trainable}
    if "x" in trainable:
        raise ValueError("a trainable parameter is named 'x', the name of the module's input; rename it")
    rng = check_random_state(random_state)
    x = np.array(as_float_array(x, "x", np.dtype(np.float64)), dtype=np.float64, copy=True)
    generators = [g for _, g in module.named_generators()]
    start = [g.bit_generator.state for g in generators]

    def rewind() -> None:
        for g, state in zip(generators, start, strict=True):
            g.bit_generator.state = state

    originals = {name: p.data for name, p in trainable.items()}
    after_one_forward = start
    try:
        module.zero_grad()
        rewind()
        y = np.asarray(module(x))
        after_one_forward = [g.bit_generator.state for g in generators]
        if loss is not None:
            _, dy = loss(y)
        elif dy is None:
            dy = rng.standard_normal(y.shape)
        dy = np.asarray(as_float_array(dy, "dy", np.dtype(np.float64)))
        if dy.shape != y.shape:
            raise ValueError(f"dy must have the shape of module(x), {y.shape}, got {dy.shape}")
        dx = module.backward(dy)
        analytic = {"x": dx, **{name: p.grad for name, p in trainable.items()}}
        inputs = {"x": x, **{name: p.data.copy() for name, p in trainable.items()}}

        def f(x: np.ndarray, **params: np.ndarray) -> Any:  # dotted names arrive through **params
            for name, value in params.items():
                trainable[name].data = value
            rewind()
            out = module(x)
            return loss(out)[0] if loss is not None else np.sum(out * dy)

        return check_gradients(f, inputs, analytic, eps=eps, rtol=rtol, atol=atol, max_coords=max_coords,
                               random_state=rng)  # fmt: skip
    finally:
        for name, data in originals.items():
            trainable[name].data = data
        for g, state in zip(generators, after_one_forward, strict=True):
            g.bit_generator.state = state
        module.clear_cache()


# ---------------------------------------------------------------- every kernel and layer


@dataclass(frozen=True)
class GradcheckRow:
    """One line of :func:`run_all`'s table: one argument of one case."""

    case: str
    argument: str
    max_abs_err: float
    max_rel_err: float
    n_checked: int
    n_total: int
    passed: bool


def _report_rows(case: str, report: GradcheckReport) -> list[GradcheckRow]:
    return [
        GradcheckRow(case, a.name, a.max_abs_err, a.max_rel_err, a.n_checked, a.n_total, a.passed)
        for a in report.arguments.values()
    ]


def _rows(
    case: str, fn: Callable[..., Any], inputs: Mapping[str, Any], analytic: Mapping[str, Any]
) -> list[GradcheckRow]:
    try:
        report = check_gradients(fn, inputs, analytic)
    except GradcheckError as err:
        report = err.report
    return _report_rows(case, report)


def _away_from_zero(rng: np.random.Generator, shape: tuple[int, ...], gap: float = 0.1) -> np.ndarray:
    """Values in ±[gap, gap + 2): no central difference of relu steps across its kink."""
    return rng.choice([-1.0, 1.0], size=shape) * (gap + rng.uniform(0.0, 2.0, shape))


# The kernels' signatures as _kernel_rows tabulates them; each kernel's cache is of
# a class of its own, hence Any.
_Forward = Callable[[np.ndarray], tuple[np.ndarray, Any]]  # x -> (y, cache)
_Backward = Callable[[np.ndarray, Any], np.ndarray]  # (dy, cache) -> dx
_Loss = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]  # (pred, target) -> (loss, dpred)


def _kernel_rows(rng: np.random.Generator) -> list[GradcheckRow]:
    from lowrank.nn import functional as F

    rows: list[GradcheckRow] = []
    normal = rng.standard_normal

    # linear: trainable and frozen, with and without bias, leading batch dims
    for case, x_shape, with_bias, trainable in [
        ("linear", (5, 4), True, True),
        ("linear, no bias", (5, 4), False, True),
        ("linear, batch dims (2, 3)", (2, 3, 4), True, True),
        ("linear, frozen", (5, 4), True, False),
    ]:
        x, W, b = normal(x_shape), normal((3, 4)), normal(3) if with_bias else None
        dy = normal((*x_shape[:-1], 3))
        _, cache = F.linear(x, W, b)
        g = F.linear_backward(dy, cache, trainable=trainable)
        inputs: dict[str, Any] = {"x": x, "weight": W, "bias": b}
        analytic: dict[str, np.ndarray | None] = {"x": g.x}
        if trainable:
            analytic["weight"] = g.weight
            if with_bias:
                analytic["bias"] = g.bias

        def f_linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, dy: np.ndarray = dy) -> float:
            return np.sum(F.linear(x, weight, bias)[0] * dy)

        rows += _rows(case, f_linear, inputs, analytic)

    # lora_linear: bias or not, dropout or not, rsLoRA-like scaling, batch dims, trainable base
    for case, x_shape, r, scaling, with_bias, p, base_trainable in [
        ("lora_linear", (6, 5), 2, 2.0, True, 0.0, False),
        ("lora_linear, no bias", (6, 5), 2, 2.0, False, 0.0, False),
        ("lora_linear, dropout mask", (6, 5), 2, 2.0, True, 0.3, False),
        ("lora_linear, rsLoRA scaling 8/sqrt(3)", (6, 5), 3, 8 / math.sqrt(3), True, 0.0, False),
        ("lora_linear, batch dims (2, 3)", (2, 3, 5), 2, 0.5, True, 0.2, False),
        ("lora_linear, large batch (folded W)", (9, 5), 2, 2.0, True, 0.0, False),
        ("lora_linear, trainable base", (6, 5), 2, 2.0, True, 0.2, True),
    ]:
        x, W, b = normal(x_shape), normal((4, 5)), normal(4) if with_bias else None
        A, B = normal((r, 5)), normal((4, r))
        mask = F.dropout_mask(x_shape, p, random_state=rng) if p > 0 else None
        dy = normal((*x_shape[:-1], 4))
        _, lora_cache = F.lora_linear(x, W, b, A, B, scaling, mask)
        lora_g = F.lora_linear_backward(dy, lora_cache, base_trainable=base_trainable)
        inputs = {"x": x, "weight": W, "bias": b, "A": A, "B": B}
        analytic = {"x": lora_g.x, "A": lora_g.A, "B": lora_g.B}
        if base_trainable:
            analytic["weight"] = lora_g.weight
            if with_bias:
                analytic["bias"] = lora_g.bias

        def f_lora(
            x: np.ndarray,
            weight: np.ndarray,
            bias: np.ndarray | None,
            A: np.ndarray,
            B: np.ndarray,
            dy: np.ndarray = dy,
            scaling: float = scaling,
            mask: np.ndarray | None = mask,
        ) -> float:
            return np.sum(F.lora_linear(x, weight, bias, A, B, scaling, mask)[0] * dy)

        rows += _rows(case, f_lora, inputs, analytic)

    # activations (relu's inputs kept away from its kink), gelu in both forms, dropout
    elementwise: list[tuple[str, _Forward, _Backward, np.ndarray]] = [
        ("relu", F.relu, F.relu_backward, _away_from_zero(rng, (3, 4))),
        ("tanh", F.tanh, F.tanh_backward, normal((3, 4))),
        ("sigmoid", F.sigmoid, F.sigmoid_backward, 3 * normal((3, 4))),
        ("gelu (erf)", F.gelu, F.gelu_backward, 2 * normal((3, 4))),
        ("gelu (tanh)", lambda x: F.gelu(x, "tanh"), F.gelu_backward, 2 * normal((3, 4))),
    ]
    mask = F.dropout_mask((3, 4), 0.5, random_state=rng)
    elementwise.append(("dropout", lambda x: F.dropout(x, mask), F.dropout_backward, normal((3, 4))))
    for case, forward, backward, x in elementwise:
        dy = normal(x.shape)
        _, cache = forward(x)

        def f_elementwise(x: np.ndarray, forward: _Forward = forward, dy: np.ndarray = dy) -> float:
            return np.sum(forward(x)[0] * dy)

        rows += _rows(case, f_elementwise, {"x": x}, {"x": backward(dy, cache)})

    # losses: the loss is the scalar, the returned gradient the analytic one
    target_class = rng.integers(0, 5, size=(2, 3))
    losses: list[tuple[str, _Loss, np.ndarray, np.ndarray]] = [
        ("mse_loss", F.mse_loss, normal((4, 3)), normal((4, 3))),
        ("cross_entropy, batch dims (2, 3)", F.cross_entropy, 3 * normal((2, 3, 5)), target_class),
        ("binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits,
         3 * normal((4, 3)), rng.uniform(0.0, 1.0, (4, 3))),
    ]  # fmt: skip
    for case, loss_fn, pred, target in losses:
        _, grad = loss_fn(pred, target)

        def f_loss(pred: np.ndarray, loss_fn: _Loss = loss_fn, target: np.ndarray = target) -> float:
            return loss_fn(pred, target)[0]

        rows += _rows(case, f_loss, {"pred": pred}, {"pred": grad})
    rows += _attention_kernel_rows(rng)
    return rows


def _attention_kernel_rows(rng: np.random.Generator) -> list[GradcheckRow]:
    """conv1d, layer_norm, embedding, softmax, attention, gelu_tanh, cross_entropy with ignore_index."""
    from lowrank.nn import functional as F

    rows: list[GradcheckRow] = []
    normal = rng.standard_normal

    # conv1d: transformers' layout, weight (in, out); trainable and frozen
    for case, x_shape, trainable in [("conv1d", (5, 4), True), ("conv1d, frozen, batch dims (2, 3)", (2, 3, 4), False)]:
        x, W, b = normal(x_shape), normal((4, 3)), normal(3)
        dy = normal((*x_shape[:-1], 3))
        conv_g = F.conv1d_backward(dy, F.conv1d(x, W, b)[1], trainable=trainable)
        analytic: dict[str, np.ndarray | None] = {"x": conv_g.x}
        if trainable:
            analytic |= {"weight": conv_g.weight, "bias": conv_g.bias}

        def f_conv1d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, dy: np.ndarray = dy) -> float:
            return np.sum(F.conv1d(x, weight, bias)[0] * dy)

        rows += _rows(case, f_conv1d, {"x": x, "weight": W, "bias": b}, analytic)

    # layer_norm: affine or not, batch dims
    for case, x_shape, affine in [("layer_norm", (4, 6), True), ("layer_norm, no affine, batch dims (2, 3)",
                                                                  (2, 3, 5), False)]:
        d = x_shape[-1]
        x = 2 * normal(x_shape) + 1
        weight, bias = (normal(d), normal(d)) if affine else (None, None)
        dy = normal(x_shape)
        ln_g = F.layer_norm_backward(dy, F.layer_norm(x, weight, bias)[1])
        inputs: dict[str, Any] = {"x": x}
        analytic = {"x": ln_g.x}
        if affine:
            inputs |= {"weight": weight, "bias": bias}
            analytic |= {"weight": ln_g.weight, "bias": ln_g.bias}

        def f_layer_norm(
            x: np.ndarray, weight: np.ndarray | None = None, bias: np.ndarray | None = None, dy: np.ndarray = dy
        ) -> float:
            return np.sum(F.layer_norm(x, weight, bias)[0] * dy)

        rows += _rows(case, f_layer_norm, inputs, analytic)

    # embedding: repeated indices, the gradient of the table only
    indices = np.array([[1, 3, 1], [0, 3, 3]])
    table = normal((5, 4))
    dy = normal((2, 3, 4))
    demb = F.embedding_backward(dy, F.embedding(indices, table)[1])

    def f_embedding(weight: np.ndarray, dy: np.ndarray = dy) -> float:
        return np.sum(F.embedding(indices, weight)[0] * dy)

    rows += _rows("embedding, repeated indices", f_embedding, {"weight": table}, {"weight": demb})

    # softmax over either axis, and with a masked (-inf) entry
    for case, axis in [("softmax", -1), ("softmax, axis 0", 0)]:
        x = 2 * normal((3, 4))
        dy = normal((3, 4))
        dsoft = F.softmax_backward(dy, F.softmax(x, axis)[1])

        def f_softmax(x: np.ndarray, dy: np.ndarray = dy, axis: int = axis) -> float:
            return np.sum(F.softmax(x, axis)[0] * dy)

        rows += _rows(case, f_softmax, {"x": x}, {"x": dsoft})

    # attention: plain, causal, boolean mask with a query that sees nothing plus dropout,
    # additive mask with T != S and a given scale
    t, s, d, dv = 3, 4, 2, 3
    keep = np.ones((t, s), dtype=bool)
    keep[0] = False  # a query allowed to see no key: output 0, gradients 0
    keep[1, 2] = False
    for case, q_shape, s_len, attn_mask, is_causal, p, scale in [
        ("scaled_dot_product_attention", (2, t, d), t, None, False, 0.0, None),
        ("scaled_dot_product_attention, causal, heads (2, 2)", (2, 2, t, d), t, None, True, 0.0, None),
        ("scaled_dot_product_attention, bool mask, dropout", (2, t, d), s, keep, False, 0.4, None),
        ("scaled_dot_product_attention, additive mask, scale 0.7", (2, t, d), s, normal((t, s)), False, 0.0, 0.7),
    ]:
        batch = q_shape[:-2]
        q, k, v = normal(q_shape), normal((*batch, s_len, d)), normal((*batch, s_len, dv))
        scores_shape = (*batch, t, s_len)
        dmask = F.dropout_mask(scores_shape, p, random_state=rng) if p > 0 else None
        dy = normal((*batch, t, dv))
        _, att_cache = F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal, dmask, scale)
        att_g = F.scaled_dot_product_attention_backward(dy, att_cache)

        def f_attention(
            q: np.ndarray,
            k: np.ndarray,
            v: np.ndarray,
            dy: np.ndarray = dy,
            attn_mask: np.ndarray | None = attn_mask,
            is_causal: bool = is_causal,
            dmask: np.ndarray | None = dmask,
            scale: float | None = scale,
        ) -> float:
            return np.sum(F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal, dmask, scale)[0] * dy)

        rows += _rows(case, f_attention, {"q": q, "k": k, "v": v}, {"q": att_g.q, "k": att_g.k, "v": att_g.v})

    # gelu_tanh, GPT-2's gelu_new
    x = 2 * normal((3, 4))
    dy = normal((3, 4))
    dgelu = F.gelu_tanh_backward(dy, F.gelu_tanh(x)[1])

    def f_gelu_tanh(x: np.ndarray, dy: np.ndarray = dy) -> float:
        return np.sum(F.gelu_tanh(x)[0] * dy)

    rows += _rows("gelu_tanh (gelu_new)", f_gelu_tanh, {"x": x}, {"x": dgelu})

    # cross_entropy skipping the targets equal to ignore_index
    logits = 3 * normal((2, 4, 5))
    target = rng.integers(0, 5, size=(2, 4))
    target[0, 1] = target[1, 3] = -100
    _, dlogits = F.cross_entropy(logits, target)

    def f_ce(pred: np.ndarray) -> float:
        return F.cross_entropy(pred, target)[0]

    rows += _rows("cross_entropy, ignore_index -100", f_ce, {"pred": logits}, {"pred": dlogits})
    return rows


def _module_rows(rng: np.random.Generator) -> list[GradcheckRow]:
    """Layers: forward, then ``backward(dy)``, read from ``dx`` and ``Parameter.grad``."""
    from lowrank import nn

    def check_module(case: str, module: Any, x: np.ndarray) -> list[GradcheckRow]:
        try:
            report = check_module_gradients(module, x, random_state=rng)
        except GradcheckError as err:
            report = err.report
        return _report_rows(case, report)

    def lora(in_features: int, out_features: int, **kwargs: Any) -> Any:
        layer = nn.LoRALinear(
            nn.Linear(in_features, out_features, dtype=np.float64, random_state=rng),
            random_state=rng, **kwargs,
        )  # fmt: skip
        layer.B.data = rng.standard_normal(layer.B.shape)  # B = 0 at init would make dA = 0
        return layer

    normal = rng.standard_normal
    rows: list[GradcheckRow] = []
    rows += check_module("Linear", nn.Linear(4, 3, dtype=np.float64, random_state=rng), normal((5, 4)))
    rows += check_module(
        "Linear, no bias, batch dims (2, 3)",
        nn.Linear(4, 3, bias=False, dtype=np.float64, random_state=rng), normal((2, 3, 4)),
    )  # fmt: skip
    rows += check_module("LoRALinear r=2", lora(5, 4, r=2, alpha=4), normal((6, 5)))
    rows += check_module(
        "LoRALinear rsLoRA r=3, batch dims (2, 3)",
        lora(5, 4, r=3, alpha=4, use_rslora=True), normal((2, 3, 5)),
    )  # fmt: skip
    rows += check_module("ReLU", nn.ReLU(), _away_from_zero(rng, (3, 4)))
    rows += check_module("Tanh", nn.Tanh(), normal((3, 4)))
    rows += check_module("Sigmoid", nn.Sigmoid(), 3 * normal((3, 4)))
    rows += check_module("GELU", nn.GELU(), 2 * normal((3, 4)))
    rows += check_module("GELU tanh", nn.GELU("tanh"), 2 * normal((3, 4)))
    model = nn.Sequential(
        nn.Linear(5, 6, dtype=np.float64, random_state=rng),
        nn.Tanh(),
        lora(6, 4, r=2, alpha=4),
        nn.GELU(),
        nn.Linear(4, 3, dtype=np.float64, random_state=rng),
    )
    rows += check_module("Sequential(Linear, Tanh, LoRALinear, GELU, Linear)", model, normal((2, 3, 5)))
    conv = nn.Conv1D(4, 3, dtype=np.float64, random_state=rng)
    conv.load_state_dict({"weight": conv.weight.data, "bias": normal(3)})  # the bias is zeros at init
    rows += check_module("Conv1D, batch dims (2, 3)", conv, normal((2, 3, 4)))
    norm = nn.LayerNorm(5, dtype=np.float64)
    norm.load_state_dict({"weight": normal(5), "bias": normal(5)})  # ones and zeros at init
    rows += check_module("LayerNorm, batch dims (2, 3)", norm, 2 * normal((2, 3, 5)) + 1)
    rows += _embedding_module_rows(nn.Embedding(6, 3, dtype=np.float64, random_state=rng), rng)
    return rows


def _embedding_module_rows(layer: Any, rng: np.random.Generator) -> list[GradcheckRow]:
    """``nn.Embedding``: its input is integers, so only ``weight.grad`` is checked (repeated indices)."""
    indices = np.array([[0, 5, 0, 2], [5, 5, 1, 0]])
    layer.zero_grad()
    dy = rng.standard_normal((*indices.shape, layer.embedding_dim))
    layer(indices)
    layer.backward(dy)
    original = layer.weight.data

    def f(weight: np.ndarray) -> float:
        layer.weight.data = weight
        return np.sum(layer(indices) * dy)

    try:
        return _rows("Embedding, repeated indices", f, {"weight": original.copy()}, {"weight": layer.weight.grad})
    finally:
        layer.weight.data = original
        layer.clear_cache()


def run_all(random_state: RandomState = 0) -> list[GradcheckRow]:
    """Check every kernel of :mod:`lowrank.nn.functional` and every layer of :mod:`lowrank.nn`.

    Small float64 inputs, every coordinate checked with :func:`check_gradients`'
    defaults. Kernel cases: linear (with and without bias, trainable and
    frozen, batch dimensions), lora_linear (with and without bias and
    dropout mask, rsLoRA-like scaling, batch dimensions, the folded-weight
    path of a large batch, trainable base), relu, tanh, sigmoid, gelu in both
    forms, dropout, and the three losses; conv1d, layer_norm, embedding with
    repeated indices, softmax, scaled_dot_product_attention (causal, boolean
    and additive masks, a dropout mask, a given scale), gelu_tanh and
    cross_entropy with ignored targets. Layer cases: Linear, LoRALinear,
    each activation module, a Sequential holding a LoRALinear, Conv1D,
    LayerNorm and Embedding (its weight); and LoRA's variants: lora_embedding
    and lora_merged_linear (kernels), LoRALinear on a Conv1D,
    LoRAMergedLinear and LoRAEmbedding (layers). The scalar
    checked is ``sum(y * dy)`` for a fixed random ``dy``, or the loss.

    Parameters
    ----------
    random_state : None, int or numpy.random.Generator, default 0

    Returns
    -------
    list of GradcheckRow
        One row per checked argument of each case (see :func:`format_table`).
    """
    rng = check_random_state(random_state)
    return _kernel_rows(rng) + _module_rows(rng) + _lora_variant_rows(rng)


def _lora_variant_rows(rng: np.random.Generator) -> list[GradcheckRow]:
    """LoRA on an Embedding and on a fused projection (kernels and layers), and LoRA on a Conv1D (layer)."""
    from lowrank import nn
    from lowrank.nn import functional as F

    normal = rng.standard_normal
    rows: list[GradcheckRow] = []
    indices = np.array([[0, 5, 0, 2], [5, 5, 1, 0]])  # repeated: their gradients must sum
    table, A, B, dy = normal((6, 3)), normal((2, 6)), normal((3, 2)), normal((2, 4, 3))
    _, emb_cache = F.lora_embedding(indices, table, A, B, 1.5)
    eg = F.lora_embedding_backward(dy, emb_cache, base_trainable=True)

    def f_lora_embedding(weight: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
        return float(np.sum(F.lora_embedding(indices, weight, A, B, 1.5)[0] * dy))

    rows += _rows("lora_embedding, repeated indices", f_lora_embedding, {"weight": table, "A": A, "B": B},
                  {"weight": eg.weight, "A": eg.A, "B": eg.B})  # fmt: skip

    enable = (True, False, True)  # W_q and W_v of a fused qkv projection
    x, W, b = normal((2, 3, 4)), normal((6, 4)), normal(6)
    A2, B2, dy2 = normal((4, 4)), normal((4, 2)), normal((2, 3, 6))
    mask = rng.choice([0.0, 2.0], size=x.shape)  # p = 0.5
    _, merged_cache = F.lora_merged_linear(x, W, b, A2, B2, 2.0, enable, mask)
    mg = F.lora_merged_linear_backward(dy2, merged_cache, base_trainable=True)

    def f_merged(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
        return float(np.sum(F.lora_merged_linear(x, weight, bias, A, B, 2.0, enable, mask)[0] * dy2))

    rows += _rows("lora_merged_linear [q, v], dropout mask", f_merged,
                  {"x": x, "weight": W, "bias": b, "A": A2, "B": B2},
                  {"x": mg.x, "weight": mg.weight, "bias": mg.bias, "A": mg.A, "B": mg.B})  # fmt: skip

    def check_module(case: str, module: Any, x: np.ndarray) -> list[GradcheckRow]:
        module.B.data = normal(module.B.shape)  # B = 0 at init would make dA = 0
        try:
            report = check_module_gradients(module, x, random_state=rng)
        except GradcheckError as err:
            report = err.report
        return _report_rows(case, report)

    conv = nn.Conv1D(5, 4, dtype=np.float64, random_state=rng)
    rows += check_module("LoRALinear on Conv1D (fan_in_fan_out)",
                         nn.LoRALinear(conv, r=2, alpha=4, random_state=rng), normal((2, 3, 5)))  # fmt: skip
    fused = nn.Conv1D(4, 6, dtype=np.float64, random_state=rng)
    rows += check_module("LoRAMergedLinear [q, v] on Conv1D, dropout",
                         nn.LoRAMergedLinear(fused, r=2, alpha=4, dropout=0.5, enable_lora=enable, random_state=rng),
                         normal((2, 3, 4)))  # fmt: skip

    layer = nn.LoRAEmbedding(nn.Embedding(6, 3, dtype=np.float64, random_state=rng), r=2, alpha=3, random_state=rng)
    layer.A.data = normal(layer.A.shape)  # A = 0 at init would make dB = 0
    layer(indices)
    layer.backward(dy)
    originals = layer.A.data, layer.B.data

    def f_layer(A: np.ndarray, B: np.ndarray) -> float:
        layer.A.data, layer.B.data = A, B
        return float(np.sum(layer(indices) * dy))

    try:
        rows += _rows("LoRAEmbedding, repeated indices", f_layer,
                      {"A": originals[0].copy(), "B": originals[1].copy()},
                      {"A": layer.A.grad, "B": layer.B.grad})  # fmt: skip
    finally:
        layer.A.data, layer.B.data = originals
        layer.clear_cache()
    return rows


def format_table(rows: list[GradcheckRow]) -> str:
    """The rows of :func:`run_all` as a plain-text table, with a summary line."""
    header = ("case", "argument", "max abs err", "max rel err", "checked", "result")
    body = [
        (r.case, r.argument, f"{r.max_abs_err:.2e}", f"{r.max_rel_err:.2e}",
         f"{r.n_checked}/{r.n_total}", "pass" if r.passed else "FAIL")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    align = ["<", "<", ">", ">", ">", "<"]

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line, align, widths, strict=True)).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(line) for line in body]
    n_failed = sum(not r.passed for r in rows)
    cases = len({r.case for r in rows})
    verdict = "all passed" if n_failed == 0 else f"{n_failed} FAILED"
    lines.append(f"{len(rows)} gradients in {cases} cases checked by central differences: {verdict}")
    return "\n".join(lines)
