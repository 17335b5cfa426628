"""LoRA on a whole model: inject adapters, count what trains, merge for deployment.

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
from collections.abc import Iterable
from typing import Any

import numpy as np

from lowrank.nn.modules import LORA_INITS, Linear, LoRALinear, Module
from lowrank.utils.validation import RandomState, check_bool, check_choice, check_int, check_random_state, check_real

__all__ = ["inject_lora", "merge_lora", "trainable_summary"]


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
    for m in plain.modules():
        m._pending = None  # drop forward caches copied from the original: nothing to pair with
    return plain
