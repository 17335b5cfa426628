"""Optimizers, learning-rate schedules and gradient clipping, by the published rules.

Every update rule below is the one PyTorch documents for ``torch.optim.SGD``,
``torch.optim.Adam`` and ``torch.optim.AdamW`` (the pseudo-code on each class's
page), written out in NumPy, so a run here and a run there take the same
steps *to rounding*, not bit for bit: PyTorch evaluates the same formulas in
another order (Adam's moments with ``lerp_``, its step with ``addcdiv_``,
fused multi-tensor kernels), so each step may differ in the last bits, and
the crosschecks in ``tests/nn/test_optim.py`` compare with a tolerance
(1e-12 relative in float64, 1e-6 in float32). Notation: ``θ`` a parameter, ``g`` its gradient, ``γ`` the learning
rate ``lr``, ``λ`` the weight decay, ``t`` the parameter's own step count.

What an optimizer touches
    Parameters are duck-typed: anything with ``.data`` (ndarray), ``.grad``
    (ndarray or None) and ``.trainable`` (bool), i.e. ``lowrank.nn.Parameter``.
    ``step()`` updates a parameter only if it is trainable *and* has a
    gradient; a frozen parameter is never written, not even by weight decay,
    and a parameter whose ``.grad`` is None is skipped entirely (its state and
    its own step count do not advance, as in PyTorch).

dtypes
    ``.data`` is updated in place, in its own dtype; the gradient is cast to
    that dtype first, and every state buffer (momentum, Adam's moments) has
    the parameter's dtype too. Scalars such as Adam's bias corrections are
    computed as Python floats (float64), as PyTorch does.

Checkpoints
    ``state_dict()`` returns a flat ``dict[str, ndarray]`` that ``np.savez``
    writes and ``np.load(..., allow_pickle=False)`` reads back: 0-d float64
    arrays for hyper-parameters (``"lr"``, ``"betas"`` is stored as
    ``"beta1"``/``"beta2"``), 0-d int64 for step counts (``"step"``, the
    number of ``step()`` calls, and ``"state.<name>.step"``), a 0-d bool for
    ``"nesterov"``, and the buffers as ``"state.<name>.<buffer>"`` in the
    parameter's dtype, e.g. ``"state.0.lora_A.weight.exp_avg"``. A buffer's
    name never contains a dot, so the parameter name is everything between
    ``"state."`` and the last dot. Loading restores all of it, hyper-parameters
    included, so a resumed run takes bit-identical steps.

Schedules
    A schedule owns the *base* learning rate and sets ``optimizer.lr`` from
    the pure function ``lr_at(t)``, where ``t`` counts the updates already
    taken: construct it (``optimizer.lr = lr_at(0)``), then after each
    ``optimizer.step()`` call ``schedule.step()`` (``optimizer.lr =
    lr_at(t + 1)``), as with ``torch.optim.lr_scheduler``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lowrank.utils.validation import check_bool, check_int, check_real

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "ConstantLR",
    "CosineAnnealing",
    "LRSchedule",
    "LinearWarmup",
    "NonFiniteNormError",
    "Optimizer",
    "WarmupCosine",
    "clip_grad_norm_",
    "clip_grads_",
]


# ---------------------------------------------------------------- parameters


def _is_parameter(obj: Any) -> bool:
    return all(hasattr(obj, attr) for attr in ("data", "grad", "trainable"))


def _named_parameters(params: Any, name: str = "params") -> list[tuple[str, Any]]:
    """Turn ``params`` into a list of ``(name, Parameter)`` pairs.

    ``params`` is an iterable of Parameters (named ``"0"``, ``"1"``, … by
    position, like PyTorch's integer ids), an iterable of ``(name,
    Parameter)`` pairs such as ``model.named_parameters()``, or a mapping
    from name to Parameter.
    """
    if _is_parameter(params) or isinstance(params, (str, bytes, np.ndarray)):
        raise TypeError(
            f"{name} must be an iterable of Parameters or of (name, Parameter) pairs, "
            f"got a single {type(params).__name__}"
        )
    if isinstance(params, Mapping):
        params = params.items()
    if not isinstance(params, Iterable):
        raise TypeError(
            f"{name} must be an iterable of Parameters or of (name, Parameter) pairs, "
            f"got {type(params).__name__} {params!r}"
        )
    items = list(params)
    if not items:
        raise ValueError(f"{name} must hold at least one parameter, got an empty {name}")

    named = [isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
             for item in items]
    if any(named) and not all(named):
        raise TypeError(f"{name} must be all Parameters or all (name, Parameter) pairs, not a mix")
    pairs = items if all(named) else [(str(i), p) for i, p in enumerate(items)]

    seen_names: set[str] = set()
    seen_ids: set[int] = set()
    for key, p in pairs:
        if not _is_parameter(p):
            raise TypeError(
                f"{name} must hold Parameters (objects with .data, .grad and .trainable), "
                f"got {type(p).__name__} for {key!r}"
            )
        if key in seen_names:
            raise ValueError(f"{name} must have unique names, got {key!r} twice")
        if id(p) in seen_ids:
            raise ValueError(
                f"{name} must not hold the same Parameter twice, got it again as {key!r}"
            )
        seen_names.add(key)
        seen_ids.add(id(p))
    return pairs


def _scalar(state_dict: Mapping[str, Any], key: str) -> Any:
    """``state_dict[key]`` as a Python scalar; it must be a single number."""
    value = np.asarray(state_dict[key])
    if value.size != 1 or value.dtype.kind not in "biuf":
        raise ValueError(f"state_dict[{key!r}] must be a single number, "
                         f"got an array of shape {value.shape} and dtype {value.dtype}")
    return value.item()


def _gradient(key: str, p: Any) -> np.ndarray | None:
    """The gradient to apply to ``p`` in ``p``'s dtype, or None if ``p`` is skipped."""
    if not p.trainable or p.grad is None:
        return None
    g = np.asarray(p.grad, dtype=p.data.dtype)  # no copy when the dtypes agree
    if g.shape != p.data.shape:
        raise ValueError(
            f"the gradient of {key!r} must have its parameter's shape {p.data.shape}, got {g.shape}"
        )
    return g


# ---------------------------------------------------------------- optimizers


class Optimizer:
    """Shared machinery: the parameter list, ``lr``, ``zero_grad``, state dicts.

    Subclasses declare their hyper-parameters in ``_check_hyper`` and their
    update in ``_update``; see the module docstring for what is updated and
    how state is stored.

    Attributes
    ----------
    named_params : list of (str, Parameter)
        The parameters the optimizer holds, by name (``"0"``, ``"1"``, … when
        given unnamed), in order. ``fit`` compares them with the model's
        trainable parameters; build the optimizer after ``inject_lora`` and
        any freezing so that it holds them.
    hyper : dict
        The checked hyper-parameters, ``lr`` among them.
    step_count : int
        The number of ``step()`` calls.
    """

    _buffers: tuple[str, ...] = ()  # names of the per-parameter state arrays
    _counts_steps: bool = False  # whether each parameter keeps its own step count

    def __init__(self, params: Any, **hyper: Any) -> None:
        self.named_params = _named_parameters(params)
        self.hyper = self._check_hyper(**hyper)
        self.state: dict[str, dict[str, Any]] = {key: {} for key, _ in self.named_params}
        self.step_count = 0  # number of step() calls

    # -- hyper-parameters

    @staticmethod
    def _check_hyper(**hyper: Any) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        """The learning rate of the next step; schedules set it."""
        return self.hyper["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.hyper["lr"] = check_real(value, "lr", 0.0)

    @property
    def params(self) -> list[Any]:
        """The Parameters, in order."""
        return [p for _, p in self.named_params]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({len(self.named_params)} parameters, {args})"

    # -- the step

    def zero_grad(self) -> None:
        """Clear every parameter's gradient (set ``.grad`` to None, as PyTorch does)."""
        for _, p in self.named_params:
            p.grad = None

    def step(self) -> None:
        """Update every trainable parameter that has a gradient, in place.

        All gradients are checked (shape) before any parameter changes.
        """
        work = [(key, p, _gradient(key, p)) for key, p in self.named_params]
        for key, p, g in work:
            if g is None:
                continue
            state = self.state[key]
            if self._counts_steps:
                state["step"] = state.get("step", 0) + 1
            self._update(p, g, state)
        self.step_count += 1

    def _update(self, p: Any, g: np.ndarray, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # -- checkpoints

    def state_dict(self) -> dict[str, np.ndarray]:
        """A flat, pickle-free snapshot: hyper-parameters, step counts and buffers (copies)."""
        out: dict[str, np.ndarray] = {"step": np.asarray(self.step_count, dtype=np.int64)}
        for k, v in self.hyper.items():
            out[k] = np.asarray(v, dtype=np.bool_ if isinstance(v, bool) else np.float64)
        for key, state in self.state.items():
            for buf, value in state.items():
                out[f"state.{key}.{buf}"] = np.array(
                    value, dtype=np.int64 if buf == "step" else value.dtype
                )
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()`` snapshot; all of it is checked before anything changes.

        Raises ValueError on a missing or unknown key, an unknown parameter
        name, or a buffer whose shape differs from its parameter's; TypeError
        on a buffer whose dtype differs from its parameter's (as
        ``Module.load_state_dict``: a dtype mismatch is never silently cast).
        """
        expected = {"step", *self.hyper}
        missing = sorted(expected - set(state_dict))
        if missing:
            raise ValueError(f"state_dict is missing the keys {missing} of {type(self).__name__}")
        hyper = {}
        for k, current in self.hyper.items():
            value = _scalar(state_dict, k)
            hyper[k] = bool(value) if isinstance(current, bool) else value
        hyper = self._check_hyper(**hyper)
        step_count = check_int(_scalar(state_dict, "step"), "state_dict['step']", 0)

        new_state = self._checked_buffers(state_dict, expected)
        self.hyper = hyper
        self.step_count = step_count
        self.state = new_state

    def _checked_buffers(self, state_dict: Mapping[str, Any], skip: set[str]) -> dict[str, dict[str, Any]]:
        """The per-parameter state of ``state_dict`` (keys ``"state.<name>.<buffer>"``), checked and copied."""
        params = dict(self.named_params)
        new_state: dict[str, dict[str, Any]] = {key: {} for key in params}
        allowed = ("step", *self._buffers) if self._counts_steps else self._buffers
        for full_key, value in state_dict.items():
            if full_key in skip:
                continue
            if not full_key.startswith("state.") or full_key.count(".") < 2:
                raise ValueError(
                    f"state_dict has an unknown key {full_key!r} for {type(self).__name__}"
                )
            key, buf = full_key[len("state."):].rsplit(".", 1)
            if key not in params:
                raise ValueError(
                    f"state_dict holds state for {key!r}, which is not one of the parameters"
                )
            if buf not in allowed:
                raise ValueError(f"state_dict has an unknown buffer {buf!r} for {key!r}; "
                                 f"{type(self).__name__} keeps {list(allowed)}")
            if buf == "step":
                step = _scalar(state_dict, full_key)
                new_state[key]["step"] = check_int(step, f"state_dict[{full_key!r}]", 1)
                continue
            value = np.asarray(value)
            data = params[key].data
            if value.shape != data.shape:
                raise ValueError(f"state_dict[{full_key!r}] must have its parameter's shape "
                                 f"{data.shape}, got shape {value.shape}")
            if value.dtype != data.dtype:
                raise TypeError(f"state_dict[{full_key!r}] must have its parameter's dtype "
                                f"{data.dtype}, got dtype {value.dtype}")
            new_state[key][buf] = value.copy()
        return new_state


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov and L2 weight decay (PyTorch's rule).

    For each trainable parameter with a gradient::

        g ← g + λ θ                               if weight_decay λ ≠ 0
        b ← g (first step);  b ← μ b + (1 − τ) g  if momentum μ ≠ 0 (dampening τ)
        g ← g + μ b (nesterov)  or  g ← b
        θ ← θ − γ g

    Parameters
    ----------
    params : iterable of Parameter, or of (name, Parameter) pairs
        E.g. ``model.named_parameters()``; names key the checkpoint state.
    lr : float
        The learning rate γ, >= 0.
    momentum : float, default 0.0
        μ >= 0. Its buffer ``"momentum_buffer"`` exists only when μ ≠ 0.
    dampening : float, default 0.0
        τ in [0, 1].
    nesterov : bool, default False
        Requires momentum > 0 and dampening == 0.
    weight_decay : float, default 0.0
        λ >= 0, added to the gradient (L2 regularization).

    Examples
    --------
    >>> import numpy as np
    >>> from lowrank.nn import Parameter
    >>> p = Parameter(np.array([1.0]))
    >>> opt = SGD([p], lr=0.1, momentum=0.9)
    >>> for _ in range(2):
    ...     p.grad = np.array([0.5])
    ...     opt.step()
    >>> p.data  # 1 − 0.1·0.5, then − 0.1·(0.9·0.5 + 0.5)
    array([0.855])
    """

    _buffers = ("momentum_buffer",)

    def __init__(self, params: Any, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, weight_decay=weight_decay)

    @staticmethod  # named arguments, where the base takes any: each optimizer has its own
    def _check_hyper(  # type: ignore[override]
        lr: Any, momentum: Any, dampening: Any, nesterov: Any, weight_decay: Any
    ) -> dict[str, Any]:
        hyper = {
            "lr": check_real(lr, "lr", 0.0),
            "momentum": check_real(momentum, "momentum", 0.0),
            "dampening": check_real(dampening, "dampening", 0.0, 1.0),
            "nesterov": nesterov,
            "weight_decay": check_real(weight_decay, "weight_decay", 0.0),
        }
        hyper["nesterov"] = check_bool(nesterov, "nesterov")
        if nesterov and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
            raise ValueError(
                "nesterov=True requires momentum > 0 and dampening == 0, "
                f"got momentum={hyper['momentum']!r} and dampening={hyper['dampening']!r}"
            )
        return hyper

    def _update(self, p: Any, g: np.ndarray, state: dict[str, Any]) -> None:
        lr, mu, tau, wd = (self.hyper[k] for k in ("lr", "momentum", "dampening", "weight_decay"))
        if wd != 0:
            g = g + wd * p.data  # a new array: p.grad itself is never modified
        if mu != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                # b_1 = g_1, undamped; np.array, not g.copy(): a 0-d g may be a NumPy scalar,
                # which the in-place updates below could not modify
                buf = state["momentum_buffer"] = np.array(g, dtype=p.data.dtype)
            else:
                buf *= mu
                buf += (1 - tau) * g  # b_t = μ b_{t-1} + (1 − τ) g_t
            g = g + mu * buf if self.hyper["nesterov"] else buf
        p.data -= lr * g  # θ_t = θ_{t-1} − γ g_t


class Adam(Optimizer):
    """Adam with L2 weight decay added to the gradient (PyTorch's rule, ``amsgrad=False``).

    For each trainable parameter with a gradient, at its own step t = 1, 2, …::

        g ← g + λ θ                        if weight_decay λ ≠ 0
        m ← β1 m + (1 − β1) g               (m_0 = 0, buffer "exp_avg")
        v ← β2 v + (1 − β2) g²              (v_0 = 0, buffer "exp_avg_sq")
        θ ← θ − γ m̂ / (√v̂ + ε)             m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)

    grouped as PyTorch groups it, ``θ -= (γ / (1 − β1^t)) m / (√v / √(1 − β2^t) + ε)``;
    PyTorch's ``lerp_``/``addcdiv_`` round differently, so steps agree to rounding.

    Parameters
    ----------
    params : iterable of Parameter, or of (name, Parameter) pairs
        E.g. ``model.named_parameters()``; names key the checkpoint state.
    lr : float, default 1e-3
        γ >= 0.
    betas : (float, float), default (0.9, 0.999)
        β1 and β2, each in [0, 1).
    eps : float, default 1e-8
        ε > 0, added to √v̂.
    weight_decay : float, default 0.0
        λ >= 0, added to the gradient (see ``AdamW`` for the decoupled form).
    """

    _buffers = ("exp_avg", "exp_avg_sq")
    _counts_steps = True
    _decoupled = False  # AdamW decays θ directly instead of adding λθ to g

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        beta1, beta2 = _check_betas(betas)
        super().__init__(params, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay)

    @staticmethod  # named arguments, where the base takes any: each optimizer has its own
    def _check_hyper(lr: Any, beta1: Any, beta2: Any, eps: Any, weight_decay: Any) -> dict[str, Any]:  # type: ignore[override]
        return {
            "lr": check_real(lr, "lr", 0.0),
            "beta1": check_real(beta1, "betas[0]", 0.0, 1.0, high_open=True),
            "beta2": check_real(beta2, "betas[1]", 0.0, 1.0, high_open=True),
            "eps": check_real(eps, "eps", 0.0, low_open=True),
            "weight_decay": check_real(weight_decay, "weight_decay", 0.0),
        }

    @property
    def betas(self) -> tuple[float, float]:
        """(β1, β2)."""
        return self.hyper["beta1"], self.hyper["beta2"]

    def _update(self, p: Any, g: np.ndarray, state: dict[str, Any]) -> None:
        lr, beta1, beta2 = self.hyper["lr"], self.hyper["beta1"], self.hyper["beta2"]
        eps, wd = self.hyper["eps"], self.hyper["weight_decay"]
        t = state["step"]
        if wd != 0:
            if self._decoupled:
                p.data *= 1 - lr * wd  # θ ← θ − γλθ, as PyTorch writes it: θ ← θ (1 − γλ)
            else:
                g = g + wd * p.data  # a new array: p.grad itself is never modified
        if "exp_avg" not in state:
            state["exp_avg"] = np.zeros_like(p.data)
            state["exp_avg_sq"] = np.zeros_like(p.data)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= beta1
        m += (1 - beta1) * g  # m_t = β1 m_{t-1} + (1 − β1) g_t
        v *= beta2
        v += (1 - beta2) * (g * g)  # v_t = β2 v_{t-1} + (1 − β2) g_t²
        step_size = lr / (1 - beta1**t)  # γ / (1 − β1^t): folds m̂'s bias correction into γ
        denom = np.sqrt(v) / math.sqrt(1 - beta2**t) + eps  # √v̂_t + ε
        p.data -= step_size * m / denom


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter; PyTorch's ``AdamW``).

    Before the Adam step of ``Adam`` (with no L2 term), each trainable parameter
    with a gradient decays: ``θ ← θ (1 − γλ)``, i.e. ``θ -= γ λ θ``. Arguments
    as ``Adam``, except ``weight_decay`` defaults to 1e-2.
    """

    _decoupled = True

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _check_betas(betas: Any) -> tuple[Any, Any]:
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Iterable):
        raise TypeError(
            f"betas must be a pair (beta1, beta2), got {type(betas).__name__} {betas!r}"
        )
    betas = tuple(betas)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {len(betas)} values {betas!r}")
    return betas


# ---------------------------------------------------------------- clipping


class NonFiniteNormError(FloatingPointError, RuntimeError):
    """The gradients' total norm is inf or NaN and ``error_if_nonfinite=True`` was asked.

    Both a ``FloatingPointError`` (lowrank's word for a result that is not
    finite) and a ``RuntimeError`` (what ``torch.nn.utils.clip_grad_norm_``
    raises), so code written for either catches it.
    """


def clip_grad_norm_(params: Any, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> np.floating:
    """Scale the gradients in place so that their global ``norm_type``-norm is at most ``max_norm``.

    PyTorch's ``torch.nn.utils.clip_grad_norm_``, rule for rule. Over the
    trainable parameters that have a gradient ``g_1, …, g_n``::

        total = ‖(‖g_1‖_p, …, ‖g_n‖_p)‖_p        (‖·‖_∞ = max |·|)
        coef  = min(max_norm / (total + 1e-6), 1)
        g_i  ← coef · g_i                          (in place; coef rounded to g_i's dtype)

    Each ``‖g_i‖_p`` is accumulated in float64 and rounded to ``g_i``'s dtype,
    and ``total`` and ``coef`` are computed in the gradients' common dtype
    (float32 for float32 gradients), as PyTorch on the CPU does; its own sums
    are float32 with another order, so results agree to rounding (the
    crosscheck in ``tests/crosscheck/test_clip_torch.py`` holds them to it). The
    1e-6 is PyTorch's.

    A non-finite ``total`` is treated as PyTorch treats it: with
    ``error_if_nonfinite=False`` the gradients are multiplied by the
    non-finite ``coef`` anyway (an inf total gives ``coef = 0``, so finite
    entries become 0 and infinite ones NaN; a NaN total makes every entry
    NaN), and the total is returned; with ``error_if_nonfinite=True``
    :class:`NonFiniteNormError` is raised before anything changes.

    Parameters
    ----------
    params : Module, or iterable of Parameter, or of (name, Parameter) pairs
        A module stands for its ``named_parameters()``. Frozen parameters
        are skipped even if they hold a gradient (PyTorch's frozen tensors
        have none).
    max_norm : float
        > 0 and finite (PyTorch does not check it).
    norm_type : float, default 2.0
        p > 0, or ``math.inf`` / ``"inf"`` for the largest magnitude.
        (PyTorch's ``vector_norm`` also takes p <= 0, which is no norm: refused.)
    error_if_nonfinite : bool, default False
        Raise instead of scaling by a non-finite coefficient.

    Returns
    -------
    numpy.float32 or numpy.float64
        The total norm *before* clipping, a scalar of the gradients' common
        dtype (PyTorch returns a 0-d tensor of that dtype); ``float32(0.0)``
        when no parameter has a gradient, as ``torch.tensor(0.0)``.

    Raises
    ------
    NonFiniteNormError
        ``error_if_nonfinite=True`` and the total norm is inf or NaN.

    See Also
    --------
    clip_grads_ : the same without the checks, for a loop that checked its
        parameter list once.
    """
    if callable(getattr(params, "named_parameters", None)):  # a Module
        params = params.named_parameters()
    pairs = _named_parameters(params)
    max_norm = check_real(max_norm, "max_norm", 0.0, low_open=True)
    norm_type = _check_norm_type(norm_type)
    error_if_nonfinite = check_bool(error_if_nonfinite, "error_if_nonfinite")
    return clip_grads_([p for _, p in pairs], max_norm, norm_type, error_if_nonfinite)


def _check_norm_type(norm_type: Any) -> float:
    """``norm_type`` as a float p in (0, inf]; ``"inf"`` is inf, as in PyTorch."""
    if isinstance(norm_type, str) and norm_type == "inf":
        return math.inf
    if isinstance(norm_type, (bool, np.bool_)) or not isinstance(norm_type, numbers.Real):
        raise TypeError(f"norm_type must be a real number or 'inf', got {type(norm_type).__name__} {norm_type!r}")
    p = float(norm_type)
    if not p > 0:  # NaN too
        raise ValueError(f"norm_type must be in (0, inf], got {p!r}")
    return p


def _p_norm(values: np.ndarray, p: float) -> float:
    """``‖values‖_p`` accumulated in float64 (p > 0 or inf)."""
    a = np.abs(values.astype(np.float64, copy=False))
    if a.size == 0:
        return 0.0
    if p == math.inf:
        return float(np.max(a))
    if p == 2.0:
        return math.sqrt(float(np.sum(a * a)))
    if p == 1.0:
        return float(np.sum(a))
    return float(np.sum(a**p) ** (1.0 / p))


def clip_grads_(params: Sequence[Any], max_norm: float, norm_type: float = 2.0,
                error_if_nonfinite: bool = False) -> np.floating:
    """:func:`clip_grad_norm_`'s unchecked core: ``params`` a list of Parameters, arguments checked.

    For a training loop that collected and checked its parameters once
    (``lowrank.train.fit`` does): checking them again at every step would
    rebuild the list, its names and two sets each time. Same rule, same
    result, same return value as :func:`clip_grad_norm_`.
    """
    grads = [p.grad for p in params if p.trainable and p.grad is not None]
    if not grads:
        return np.float32(0.0)
    dtype = np.result_type(*grads)
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite norm is the caller's to see
        norms = np.array([g.dtype.type(_p_norm(g, norm_type)) for g in grads])
        total = dtype.type(_p_norm(norms, norm_type))
        if error_if_nonfinite and not np.isfinite(total):
            raise NonFiniteNormError(
                f"the total norm of order {norm_type} of the gradients must be finite to clip them, "
                f"got {total}; pass error_if_nonfinite=False to scale by the non-finite norm anyway")
        coef = min(dtype.type(max_norm) / (total + dtype.type(1e-6)), dtype.type(1.0))
        if not coef == 1:  # a NaN coef multiplies too, as in PyTorch
            for g in grads:
                g *= g.dtype.type(coef)  # in place, in the gradient's dtype: coef rounded to it first, as torch
    return total


# ---------------------------------------------------------------- schedules


class LRSchedule:
    """Base of the learning-rate schedules: ``optimizer.lr = lr_at(t)``.

    ``t`` is the number of updates already taken, so ``lr_at(t)`` is the rate
    the (t+1)-th update uses. Construction sets ``optimizer.lr = lr_at(0)``
    and takes the *base* rate from ``optimizer.lr`` as it was; each
    ``step()``, called after ``optimizer.step()``, advances ``t`` by one.
    Subclasses define ``lr_at``, a pure function of ``t``, the base rate and
    their own arguments, and list those arguments in ``_hyper``.
    """

    _hyper: tuple[str, ...] = ()

    def __init__(self, optimizer: Any) -> None:
        if not hasattr(optimizer, "lr"):
            raise TypeError(f"optimizer must have a settable .lr, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = check_real(optimizer.lr, "optimizer.lr", 0.0)
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, step: int) -> float:
        """The learning rate of update ``step + 1`` (``step`` updates already taken)."""
        raise NotImplementedError

    def step(self) -> float:
        """Advance one update and set (and return) the optimizer's learning rate."""
        self.last_step += 1
        lr = self.lr_at(self.last_step)
        self.optimizer.lr = lr
        return lr

    def state_dict(self) -> dict[str, np.ndarray]:
        """``base_lr``, ``last_step`` and the schedule's arguments as 0-d arrays."""
        out = {"base_lr": np.asarray(self.base_lr, dtype=np.float64),
               "last_step": np.asarray(self.last_step, dtype=np.int64)}
        for k in self._hyper:
            value = getattr(self, k)
            out[k] = np.asarray(value, dtype=np.int64 if isinstance(value, int) else np.float64)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()`` snapshot and set the optimizer's rate to match."""
        expected = {"base_lr", "last_step", *self._hyper}
        keys = set(state_dict)
        if keys != expected:
            raise ValueError(f"state_dict must have exactly the keys {sorted(expected)} of "
                             f"{type(self).__name__}, got {sorted(keys)}")
        values = {k: _scalar(state_dict, k) for k in expected}
        before = dict(self.__dict__)
        try:
            self.base_lr = check_real(values["base_lr"], "state_dict['base_lr']", 0.0)
            self.last_step = check_int(values["last_step"], "state_dict['last_step']", 0)
            for k in self._hyper:
                setattr(self, k, values[k])
            self._check()
        except (TypeError, ValueError):
            self.__dict__.update(before)  # a bad snapshot changes nothing
            raise
        self.optimizer.lr = self.lr_at(self.last_step)

    def _check(self) -> None:
        """Validate the schedule's own arguments (subclasses)."""

    def _t(self, step: Any) -> int:
        return check_int(step, "step", 0)

    def __repr__(self) -> str:
        args = "".join(f", {k}={getattr(self, k)!r}" for k in self._hyper)
        return f"{type(self).__name__}(base_lr={self.base_lr!r}{args}, last_step={self.last_step})"


class ConstantLR(LRSchedule):
    """``lr_at(t) = base_lr`` for every t."""

    def lr_at(self, step: int) -> float:
        """``base_lr``, whatever ``step`` (an int >= 0, still checked)."""
        self._t(step)
        return self.base_lr


class LinearWarmup(LRSchedule):
    """Linear warm-up to the base rate, then constant.

    ``lr_at(t) = base_lr · min(1, (t + 1) / warmup_steps)``: update ``u = t + 1``
    uses ``base_lr · u / warmup_steps`` until update ``warmup_steps``, which
    uses the full rate. The first update is not wasted on a zero rate.
    """

    _hyper = ("warmup_steps",)

    def __init__(self, optimizer: Any, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self._check()
        super().__init__(optimizer)

    def _check(self) -> None:
        self.warmup_steps = check_int(self.warmup_steps, "warmup_steps", 1)

    def lr_at(self, step: int) -> float:
        """``base_lr · min(1, (step + 1) / warmup_steps)``; ``step`` an int >= 0."""
        t = self._t(step)
        return self.base_lr * min(1.0, (t + 1) / self.warmup_steps)


class CosineAnnealing(LRSchedule):
    """Cosine decay from the base rate to ``eta_min`` over ``total_steps`` (PyTorch's closed form).

    ``lr_at(t) = eta_min + (base_lr − eta_min) · (1 + cos(π · min(t, T) / T)) / 2``
    with ``T = total_steps``: the first update uses ``base_lr``, and from
    ``t = T`` on the rate stays at ``eta_min`` (PyTorch's ``CosineAnnealingLR``
    would rise again; a training run has no use for that).

    Examples
    --------
    >>> import numpy as np
    >>> from lowrank.nn import Parameter
    >>> sched = CosineAnnealing(SGD([Parameter(np.zeros(1))], lr=1.0), total_steps=4)
    >>> [round(sched.lr_at(t), 4) for t in range(6)]
    [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    """

    _hyper = ("total_steps", "eta_min")

    def __init__(self, optimizer: Any, total_steps: int, eta_min: float = 0.0) -> None:
        self.total_steps, self.eta_min = total_steps, eta_min
        self._check()
        super().__init__(optimizer)

    def _check(self) -> None:
        self.total_steps = check_int(self.total_steps, "total_steps", 1)
        self.eta_min = check_real(self.eta_min, "eta_min", 0.0)

    def lr_at(self, step: int) -> float:
        """The cosine of the class docstring at ``t = step`` (an int >= 0); ``eta_min`` from ``total_steps`` on."""
        t = min(self._t(step), self.total_steps)
        cos = (1 + math.cos(math.pi * t / self.total_steps)) / 2
        return self.eta_min + (self.base_lr - self.eta_min) * cos


class WarmupCosine(LRSchedule):
    """``LinearWarmup`` for ``warmup_steps`` updates, then ``CosineAnnealing`` over the rest.

    ``lr_at(t) = base_lr · (t + 1) / W`` for ``t < W``, else
    ``eta_min + (base_lr − eta_min) · (1 + cos(π · min(t − W, T − W) / (T − W))) / 2``
    with ``W = warmup_steps < T = total_steps``: the two pieces above, chained.
    """

    _hyper = ("warmup_steps", "total_steps", "eta_min")

    def __init__(self, optimizer: Any, warmup_steps: int, total_steps: int,
                 eta_min: float = 0.0) -> None:
        self.warmup_steps, self.total_steps, self.eta_min = warmup_steps, total_steps, eta_min
        self._check()
        super().__init__(optimizer)

    def _check(self) -> None:
        self.warmup_steps = check_int(self.warmup_steps, "warmup_steps", 1)
        self.total_steps = check_int(self.total_steps, "total_steps", self.warmup_steps + 1,
                                     rule="[warmup_steps + 1, inf)")
        self.eta_min = check_real(self.eta_min, "eta_min", 0.0)

    def lr_at(self, step: int) -> float:
        """The warm-up line for ``step < warmup_steps``, the cosine after it; ``step`` an int >= 0."""
        t = self._t(step)
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        cos = (1 + math.cos(math.pi * min(t - self.warmup_steps, span) / span)) / 2
        return self.eta_min + (self.base_lr - self.eta_min) * cos
