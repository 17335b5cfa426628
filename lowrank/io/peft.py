"""PEFT LoRA adapters: read and write the folders ``PeftModel`` uses.

Above :mod:`lowrank.nn` in the layers: loading an adapter is injection with
given factors, so it swaps layers through the same path as
:func:`lowrank.nn.inject_lora`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from lowrank.io.files import PathLike, load_json, load_safetensors, save_json, save_safetensors
from lowrank.nn.lora import (
    LoRALinear,
    check_lora_config,
    inject_lora,
    match_target_modules,
    replace_modules,
)
from lowrank.nn.modules import Linear, Module
from lowrank.utils.validation import check_bool, check_random_state

__all__ = ["PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "load_peft_adapter", "save_peft_adapter"]


# ---------------------------------------------------------------- PEFT adapters
# A PEFT LoRA adapter is a folder with two files:
#   adapter_config.json        LoraConfig's fields (r, lora_alpha, target_modules, ...)
#   adapter_model.safetensors  base_model.model.<module name>.lora_A.weight  (r, in)
#                              base_model.model.<module name>.lora_B.weight  (out, r)
# <module name> is the dotted name of the adapted layer in the base model, the
# same name lowrank gives it ("0", "encoder.2", ...).

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^base_model\.model\.(?:(.+)\.)?lora_([AB])\.weight$")

# Fields that never change what a loaded adapter computes: bookkeeping, the
# training-only dropout, and initialization schemes (the weights are in the file).
_PEFT_IGNORED = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "init_lora_weights", "megatron_core", "runtime_config",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying",
    "exclude_modules", "qalora_group_size", "layers_pattern",
})  # fmt: skip
# Fields lowrank reads and implements.
_PEFT_READ = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "fan_in_fan_out"})
# Every other field must be off (None, False, "none", empty): each one, when on,
# changes the maths in a way lowrank does not implement (DoRA, biases, per-layer
# ranks, extra trained modules, ...), so it is refused by name rather than ignored.


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == "none" or (isinstance(value, (list, dict)) and not value)


def _check_peft_config(config: Any, where: Path) -> dict[str, Any]:
    """The maths-relevant fields of a PEFT LoRA config, after refusing what lowrank does not support."""
    if not isinstance(config, dict):
        raise ValueError(f"{where} must hold a JSON object (PEFT's LoraConfig), got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type must be 'LORA' (only LoRA adapters are supported), got {peft_type!r}")
    unsupported = [
        f"{k}={config[k]!r}" for k in sorted(config) if k not in _PEFT_IGNORED | _PEFT_READ and not _is_off(config[k])
    ]
    if unsupported:
        raise ValueError(
            f"{where}: unsupported PEFT setting(s) {', '.join(unsupported)}: each changes what the adapter "
            f"computes and lowrank implements plain (rs)LoRA only; refusing rather than ignoring them"
        )
    # The settings follow LoRALinear's rules, in its words (lora_alpha is its alpha, lora_dropout its
    # dropout), and target_modules PEFT's, checked by the matcher itself; in a file, every fault is a ValueError.
    try:
        r, alpha, dropout, use_rslora, _ = check_lora_config(
            config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0), config.get("use_rslora", False)
        )
        check_bool(config.get("fan_in_fan_out", False), "fan_in_fan_out")
        targets = config.get("target_modules")
        match_target_modules(targets, "")  # refuses a target_modules of the wrong kind or an invalid regex
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return {"r": r, "alpha": alpha, "use_rslora": use_rslora, "targets": targets, "dropout": dropout}


def _peft_key(name: str, factor: str) -> str:
    return f"{_PEFT_PREFIX}{name + '.' if name else ''}lora_{factor}.weight"


def load_peft_adapter(model: Any, path: PathLike, *, random_state: Any = None) -> Any:
    """Load a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into ``model``.

    Each layer named in the weights file (``base_model.model.<name>.lora_A.weight``
    and ``.lora_B.weight``) must be a :class:`~lowrank.nn.Linear` or an unmerged
    :class:`~lowrank.nn.LoRALinear` of ``model``. Loading is injection with
    given factors: a LoRALinear there is first swapped back for its base
    Linear (:func:`~lowrank.nn.replace_modules`), then
    :func:`~lowrank.nn.inject_lora` wraps the named layers with the config's
    ``r``, ``lora_alpha``, ``use_rslora`` and ``lora_dropout`` (so the layers
    are built, swapped in and frozen exactly as injection does), and the
    file's ``A`` and ``B``, cast to each layer's dtype, replace the initial
    factors. As PEFT does, every parameter of ``model`` that is not a LoRA
    factor is frozen (:func:`~lowrank.nn.mark_only_lora_as_trainable`); the
    loaded factors train.

    Config fields: ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout``
    (checked by :func:`~lowrank.nn.check_lora_config`, in its words),
    ``target_modules`` (every adapted layer must match it, by
    :func:`~lowrank.nn.match_target_modules`) and ``fan_in_fan_out`` are
    read. ``fan_in_fan_out`` says the *base* model stored its weights as
    ``(in, out)`` (GPT-2's Conv1D); PEFT's factors are ``(r, in)`` and
    ``(out, r)`` either way, so it changes nothing here: a base state dict
    from such a model must be transposed when it is loaded, not the adapter.
    Bookkeeping fields and the initialization fields are ignored. Any other
    field that is switched on (``use_dora``, ``bias`` other than ``"none"``,
    ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``,
    ``layers_to_transform``, ...) is refused with a ValueError that names it. An adapter trained from a PiSSA,
    OLoRA or CorDA initialization is relative to the *residual* base weights
    that initialization produced; load those into ``model`` first.

    Parameters
    ----------
    model : lowrank.nn.Module
        Modified in place (the adapted layers are swapped for LoRALinear).
    path : str or os.PathLike
        The adapter folder.
    random_state : None, int or numpy.random.Generator
        Resolved once and handed to every new layer, as :func:`~lowrank.nn.inject_lora`
        does: the dropout masks of the new layers in training mode.

    Returns
    -------
    lowrank.nn.Module
        ``model`` (or the new LoRALinear, if ``model`` itself is the adapted Linear).

    Raises
    ------
    FileNotFoundError
        A missing folder or file.
    ValueError
        A corrupt or truncated file, an unsupported config field, a key that is
        not a LoRA factor, a layer the model does not have, a shape mismatch.
        Everything is checked before the model is changed.
    RuntimeError
        A layer to load into is a merged LoRALinear (``unmerge()`` it first).
    TypeError
        ``model`` is not a Module, or ``random_state`` is of the wrong kind.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    rng = check_random_state(random_state)  # once, for every new layer
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such adapter folder: {folder}")
    config_path, weights_path = folder / PEFT_CONFIG_NAME, folder / PEFT_WEIGHTS_NAME
    config = _check_peft_config(load_json(config_path), config_path)
    tensors = load_safetensors(weights_path)

    factors: dict[str, dict[str, np.ndarray]] = {}
    for key in sorted(tensors):
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(
                f"{weights_path}: unsupported key {key!r}: lowrank loads only "
                f"'base_model.model.<name>.lora_A.weight' and '.lora_B.weight'"
            )
        factors.setdefault(match.group(1) or "", {})[match.group(2)] = tensors[key]
    if not factors:
        raise ValueError(f"{weights_path} holds no LoRA factors")

    modules = dict(model.named_modules())
    r = config["r"]
    checked: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (A, B)
    unwrap: dict[str, Module] = {}  # LoRALinear layers to load into -> their base Linear
    for name, pair in factors.items():
        shown = name or "<the model itself>"
        missing = [f for f in "AB" if f not in pair]
        if missing:
            raise ValueError(f"{weights_path}: layer {shown!r} has no {_peft_key(name, missing[0])!r}")
        if not match_target_modules(config["targets"], name):
            raise ValueError(
                f"{weights_path}: layer {shown!r} does not match target_modules {config['targets']!r} "
                f"of {config_path.name}"
            )
        layer = modules.get(name)
        if isinstance(layer, LoRALinear):
            if layer.merged:
                raise RuntimeError(f"layer {shown!r} is a merged LoRALinear: unmerge() it before loading an adapter")
            base = layer.base
            unwrap[name] = base.train(layer.training)  # the base is not in the tree: its own mode is stale
        elif isinstance(layer, Linear):
            base = layer
        else:
            found = "no such module" if layer is None else type(layer).__name__
            raise ValueError(f"the adapter adapts {shown!r}, which must be a Linear of model, got {found}")
        A, B = pair["A"], pair["B"]
        expected_A, expected_B = (r, base.in_features), (base.out_features, r)
        if A.shape != expected_A or B.shape != expected_B:
            raise ValueError(
                f"{weights_path}: layer {shown!r} needs lora_A of shape (r, in) = {expected_A} and lora_B of "
                f"shape (out, r) = {expected_B}, got {A.shape} and {B.shape}"
            )
        for factor, arr in (("A", A), ("B", B)):
            if arr.dtype.kind != "f" or not np.isfinite(arr).all():
                raise ValueError(f"{weights_path}: {_peft_key(name, factor)!r} must hold finite floats")
        checked[name] = (A, B)

    # Everything checked, nothing changed yet: inject as inject_lora does, then set the file's factors.
    model = replace_modules(model, unwrap)
    model = inject_lora(
        model,
        r=r,
        alpha=config["alpha"],
        targets=list(checked),
        dropout=config["dropout"],
        use_rslora=config["use_rslora"],
        random_state=rng,
    )
    layers = dict(model.named_modules())
    for name, (A, B) in checked.items():
        layer = layers[name]
        layer.A.data = np.array(A, dtype=layer.weight.dtype, order="C")  # (r, in)
        layer.B.data = np.array(B, dtype=layer.weight.dtype, order="C")  # (out, r)
    return model


def save_peft_adapter(model: Any, path: PathLike) -> Path:
    """Write ``model``'s LoRA layers as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    Writes ``adapter_config.json`` (``peft_type "LORA"``, ``task_type null``,
    ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout``, ``bias "none"``,
    ``target_modules`` naming exactly the adapted layers, ``init_lora_weights
    true`` so PEFT does not re-initialize the base) and
    ``adapter_model.safetensors`` (``base_model.model.<name>.lora_A.weight``
    and ``.lora_B.weight`` in the layers' dtype), each atomically. The base
    weights are not part of an adapter: the torch model must hold the same
    base weights (for a PiSSA layer, the residual ``layer.weight``).

    Parameters
    ----------
    model : lowrank.nn.Module
        With at least one unmerged LoRALinear; all of them must share ``r``,
        ``alpha``, ``use_rslora`` and ``dropout`` (PEFT's per-layer patterns
        are not written).
    path : str or os.PathLike
        The folder; created if missing (its parent must exist).

    Returns
    -------
    pathlib.Path
        The folder.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    named = model.named_modules()
    layers = [(name, m) for name, m in named if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("model has no LoRALinear layer: there is no adapter to save")
    merged = [name for name, m in layers if m.merged]
    if merged:
        raise RuntimeError(f"LoRALinear layers {merged} are merged: unmerge() them before saving the adapter")
    settings = {(m.r, m.alpha, m.use_rslora, m.dropout) for _, m in layers}
    if len(settings) > 1:
        raise ValueError(
            "every LoRALinear must share r, alpha, use_rslora and dropout to be saved as one PEFT config, got "
            + ", ".join(
                f"{name or '<the model itself>'}: (r={m.r}, alpha={m.alpha:g}, use_rslora={m.use_rslora}, "
                f"dropout={m.dropout:g})"
                for name, m in layers
            )
        )
    r, alpha, use_rslora, dropout = settings.pop()
    names = [name for name, _ in layers]
    # PEFT matches a list entry against every module whose name ends in "." + entry, so
    # a plain list is exact only when no other linear layer's name ends that way
    others = [n for n, m in named if isinstance(m, Linear) and n not in names]
    ambiguous = any(o.endswith(f".{n}") for o in others for n in names)
    targets: str | list[str] = (
        "^(?:" + "|".join(re.escape(n) for n in names) + ")$" if ambiguous or "" in names else names
    )
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "target_modules": targets,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    tensors = {}
    for name, m in layers:
        tensors[_peft_key(name, "A")] = m.A.data  # (r, in)
        tensors[_peft_key(name, "B")] = m.B.data  # (out, r)
    folder = Path(path)
    folder.mkdir(exist_ok=True)
    save_safetensors(folder / PEFT_WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    save_json(folder / PEFT_CONFIG_NAME, config)
    return folder
