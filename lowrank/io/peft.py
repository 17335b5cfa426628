"""PEFT LoRA adapters: read and write the folders ``PeftModel`` uses.

Above :mod:`lowrank.nn` in the layers: loading an adapter is injection with
given factors, so it swaps layers through the same path as
:func:`lowrank.nn.inject_lora`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from lowrank.io.files import PathLike, load_json, load_safetensors, save_json, save_safetensors
from lowrank.nn.lora import LoRALinear, _replace_everywhere
from lowrank.nn.modules import Linear, Module
from lowrank.utils.validation import check_random_state

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
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    use_rslora = config.get("use_rslora", False)
    fan_in_fan_out = config.get("fan_in_fan_out", False)
    for name, value in (("use_rslora", use_rslora), ("fan_in_fan_out", fan_in_fan_out)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) or
            (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise ValueError(f"{where}: target_modules must be null, a string or a list of strings, got {targets!r}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    return {"r": r, "alpha": float(alpha), "use_rslora": use_rslora, "targets": targets, "dropout": float(dropout)}


def _peft_target_matches(targets: str | list[str] | None, name: str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name (``"all-linear"``:
    every linear layer); a list matches a name equal to an entry or ending in ``"." + entry``."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _peft_key(name: str, factor: str) -> str:
    return f"{_PEFT_PREFIX}{name + '.' if name else ''}lora_{factor}.weight"


def load_peft_adapter(model: Any, path: PathLike, *, random_state: Any = None) -> Any:
    """Load a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into ``model``.

    Each layer named in the weights file (``base_model.model.<name>.lora_A.weight``
    and ``.lora_B.weight``) must be a :class:`~lowrank.nn.Linear` or an unmerged
    :class:`~lowrank.nn.LoRALinear` of ``model``; it is replaced, in its parent,
    by a ``LoRALinear`` around the same base Linear with the file's ``A`` and
    ``B`` and the config's ``r``, ``lora_alpha``, ``use_rslora`` and
    ``lora_dropout``. The factors are cast to the layer's dtype. As PEFT
    does, every other parameter of ``model`` is frozen (``trainable=False``):
    afterwards only the loaded LoRA factors train.

    Config fields: ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``
    (every adapted layer must match it, by PEFT's rule) and ``fan_in_fan_out``
    are read. ``fan_in_fan_out`` says the *base* model stored its weights as
    ``(in, out)`` (GPT-2's Conv1D); PEFT's factors are ``(r, in)`` and
    ``(out, r)`` either way, so it changes nothing here: a base state dict
    from such a model must be transposed when it is loaded, not the adapter.
    Bookkeeping fields, ``lora_dropout`` (training only) and the
    initialization fields are ignored. Any other field that is switched on
    (``use_dora``, ``bias`` other than ``"none"``, ``rank_pattern``,
    ``alpha_pattern``, ``modules_to_save``, ``layers_to_transform``, ...) is
    refused with a ValueError that names it. An adapter trained from a PiSSA,
    OLoRA or CorDA initialization is relative to the *residual* base weights
    that initialization produced; load those into ``model`` first.

    Parameters
    ----------
    model : lowrank.nn.Module
        Modified in place (the adapted layers are swapped for LoRALinear).
    path : str or os.PathLike
        The adapter folder.
    random_state : None, int or numpy.random.Generator
        For the dropout masks of the new layers in training mode.

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
    ImportError
        Without the ``io`` extra (safetensors).
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
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
    checked: dict[str, tuple[Any, np.ndarray, np.ndarray]] = {}  # name -> (base Linear, A, B)
    for name, pair in factors.items():
        shown = name or "<the model itself>"
        missing = [f for f in "AB" if f not in pair]
        if missing:
            raise ValueError(f"{weights_path}: layer {shown!r} has no {_peft_key(name, missing[0])!r}")
        if not _peft_target_matches(config["targets"], name):
            raise ValueError(
                f"{weights_path}: layer {shown!r} does not match target_modules {config['targets']!r} "
                f"of {config_path.name}"
            )
        layer = modules.get(name)
        if isinstance(layer, LoRALinear):
            if layer.merged:
                raise ValueError(f"layer {shown!r} is a merged LoRALinear: unmerge() it before loading an adapter")
            base = layer.base
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
        checked[name] = (base, A, B)

    # Everything checked, nothing changed yet: build the layers (wrapping a
    # Linear freezes it), freeze the rest of the model as PEFT does, swap them in.
    rng = check_random_state(random_state)  # once, so each layer draws its own dropout masks
    new_layers: dict[str, Module] = {}
    for name, (base, A, B) in checked.items():
        new = LoRALinear(base, r=r, alpha=config["alpha"], dropout=config["dropout"],
                         use_rslora=config["use_rslora"], random_state=rng)
        new.A.data = np.array(A, dtype=base.weight.dtype, order="C")  # (r, in)
        new.B.data = np.array(B, dtype=base.weight.dtype, order="C")  # (out, r)
        new.train(model.training)
        new_layers[name] = new
    for param in model.parameters():
        param.trainable = False
    if "" in new_layers:  # the model is itself the adapted Linear
        return new_layers[""]
    _replace_everywhere(model, {id(modules[name]): new for name, new in new_layers.items()})
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
        raise ValueError(f"LoRALinear layers {merged} are merged: unmerge() them before saving the adapter")
    settings = {(m.r, m.alpha, m.use_rslora, m.dropout) for _, m in layers}
    if len(settings) > 1:
        raise ValueError(
            "every LoRALinear must share r, alpha, use_rslora and dropout to be saved as one PEFT config, got "
            + ", ".join(f"{name or '<model>'}: (r={m.r}, alpha={m.alpha:g}, use_rslora={m.use_rslora}, "
                        f"dropout={m.dropout:g})" for name, m in layers)
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
    config = {
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
