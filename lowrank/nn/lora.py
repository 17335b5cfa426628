"""LoRA layers and LoRA on a whole model: LoRALinear, injection, merging, counting.

>>> from lowrank import nn
>>> model = nn.MLP([16, 32, 4], random_state=0)
>>> model = nn.inject_lora(model, r=2, alpha=4, targets=["0"], random_state=0)
>>> text = nn.trainable_summary(model)
trainable params: 96 || all params: 772 || trainable%: 12.4352
>>> plain = nn.merge_lora(model)   # a plain MLP again, LoRA folded into "0.weight"
>>> [name for name, _ in plain.named_parameters()]
['0.weight', '0.bias', '2.weight', '2.bias']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from lowrank.nn import functional as F
from lowrank.nn.modules import (
    Linear,
    Module,
    Parameter,
    accumulate_grad,
    as_array_of,
    base_is_trainable,
    check_features,
)
from lowrank.utils.validation import RandomState, check_bool, check_choice, check_int, check_random_state, check_real

__all__ = ["LORA_INITS", "LoRALinear", "inject_lora", "merge_lora", "trainable_summary"]

LORA_INITS = ("kaiming", "gaussian", "pissa")


# ---------------------------------------------------------------- LoRA


class _Factor(Module):
    """Holds one LoRA factor as ``weight``, so the state-dict keys read
    ``lora_A.weight`` and ``lora_B.weight``, as in PEFT. Not a layer: it has
    no forward of its own (LoRALinear's kernel uses both factors at once)."""

    def __init__(self, data: np.ndarray) -> None:
        super().__init__()
        self.weight = Parameter(data)

    def extra_repr(self) -> str:
        return f"shape={self.weight.shape}, dtype={self.weight.dtype}"


class LoRALinear(Module):
    """A frozen Linear plus a trainable low-rank update: ``W + scaling * B @ A``.

    ``y = x @ W.T + b + scaling * (drop(x) @ A.T) @ B.T``
    (:func:`lowrank.nn.functional.lora_linear`).

    Parameters
    ----------
    base : Linear
        Wrapped, not copied: its weight and bias Parameters become this
        layer's ``weight`` and ``bias`` and are frozen (``trainable=False``).
        ``init="pissa"`` replaces the weight's data with the residual, and
        ``merge()`` writes into it, so ``base`` always shows the current W.
    r : int, default 8
        The rank of the update, ``>= 1`` (``<= min(in, out)`` for PiSSA).
    alpha : float, default 8
        ``scaling = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
    dropout : float in [0, 1), default 0.0
        Dropout on the input of the LoRA path, in training mode only.
    use_rslora : bool, default False
        Rank-stabilized scaling ``alpha / sqrt(r)`` (Kalajdzievski, 2023).
    init : {"kaiming", "gaussian", "pissa"}, default "kaiming"
        ``"kaiming"``: ``A ~ U(-1/sqrt(in), 1/sqrt(in))``, ``B = 0`` (PyTorch's
        ``kaiming_uniform_(a=sqrt(5))``, as PEFT), so a fresh adapter changes
        nothing. ``"gaussian"``: ``A ~ N(0, (1/r)^2)``, ``B = 0``. ``"pissa"``
        (Meng et al., 2024): from the truncated SVD ``W ≈ U_r diag(s_r) Vt_r``,
        ``A = diag(sqrt(s_r/scaling)) @ Vt_r``, ``B = U_r @ diag(sqrt(s_r/scaling))``,
        and the frozen weight becomes the residual ``W - scaling * B @ A``
        (computed in float64 from the stored A and B, cast once), so the
        layer's output is unchanged up to that one rounding.
    random_state : None, int or numpy.random.Generator
        Resolved once: draws the initial A, then every dropout mask.

    Attributes
    ----------
    A : Parameter of shape (r, in_features)
        Registered as ``lora_A.weight``.
    B : Parameter of shape (out_features, r)
        Registered as ``lora_B.weight``.
    scaling : float
    merged : bool
        True between ``merge()`` and ``unmerge()``. While merged, forward is
        the plain linear with ``W + scaling * B @ A``, ``state_dict()["weight"]``
        holds that merged W, and backward is refused.

    Notes
    -----
    State-dict keys: ``"weight"``, ``"bias"`` (if any), ``"lora_A.weight"``,
    ``"lora_B.weight"``. Trainable numbers: ``r * (in_features + out_features)``.
    The gradients of A and B are always computed by the kernel (they cost
    ``O(N r (in + out))``) and stored only if trainable; the base's are
    computed only if its Parameters are trainable.
    """

    def __init__(
        self,
        base: Linear,
        r: int = 8,
        alpha: float = 8,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        random_state: RandomState = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, Linear):
            raise TypeError(f"base must be a Linear, got {type(base).__name__}")
        r = check_int(r, "r", low=1)
        alpha = check_real(alpha, "alpha", 0.0, low_open=True)
        dropout = check_real(dropout, "dropout", 0.0, 1.0, high_open=True)
        use_rslora = check_bool(use_rslora, "use_rslora")
        init = check_choice(init, "init", LORA_INITS)
        in_features, out_features = base.in_features, base.out_features
        if init == "pissa" and r > min(in_features, out_features):
            raise ValueError(
                f"r must be in [1, min(in_features, out_features)] = [1, {min(in_features, out_features)}] "
                f"for init='pissa' (weight shape {base.weight.shape}), got {r}"
            )
        self._set_generator(random_state)
        object.__setattr__(self, "_base", base)  # held, not registered: its Parameters are, below
        self.weight = base.weight
        self.bias = base.bias
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout, self.use_rslora, self.init = r, alpha, dropout, use_rslora, init
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        A, B = self._initial_factors()
        self.lora_A = _Factor(A)  # (r, in)
        self.lora_B = _Factor(B)  # (out, r)
        self.weight.trainable = False
        if self.bias is not None:
            self.bias.trainable = False

    def _initial_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """A (r, in) and B (out, r) in the weight's dtype; PiSSA also rewrites W."""
        r, n_in, n_out, dtype = self.r, self.in_features, self.out_features, self.weight.dtype
        if self.init == "kaiming":
            bound = 1.0 / math.sqrt(n_in)
            A = self.generator.uniform(-bound, bound, (r, n_in))
            return A.astype(dtype), np.zeros((n_out, r), dtype)
        if self.init == "gaussian":
            A = self.generator.normal(0.0, 1.0 / r, (r, n_in))
            return A.astype(dtype), np.zeros((n_out, r), dtype)
        from lowrank.factor.svd import truncated_svd  # lazily: svd is not needed otherwise

        W = self.weight.data.astype(np.float64)  # (out, in)
        svd = truncated_svd(W, r)  # U (out, r), s (r,), Vt (r, in)
        root = np.sqrt(svd.s / self.scaling)  # (r,)
        A = (root[:, None] * svd.Vt).astype(dtype)  # (r, in)
        B = (svd.U * root).astype(dtype)  # (out, r)
        # the residual from the factors as stored, so residual + scaling * B @ A == W up to one rounding
        residual = W - self.scaling * (B.astype(np.float64) @ A.astype(np.float64))  # (out, in)
        self.weight.data = residual.astype(dtype)
        return A, B

    @property
    def base(self) -> Linear:
        """The wrapped Linear (sharing this layer's weight and bias Parameters)."""
        return self._base

    @property
    def A(self) -> Parameter:
        """The down-projection, shape (r, in_features)."""
        return self.lora_A.weight

    @property
    def B(self) -> Parameter:
        """The up-projection, shape (out_features, r)."""
        return self.lora_B.weight

    def forward(self, x: Any) -> np.ndarray:
        """Map ``x`` (..., in_features) to ``y`` (..., out_features); checks ``x`` once.

        The parameters are this layer's own, so the kernels' unchecked cores run.
        """
        x = as_array_of(x, "x", self.weight.dtype)
        check_features(x, self.in_features)
        bias = None if self.bias is None else self.bias.data
        cache: F.LinearCache | F.LoRACache
        if self.merged:  # the update lives inside W now: the plain linear is the whole layer
            y, cache = F.linear_core(x, self.weight.data, bias)
        else:
            mask = None
            if self.training and self.dropout > 0:
                mask = F.dropout_mask(x.shape, self.dropout, random_state=self.generator, dtype=x.dtype)
            y, cache = F.lora_linear_core(x, self.weight.data, bias, self.A.data, self.B.data, self.scaling, mask)
        self._save_for_backward(cache, y)
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Map ``dy`` (..., out_features) to ``dx`` (..., in_features); adds into A.grad and B.grad.

        Raises RuntimeError while merged: A and B are inside W then, and their
        gradients need the unmerged forward (``unmerge()``, forward again).
        """
        if self.merged:
            raise RuntimeError("LoRALinear.backward while merged: call unmerge() and run forward again")
        base_trainable = base_is_trainable(self)  # before taking the cache: an error leaves it in place
        cache, dy = self._take_for_backward(dy)  # dy checked there, once
        g = F.lora_linear_backward_core(dy, cache, base_trainable=base_trainable)
        if self.A.trainable:
            accumulate_grad(self.A, g.A)
        if self.B.trainable:
            accumulate_grad(self.B, g.B)
        if base_trainable:
            accumulate_grad(self.weight, g.weight)
            if self.bias is not None:
                accumulate_grad(self.bias, g.bias)
        return g.x

    def delta_weight(self) -> np.ndarray:
        """The update ``scaling * B @ A``, ndarray of shape (out_features, in_features), float64."""
        B = self.B.data.astype(np.float64)  # (out, r)
        A = self.A.data.astype(np.float64)  # (r, in)
        return self.scaling * (B @ A)  # (out, in)

    def merge(self) -> None:
        """Fold the update into the weight: ``W <- W + scaling * B @ A``.

        Accumulated in float64 and cast to W's dtype once. If the result is not
        finite (overflow in W's dtype, or NaN/inf in A or B) it raises
        FloatingPointError and leaves every weight bit-identical.
        """
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged (call unmerge() first)")
        self._add_to_weight(+1.0, "merge")
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out: ``W <- W - scaling * B @ A``, in float64, cast once.

        Tolerance: after ``merge(); unmerge()`` each entry of W is within
        ``eps * (|W| + |scaling * B @ A|)`` of its value before (``eps =
        np.finfo(W.dtype).eps``; one rounding at merge, one here), and is
        bit-identical where ``B @ A`` is 0 (e.g. a fresh adapter).
        """
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self._add_to_weight(-1.0, "unmerge")
        self.merged = False

    def _add_to_weight(self, sign: float, action: str) -> None:
        dtype = self.weight.dtype
        delta = self.delta_weight()  # (out, in), float64
        with np.errstate(over="ignore", invalid="ignore"):  # checked right below
            new = (self.weight.data.astype(np.float64) + sign * delta).astype(dtype)  # (out, in)
        finite = np.isfinite(new)
        if not finite.all():
            raise FloatingPointError(
                f"LoRALinear.{action} refused: W {'+' if sign > 0 else '-'} scaling * B @ A would "
                f"have {int(np.count_nonzero(~finite))} non-finite entries in {dtype} "
                f"(max |W| = {np.abs(self.weight.data).max():.3g}, "
                f"max |scaling * B @ A| = {np.abs(delta).max():.3g}); the weights are unchanged"
            )
        self.weight.data = new

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}, use_rslora={self.use_rslora}, "
            f"init={self.init!r}, merged={self.merged}"
        )


# ---------------------------------------------------------------- LoRA on a model


def _replace_everywhere(model: Module, replacements: dict[int, Module]) -> None:
    """Point every reference to a replaced module at its replacement.

    ``replacements`` maps ``id(old)`` to the new module. Every parent/child
    edge is visited, so a layer registered under two names (shared) is
    replaced under both, by the same new module.
    """
    for module in model.modules():
        for name, child in module.named_children():
            if id(child) in replacements:
                setattr(module, name, replacements[id(child)])  # keeps the name and its position


def _lora_factors(model: Module) -> set[int]:
    """The ids of the A and B Parameters of every LoRA layer in ``model``."""
    return {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.A, m.B)}


def inject_lora(
    model: Module,
    r: int,
    alpha: float,
    targets: Iterable[str] | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    random_state: RandomState = None,
) -> Module:
    """Wrap Linear layers in :class:`LoRALinear` and freeze everything else, in place.

    Parameters
    ----------
    model : Module
        Changed in place: each targeted Linear is replaced, under the same
        name, by a LoRALinear that wraps it (sharing its weight and bias), so
        the state-dict keys of the base stay (``"0.weight"``) and the adapter
        adds ``"0.lora_A.weight"`` and ``"0.lora_B.weight"``, as PEFT names them.
    r, alpha, dropout, use_rslora, init
        As :class:`LoRALinear`, the same for every adapted layer.
    targets : iterable of str, optional
        State-dict prefixes of the Linear layers to adapt (``["0", "2"]``, or
        ``"block.fc"`` in nested modules); all Linear layers when None.
    random_state : None, int or numpy.random.Generator
        Resolved once and handed to every new layer, in the model's order:
        the same seed gives the same adapters (and the same dropout masks).

    Returns
    -------
    Module
        ``model`` itself. If ``model`` is a bare Linear it cannot be changed
        in place, and the new LoRALinear wrapping it is returned instead.

    After the call the trainable parameters are exactly the LoRA factors: the
    new ones, and those of layers adapted earlier (as PEFT's
    ``mark_only_lora_as_trainable``); every other parameter of the model is frozen.

    Raises
    ------
    ValueError
        An unknown target (the message lists the Linear layers there are), a
        target that is already a LoRA layer, no Linear layer to adapt, or an
        invalid ``r``/``alpha``/``dropout``/``init``. Everything is checked
        before the model is changed.
    TypeError
        ``model`` is not a Module, or ``targets`` is a string or holds non-strings.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    r = check_int(r, "r", low=1)
    check_real(alpha, "alpha", 0.0, low_open=True)
    check_real(dropout, "dropout", 0.0, 1.0, high_open=True)
    check_bool(use_rslora, "use_rslora")
    check_choice(init, "init", LORA_INITS)

    modules = model.named_modules()
    linears = {name: m for name, m in modules if isinstance(m, Linear)}
    adapted = [name for name, m in modules if isinstance(m, LoRALinear)]
    if targets is None:
        if adapted:
            raise ValueError(
                f"model already has LoRA layers at {adapted}: name the Linear layers still to adapt "
                f"with targets (plain Linear layers: {list(linears)}), or merge_lora(model) first"
            )
        if not linears:
            raise ValueError(f"model has no Linear layer to adapt ({type(model).__name__})")
        chosen = list(linears)
    else:
        chosen = _check_targets(targets, linears, adapted)
    if init == "pissa":
        for name in chosen:
            layer = linears[name]
            if r > min(layer.in_features, layer.out_features):
                raise ValueError(
                    f"r must be in [1, min(in_features, out_features)] for init='pissa', got {r} for "
                    f"layer {name!r} of weight shape {layer.weight.shape}"
                )

    rng = check_random_state(random_state)
    replacements = {
        id(linears[name]): LoRALinear(
            linears[name], r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, random_state=rng
        )
        for name in chosen  # in model order: the generator's draws follow it
    }
    if isinstance(model, Linear):
        model = replacements[id(model)]
    else:
        _replace_everywhere(model, replacements)

    keep = _lora_factors(model)
    for p in model.parameters():
        if id(p) not in keep:
            p.trainable = False
    for lora in replacements.values():
        lora.A.trainable = lora.B.trainable = True
    return model


def _check_targets(targets: Any, linears: dict[str, Linear], adapted: list[str]) -> list[str]:
    """The targeted Linear names, in the model's order; every problem in one message."""
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Iterable):
        raise TypeError(
            f"targets must be a list of layer names such as ['0', '2'], got {type(targets).__name__} {targets!r}"
        )
    targets = list(targets)
    bad_types = [t for t in targets if not isinstance(t, str)]
    if bad_types:
        raise TypeError(f"targets must hold layer names (str), got {bad_types!r}")
    if not targets:
        raise ValueError(f"targets must name at least one Linear layer of {list(linears)}, got []")
    again = [t for t in targets if t in adapted]
    if again:
        raise ValueError(
            f"targets {again} are already LoRA layers: a layer is adapted once (merge_lora(model) "
            f"returns a plain model to adapt anew)"
        )
    unknown = [t for t in targets if t not in linears]
    if unknown:
        raise ValueError(f"targets {unknown} are not Linear layers of the model; the Linear layers are {list(linears)}")
    wanted = set(targets)
    return [name for name in linears if name in wanted]


def trainable_summary(model: Module, *, quiet: bool = False) -> str:
    """PEFT's ``print_trainable_parameters`` line, printed and returned.

    ``trainable params: 1,234 || all params: 100,000 || trainable%: 1.2340``:
    counts of numbers (not arrays), every parameter counted once, the LoRA
    factors included in "all params", as PEFT counts them.

    Parameters
    ----------
    model : Module
    quiet : bool, default False
        Only return the line, do not print it.

    Returns
    -------
    str
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    quiet = check_bool(quiet, "quiet")
    params = model.parameters()
    total = sum(p.size for p in params)
    if total == 0:
        raise ValueError(f"model has no parameters to count ({type(model).__name__})")
    trainable = sum(p.size for p in params if p.trainable)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    if not quiet:
        print(line)
    return line


def merge_lora(model: Module) -> Module:
    """A new plain model, every LoRA layer folded into a Linear: for deployment.

    Each :class:`LoRALinear` of a deep copy of ``model`` is replaced by its
    base Linear with ``W + scaling * B @ A`` (accumulated in float64 and cast
    to W's dtype once; a layer already merged with ``merge()`` holds that
    weight and is taken as it is). The copy's forward equals the adapted
    model's in eval mode, up to that one rounding per weight; its state-dict
    keys are the base model's (``"0.weight"``, no ``lora_`` keys).

    Parameters
    ----------
    model : Module
        Left untouched (weights, gradients, flags, mode).

    Returns
    -------
    Module
        Of ``model``'s class (a bare LoRALinear gives a Linear). Every
        parameter is trainable, as in a freshly built model, and no gradient
        is set.

    Raises
    ------
    FloatingPointError
        If a merged weight would not be finite in its dtype (the original
        model is untouched either way).
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    plain = copy.deepcopy(model)
    replacements: dict[int, Module] = {}
    for name, lora in plain.named_modules():
        if not isinstance(lora, LoRALinear):
            continue
        base = lora.base  # shares lora.weight and lora.bias (deepcopy keeps the sharing)
        if not lora.merged:
            dtype = base.weight.dtype
            with np.errstate(over="ignore", invalid="ignore"):  # checked right below
                merged = (base.weight.data.astype(np.float64) + lora.delta_weight()).astype(dtype)  # (out, in)
            if not np.isfinite(merged).all():
                raise FloatingPointError(
                    f"merge_lora: layer {name or '(the model)'!r} would have "
                    f"{int(np.count_nonzero(~np.isfinite(merged)))} non-finite weights in {dtype}"
                )
            base.weight.data = merged
        replacements[id(lora)] = base
    if isinstance(plain, LoRALinear):
        plain = replacements[id(plain)]
    else:
        _replace_everywhere(plain, replacements)
    for p in plain.parameters():
        p.trainable = True
        p.grad = None
    plain.clear_cache()  # caches copied from the original have nothing to pair with
    return plain
