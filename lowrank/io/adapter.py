"""PEFT LoRA adapter folders, read with NumPy alone and without any model.

A PEFT LoRA adapter is a folder with two files::

    adapter_config.json        LoraConfig's fields (r, lora_alpha, target_modules, ...)
    adapter_model.safetensors  the trained tensors, named as PEFT saves them:
        base_model.model.<name>.lora_A.weight        (r, in)     a Linear or Conv1D layer
        base_model.model.<name>.lora_B.weight        (out, r)
        base_model.model.<name>.lora_embedding_A     (r, num_embeddings)   an Embedding
        base_model.model.<name>.lora_embedding_B     (embedding_dim, r)
        base_model.model.<name>.lora_magnitude_vector  (out,) or (embedding_dim,)  DoRA's magnitude m
                                                     (use_dora; also read with a ".weight" suffix)
        base_model.model.<name>.base_layer.bias      an adapted layer's trained bias (bias != "none")
        base_model.model.<path>                      any other full tensor: a trained bias
                                                     (bias="all") or a modules_to_save tensor

``<name>`` is the adapted module's dotted name in the base model, which is
also the prefix of its tensors in the base model's ``state_dict``
(``transformer.h.0.attn.c_attn`` for GPT2LMHeadModel). A full tensor replaces
the base tensor ``<path>`` (with ``.base_layer`` dropped).

This module is the model-free half of the adapter support: the config model
(:class:`AdapterConfig`, with PEFT's per-layer ``rank_pattern`` and
``alpha_pattern`` and its ``target_modules`` matcher), the reader
(:func:`read_adapter`), the consistency report (:func:`inspect_adapter`) and
the merge into a base weights file (:func:`merge_adapter`). It imports only
:mod:`lowrank.utils` and the file primitives, so it sits at the bottom layer
with them; :mod:`lowrank.io.peft` (above :mod:`lowrank.nn`) loads adapters
into lowrank models on top of it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from lowrank.io.files import PathLike, atomic_write, load_json
from lowrank.io.safetensors import (
    TensorInfo,
    bfloat16_bits,
    bfloat16_to_float32,
    read_safetensors,
    read_safetensors_header,
)
from lowrank.utils.validation import check_bool, check_choice, check_int, check_real

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "MAGNITUDE_SUFFIX",
    "MAX_UNBOUNDED_REPEATS",
    "AdaptedWeight",
    "Adapter",
    "AdapterConfig",
    "AdapterLayout",
    "FactorKeys",
    "InspectReport",
    "LayerSettings",
    "ModuleReport",
    "adapted_weights",
    "check_adapter",
    "check_regex_is_safe",
    "delta_weight",
    "dora_rescale",
    "inspect_adapter",
    "match_pattern_key",
    "match_target_modules",
    "merge_adapter",
    "parse_adapter_keys",
    "read_adapter",
    "row_norms",
    "update_norm",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

BIAS_MODES = ("none", "all", "lora_only")

# Fields that never change what a loaded adapter computes: bookkeeping, the
# training-only dropout, and initialization schemes (the weights are in the file).
IGNORED_FIELDS = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "init_lora_weights", "megatron_core", "runtime_config",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying",
    "exclude_modules", "qalora_group_size", "layers_pattern",
})  # fmt: skip
# Fields read and implemented here.
READ_FIELDS = frozenset({
    "peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "fan_in_fan_out", "bias",
    "modules_to_save", "rank_pattern", "alpha_pattern", "use_dora",
})  # fmt: skip
# PEFT's own refusals of DoRA (LoraConfig.__post_init__ and LoraLayer.resolve_lora_variant):
# these fields switched on beside use_dora make PEFT raise, whatever lowrank implements.
DORA_REFUSED_WITH = ("lora_bias", "megatron_config")
# LoRA variants PEFT's Linear combines with nothing (resolve_lora_variant: one variant per layer): the
# config fields tagged is_lora_variant, and init_lora_weights="mica" (MiCA, declared a variant there).
OTHER_VARIANTS = (
    "arrow_config", "use_bdlora", "alora_invocation_tokens", "velora_config", "monteclora_config", "kasa_config",
)  # fmt: skip
# Every other field must be off (None, False, "none", empty): each one, when on,
# changes the maths in a way lowrank does not implement (layers_to_transform,
# lora_bias, trainable tokens, ...), so it is refused by name rather than ignored.


def is_off(value: Any) -> bool:
    """Whether a config field's value means "switched off" (None, False, ``"none"``, empty list or map)."""
    return value is None or value is False or value == "none" or (isinstance(value, (list, dict)) and not value)


# ---------------------------------------------------------------- matching


def match_target_modules(target_modules: str | Iterable[str] | None, name: str) -> bool:
    r"""Whether the module called ``name`` matches PEFT's ``target_modules`` rule.

    The one matcher of the package, PEFT's ``check_target_module_exists``
    (``peft/tuners/tuners_utils.py``): a string is a regular expression that
    must match the whole name (``re.fullmatch``); a list matches a name equal
    to one of its entries or ending in ``"." + entry``.

    Parameters
    ----------
    target_modules : str, iterable of str, or None
        A string is a regular expression that must match the whole name,
        except ``"all-linear"``, which matches every layer (lowrank models
        have no output layer to exclude). A list (or other iterable) matches
        a name equal to one of its entries or ending in ``"." + entry``
        (``"fc"`` matches ``"block.0.fc"``, not ``"block.0.fc2"``). None
        matches every layer (lowrank has no per-architecture defaults).
    name : str
        The layer's dotted name (``""`` for the model itself).

    Returns
    -------
    bool

    Raises
    ------
    TypeError
        ``target_modules`` is not None, a str or an iterable of str, or
        ``name`` is not a str.
    ValueError
        ``target_modules`` is a string that is not a valid regular expression.

    Examples
    --------
    >>> match_target_modules(["q", "v"], "layers.0.attn.q")
    True
    >>> match_target_modules(r"layers\.\d+\.attn\.(q|v)", "layers.0.attn.k")
    False
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a module name (str), got {type(name).__name__} {name!r}")
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        try:
            return re.fullmatch(target_modules, name) is not None
        except re.error as exc:
            raise ValueError(
                f"target_modules must be a valid regular expression, got {target_modules!r}: {exc}"
            ) from None
    if isinstance(target_modules, bytes) or not isinstance(target_modules, Iterable):
        raise TypeError(
            f"target_modules must be None, a str or a list of str, got {type(target_modules).__name__} "
            f"{target_modules!r}"
        )
    entries = list(target_modules)
    bad = [t for t in entries if not isinstance(t, str)]
    if bad:
        raise TypeError(f"target_modules must hold module names (str), got {bad!r}")
    return any(name == t or name.endswith(f".{t}") for t in entries)


def match_pattern_key(pattern_keys: Iterable[str], name: str) -> str | None:
    r"""The key of ``rank_pattern`` / ``alpha_pattern`` that applies to module ``name``, or None.

    PEFT's ``get_pattern_key`` (``peft/utils/other.py``), called by
    ``LoraModel._create_and_replace``: each key is a regular expression, and
    it applies when ``re.match(rf"(.*\.)?({key})$", name)`` matches, that is
    when the key matches the whole name or a dotted suffix of it. The keys are
    tried in their order in the file and the *first* that matches wins (not
    the longest): with ``{"attn.c_attn": 2, "h.1.attn.c_attn": 4}``, layer
    ``transformer.h.1.attn.c_attn`` gets ``r=2``.

    Parameters
    ----------
    pattern_keys : iterable of str
        The pattern's keys, in file order (valid regular expressions).
    name : str
        The module's dotted name.

    Returns
    -------
    str or None
        The first matching key. Where PEFT's function returns ``name``
        itself for no match, and then looks ``name`` up in the pattern, this
        returns ``name`` when it is a key of its own (a key that does not
        match itself as a regular expression, such as ``"h[0]"``), else None.

    Examples
    --------
    >>> match_pattern_key(["c_attn", "h.1.attn.c_attn"], "transformer.h.1.attn.c_attn")
    'c_attn'
    >>> match_pattern_key(["h.1.attn.c_attn"], "transformer.h.11.attn.c_attn") is None
    True
    """
    keys = list(pattern_keys)
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name if name in keys else None


# ---------------------------------------------------------------- the config


@dataclass(frozen=True)
class LayerSettings:
    """One adapted layer's LoRA settings, after ``rank_pattern`` and ``alpha_pattern``.

    Attributes
    ----------
    r : int
    alpha : float
    use_rslora : bool
    """

    r: int
    alpha: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        """The factor of ``B @ A``: :func:`lora_scaling` of this layer's settings."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA's factor of ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    The one statement of the rule (PEFT's ``LoraLayer.update_layer``;
    rsLoRA: Kalajdzievski, 2023), used by :class:`lowrank.nn.LoRALinear`,
    the adapter tools and the reference cases.

    Parameters
    ----------
    alpha : float
    r : int
        The rank, ``>= 1`` (checked by the callers).
    use_rslora : bool, default False

    Returns
    -------
    float

    Examples
    --------
    >>> lora_scaling(16, 8), lora_scaling(16, 4, use_rslora=True)
    (2.0, 8.0)
    """
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ---------------------------------------------------------------- hostile regular expressions

# A regular expression in a file (target_modules, the keys of rank_pattern and alpha_pattern)
# runs in Python's backtracking engine, where a repeated group that can match one text in
# several ways ("(a*)*b", "(a|a)*") takes time exponential in the name's length: 9.5 s for a
# 28-character name, doubling per character. Such patterns are refused before any match, and
# the number of unbounded repeats is capped: k of them in sequence (".*a.*b.*c") cost up to
# n**k steps per name.
MAX_UNBOUNDED_REPEATS = 3


def check_regex_is_safe(pattern: str, what: str) -> None:
    r"""Refuse a regular expression that may backtrack exponentially or take polynomial time of high degree.

    A static check, conservative on purpose: a repeated group (``*``, ``+``,
    ``{m,n}``) that itself contains a repeat or an alternation (``(a*)*``,
    ``(a+)+``, ``(a|b)*``, ``(?:x?)+``) is refused, and so is a pattern with
    more than ``MAX_UNBOUNDED_REPEATS`` (3) unbounded repeats. PEFT's usual
    patterns (``.*\.(q_proj|v_proj)``, ``layers\.\d+\.attn\.(q|v)``) pass.
    Each refused pattern has an equivalent that passes (list the names, or
    repeat a character class instead of a group).

    Parameters
    ----------
    pattern : str
        A pattern that compiles.
    what : str
        What the pattern is, named in the message (``"target_modules"``).

    Raises
    ------
    ValueError
        One line naming ``what``, the rule and the pattern.
    """
    stack: list[bool] = []  # one entry per open group: does it hold a repeat or an alternation?
    closed_risky = False  # the atom just before this character is a group that does
    unbounded = 0
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        atom_is_risky_group = False
        if c == "\\":
            i += 2
        elif c == "[":  # a character class: nothing inside repeats or alternates
            j = i + 1
            j += pattern[j : j + 1] == "^"
            j += pattern[j : j + 1] == "]"  # a leading "]" is a literal
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
        elif c == "(":
            stack.append(False)
            i += 1
            if pattern[i : i + 1] == "?":  # (?:  (?P<name>  (?=  ...: that "?" is no repeat
                i += 1
        elif c == ")":
            atom_is_risky_group = stack.pop() if stack else False
            i += 1
        elif c == "|":
            stack[:] = [True] * len(stack)
            i += 1
        elif c in "*+?{":
            end = pattern.find("}", i) if c == "{" else i
            if c == "{" and (end < 0 or not _is_repeat_count(pattern[i + 1 : end])):
                i += 1  # a literal "{"
                closed_risky = False
                continue
            body = pattern[i + 1 : end] if c == "{" else ""
            repeats = c in "*+" or (c == "{" and body != "0" and body != "1" and body not in ("0,1", "1,1"))
            if c in "*+" or (c == "{" and body.endswith(",")):
                unbounded += 1
            if repeats and closed_risky:
                raise ValueError(
                    f"{what} {pattern!r} repeats a group that itself repeats or alternates (as in '(a*)*' or "
                    f"'(a|b)*'), which can take time exponential in the name's length; list the module names "
                    f"instead, or repeat a character class"
                )
            stack[:] = [True] * len(stack)  # every enclosing group now holds a repeat
            i = end + 1
            if pattern[i : i + 1] in ("?", "+"):  # lazy or possessive modifier
                i += 1
        else:
            i += 1
        closed_risky = atom_is_risky_group
    if unbounded > MAX_UNBOUNDED_REPEATS:
        raise ValueError(
            f"{what} {pattern!r} has {unbounded} unbounded repeats ('*', '+', '{{m,}}'), more than "
            f"{MAX_UNBOUNDED_REPEATS}: matching time grows as the name's length to that power; list the "
            f"module names instead"
        )


def _is_repeat_count(body: str) -> bool:
    """Whether ``body`` (between braces) is a repeat count: ``m``, ``m,``, ``,n`` or ``m,n``."""
    low, comma, high = body.partition(",")
    return bool(low or high) and (low.isdigit() or (bool(comma) and not low)) and (not high or high.isdigit())


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} must be a valid regular expression, got {pattern!r}: {exc}") from None
    check_regex_is_safe(pattern, what)


@dataclass(frozen=True, eq=True)
class AdapterConfig:
    """A PEFT ``LoraConfig`` as stored in ``adapter_config.json``, validated.

    Attributes
    ----------
    r : int
        The default rank, ``>= 1``.
    alpha : float
        The default ``lora_alpha``, ``> 0``.
    use_rslora : bool
        Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    dropout : float
        ``lora_dropout``, in ``[0, 1)`` (training only).
    target_modules : None, str or tuple of str
        See :func:`match_target_modules`.
    fan_in_fan_out : bool
        The base layers store their weight as ``(in, out)`` (GPT-2's
        ``Conv1D``): the weight update is ``(B @ A).T``.
    bias : {"none", "all", "lora_only"}
        Which base biases were trained and are saved in the adapter.
    modules_to_save : tuple of str
        Modules trained in full and saved whole (PEFT matches a module whose
        name ends with the entry, see :meth:`saves_module`).
    rank_pattern : dict from str to int
        Per-layer ranks, keys in file order (see :func:`match_pattern_key`).
    alpha_pattern : dict from str to float
        Per-layer alphas, likewise.
    use_dora : bool
        DoRA (PEFT's ``use_dora``): each adapted layer also has a magnitude
        ``m`` (``lora_magnitude_vector``), and its weight is
        ``(m / ‖V‖_row)[:, None] · V`` with ``V = W + scaling·B@A``.
    raw : dict
        The JSON object as read.
    """

    r: int
    alpha: float
    use_rslora: bool = False
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, obj: Any, where: PathLike = "adapter_config.json") -> AdapterConfig:
        """Validate a parsed ``adapter_config.json``.

        Parameters
        ----------
        obj : Any
            The parsed JSON.
        where : str or os.PathLike
            The file, named in every message.

        Returns
        -------
        AdapterConfig

        Raises
        ------
        ValueError
            One line naming ``where``, the field, the rule and the value: not
            a JSON object, ``peft_type`` not ``"LORA"``, a field of the wrong
            kind or out of range (``r`` an integer ``>= 1``, ``lora_alpha``
            ``> 0`` and finite, ``lora_dropout`` in ``[0, 1)``, the booleans,
            ``bias`` one of ``"none"``, ``"all"``, ``"lora_only"``, the
            patterns maps from valid regular expressions to such values,
            ``target_modules`` None, a valid regular expression or a list of
            str, ``modules_to_save`` None or a list of str), or any other
            field switched on (``layers_to_transform``, ``lora_bias``,
            ...), named; and ``use_dora`` beside a field PEFT refuses it with
            (``lora_bias``, ``megatron_config``, another LoRA variant).
        """
        if not isinstance(obj, dict):
            raise ValueError(f"{where} must hold a JSON object (PEFT's LoraConfig), got {type(obj).__name__}")
        peft_type = obj.get("peft_type")
        if peft_type != "LORA":
            raise ValueError(f"{where}: peft_type must be 'LORA' (only LoRA adapters are supported), got {peft_type!r}")
        if obj.get("use_dora") is True:  # PEFT's refusals first: they hold whatever lowrank implements
            clash = [f"{k}={obj[k]!r}" for k in DORA_REFUSED_WITH + OTHER_VARIANTS if not is_off(obj.get(k))]
            if obj.get("init_lora_weights") == "mica":
                clash.append("init_lora_weights='mica'")
            if clash:
                raise ValueError(
                    f"{where}: use_dora=True with {', '.join(clash)}: PEFT refuses DoRA together with "
                    f"{'that setting' if len(clash) == 1 else 'those settings'} (LoraConfig and "
                    f"resolve_lora_variant raise), so no PEFT adapter has it"
                )
        unsupported = [
            f"{k}={obj[k]!r}" for k in sorted(obj) if k not in IGNORED_FIELDS | READ_FIELDS and not is_off(obj[k])
        ]
        if unsupported:
            raise ValueError(
                f"{where}: unsupported PEFT setting(s) {', '.join(unsupported)}: each changes what the adapter "
                f"computes and lowrank implements (rs)LoRA and DoRA only; refusing rather than ignoring them"
            )
        try:  # in a file every fault is a ValueError, whatever the helper's kind
            r = check_int(obj.get("r"), "r", low=1)
            alpha = check_real(obj.get("lora_alpha", 8), "lora_alpha", 0.0, low_open=True)
            dropout = check_real(obj.get("lora_dropout", 0.0), "lora_dropout", 0.0, 1.0, high_open=True)
            use_rslora = check_bool(obj.get("use_rslora", False), "use_rslora")
            use_dora = check_bool(obj.get("use_dora", False), "use_dora")
            fan_in_fan_out = check_bool(obj.get("fan_in_fan_out", False), "fan_in_fan_out")
            bias = check_choice(obj.get("bias", "none"), "bias", BIAS_MODES)
            targets = obj.get("target_modules")
            if isinstance(targets, list):
                targets = tuple(targets)
            match_target_modules(targets, "")  # refuses the wrong kind or an invalid regular expression
            if isinstance(targets, str):  # before any name of the file is matched: it could hang the matcher
                check_regex_is_safe(targets, "target_modules")
            if targets is not None and not isinstance(targets, (str, tuple)):
                raise TypeError(f"target_modules must be None, a str or a list of str, got {targets!r}")
            saved = obj.get("modules_to_save")
            if saved is None:
                saved = []
            if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
                raise TypeError(f"modules_to_save must be None or a list of module names (str), got {saved!r}")
            rank_pattern = _check_pattern(obj.get("rank_pattern"), "rank_pattern", lambda v, n: check_int(v, n, low=1))
            alpha_pattern = _check_pattern(
                obj.get("alpha_pattern"), "alpha_pattern", lambda v, n: check_real(v, n, 0.0, low_open=True)
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        return cls(
            r=r,
            alpha=alpha,
            use_rslora=use_rslora,
            dropout=dropout,
            target_modules=targets,
            fan_in_fan_out=fan_in_fan_out,
            bias=bias,
            modules_to_save=tuple(saved),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_dora=use_dora,
            raw=dict(obj),
        )

    def settings_for(self, name: str) -> LayerSettings:
        """The rank, alpha and rsLoRA switch of the layer called ``name``, as PEFT resolves them.

        ``r = rank_pattern[key]`` for the first key of ``rank_pattern`` that
        matches (see :func:`match_pattern_key`), else ``r``; ``alpha``
        likewise from ``alpha_pattern``, independently (PEFT's
        ``LoraModel._create_and_replace``).

        Parameters
        ----------
        name : str
            The module's dotted name in the base model.

        Returns
        -------
        LayerSettings
        """
        r_key = match_pattern_key(self.rank_pattern, name)
        alpha_key = match_pattern_key(self.alpha_pattern, name)
        r = self.r if r_key is None else self.rank_pattern[r_key]
        alpha = self.alpha if alpha_key is None else self.alpha_pattern[alpha_key]
        return LayerSettings(r=r, alpha=alpha, use_rslora=self.use_rslora)

    def matches(self, name: str) -> bool:
        """Whether ``target_modules`` selects the module called ``name`` (:func:`match_target_modules`)."""
        return match_target_modules(self.target_modules, name)

    def saves_module(self, name: str) -> bool:
        """Whether ``name`` or a module above it is in ``modules_to_save``.

        PEFT's ``_set_trainable`` (``peft/utils/other.py``) wraps every module
        whose name *ends with* an entry, as a plain string suffix (``"score"``
        matches ``"score"`` and ``"model.score"``); a tensor belongs to it when
        it lies at or under that module.

        Parameters
        ----------
        name : str
            A dotted module name, or a tensor's state-dict key.

        Returns
        -------
        bool
        """
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(p.endswith(m) for p in prefixes for m in self.modules_to_save)

    def to_json(self) -> dict[str, Any]:
        """The config as PEFT's ``LoraConfig`` fields, for ``adapter_config.json``.

        The inverse of :meth:`from_json` for the fields read here:
        ``AdapterConfig.from_json(c.to_json()) == c``. The other fields are
        written as PEFT writes them off (``layers_to_transform null``, ...), and
        ``init_lora_weights true`` so PEFT does not re-initialize anything.

        Returns
        -------
        dict
        """
        targets = list(self.target_modules) if isinstance(self.target_modules, tuple) else self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "target_modules": targets,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": self.bias,
            "modules_to_save": list(self.modules_to_save) or None,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_dora": self.use_dora,
        }


def _check_pattern(pattern: Any, what: str, check: Any) -> dict[str, Any]:
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise TypeError(f"{what} must be a map from module-name patterns to values, got {pattern!r}")
    checked = {}
    for key, value in pattern.items():  # file order: the first matching key wins
        _check_regex(key, f"{what} key")
        checked[key] = check(value, f"{what}[{key!r}]")
    return checked


# ---------------------------------------------------------------- the key grammar

_FACTOR_KEY = re.compile(r"^(?:(.*)\.)?lora_([AB])\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?:(.*)\.)?lora_embedding_([AB])$")
# PEFT saves DoRA's magnitude without ".weight" (LoraModel._get_adapter_state_dict strips it) and
# loads it with or without (_remap_adapter_state_dict_for_load appends it when missing).
_MAGNITUDE_KEY = re.compile(r"^(?:(.*)\.)?lora_magnitude_vector(?:\.weight)?$")
MAGNITUDE_SUFFIX = "lora_magnitude_vector"


@dataclass(frozen=True)
class FactorKeys:
    """The file keys of one adapted module's factors.

    Attributes
    ----------
    name : str
        The module's dotted name in the base model (``""`` for the model itself).
    embedding : bool
        An Embedding (``lora_embedding_A/B``, update ``(B @ A).T``), not a
        Linear/Conv1D (``lora_A/B.weight``).
    A, B : str or None
        The keys in the file; None when the file lacks that factor.
    magnitude : str or None
        The key of DoRA's magnitude ``m`` (``<name>.lora_magnitude_vector``),
        None when the file has none.
    """

    name: str
    embedding: bool
    A: str | None
    B: str | None
    magnitude: str | None = None


@dataclass(frozen=True)
class AdapterLayout:
    """An adapter file's keys, sorted into what they hold.

    Attributes
    ----------
    factors : dict from str to FactorKeys
        Each adapted module's factor keys, by module name.
    full : dict from str to str
        Full tensors (trained biases, ``modules_to_save``): the base
        state-dict key each replaces -> its key in the file.
    unknown : tuple of str
        Keys in none of PEFT's forms for a LoRA adapter (not under
        ``base_model.model.``, or another ``lora_*`` tensor).
    """

    factors: dict[str, FactorKeys]
    full: dict[str, str]
    unknown: tuple[str, ...]


def parse_adapter_keys(keys: Iterable[str]) -> AdapterLayout:
    """Sort an adapter file's tensor keys by PEFT's key grammar (see the module docstring).

    Parameters
    ----------
    keys : iterable of str

    Returns
    -------
    AdapterLayout
        Nothing is refused here: :func:`inspect_adapter` reports what does
        not fit, and the merge refuses it.
    """
    found: dict[str, dict[str, Any]] = {}
    full: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        if not key.startswith(KEY_PREFIX):
            unknown.append(key)
            continue
        rest = key[len(KEY_PREFIX) :]
        match = _FACTOR_KEY.match(rest) or _EMBEDDING_KEY.match(rest)
        magnitude = _MAGNITUDE_KEY.match(rest)
        if match is not None:
            name, factor = match.group(1) or "", match.group(2)
            entry = found.setdefault(name, {})
            embedding = entry.setdefault("embedding", match.re is _EMBEDDING_KEY)
            if embedding != (match.re is _EMBEDDING_KEY) or factor in entry:
                unknown.append(key)  # a module with both kinds of factor, or a factor twice
                continue
            entry[factor] = key
        elif magnitude is not None:
            entry = found.setdefault(magnitude.group(1) or "", {})
            if "magnitude" in entry:
                unknown.append(key)  # the magnitude twice, with and without ".weight"
                continue
            entry["magnitude"] = key
        elif re.search(r"(^|\.)lora_", rest):
            unknown.append(key)  # another LoRA variant's tensor (lora_B.bias, AdaLoRA's lora_E, ...)
        else:
            full[rest.replace(".base_layer.", ".")] = key
    factors = {
        name: FactorKeys(
            name=name,
            embedding=entry.get("embedding", False),
            A=entry.get("A"),
            B=entry.get("B"),
            magnitude=entry.get("magnitude"),
        )
        for name, entry in found.items()
    }
    return AdapterLayout(factors=factors, full=full, unknown=tuple(unknown))


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Adapter:
    """An adapter folder, read.

    Attributes
    ----------
    path : pathlib.Path
        The folder.
    config : AdapterConfig
    tensors : dict from str to ndarray
        Keyed as in the file.
    dtypes : dict from str to str
        Each tensor's dtype as stored (``"BF16"``, ``"F16"``, ``"F32"``, ...).
    metadata : dict from str to str
        The weights file's ``__metadata__``.
    layout : AdapterLayout
        The keys sorted by :func:`parse_adapter_keys`.
    """

    path: Path
    config: AdapterConfig
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    layout: AdapterLayout


READ_DTYPES = (None, "keep", "float32", "float64")


def read_adapter(path: PathLike, *, dtype: str | None = None) -> Adapter:
    """Read a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) with NumPy alone.

    Parameters
    ----------
    path : str or os.PathLike
        The folder.
    dtype : {None, "keep", "float32", "float64"}, default None
        The arrays' float dtype. None or ``"float32"``: BF16 and F16
        tensors become float32 (exactly), F32 and F64 stay. ``"keep"``: F16
        stays float16 (BF16 still becomes float32: NumPy has no bfloat16).
        ``"float64"``: every float tensor becomes float64 (exactly).

    Returns
    -------
    Adapter

    Raises
    ------
    FileNotFoundError
        A missing folder, config or weights file.
    ValueError
        An invalid config (:meth:`AdapterConfig.from_json`), a weights file
        that is not valid safetensors, or a folder holding only the pickled
        ``adapter_model.bin`` (never loaded: unpickling runs code).
    """
    if dtype not in READ_DTYPES:
        raise ValueError(f"dtype must be one of None, 'keep', 'float32', 'float64', got {dtype!r}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such adapter folder: {folder}")
    config_path, weights_path = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file() and (folder / PICKLED_WEIGHTS_NAME).is_file():
        raise ValueError(
            f"{folder / PICKLED_WEIGHTS_NAME} is a pickle file, which lowrank never loads (unpickling can run "
            f"any code); convert it once where torch is trusted: safetensors.torch.save_file(torch.load(bin, "
            f"weights_only=True), '{ADAPTER_WEIGHTS_NAME}'), or PeftModel.save_pretrained(dir, safe_serialization=True)"
        )
    config = AdapterConfig.from_json(load_json(config_path), config_path)
    header = read_safetensors_header(weights_path)
    tensors = read_safetensors(weights_path)
    for key, arr in tensors.items():
        if arr.dtype.kind != "f":
            continue
        if dtype == "float64":
            tensors[key] = arr.astype(np.float64)
        elif dtype != "keep" and arr.dtype == np.float16:
            tensors[key] = arr.astype(np.float32)
    return Adapter(
        path=folder,
        config=config,
        tensors=tensors,
        dtypes={key: info.dtype for key, info in header.tensors.items()},
        metadata=dict(header.metadata),
        layout=parse_adapter_keys(tensors),
    )


# ---------------------------------------------------------------- inspect


@dataclass(frozen=True)
class ModuleReport:
    """What :func:`inspect_adapter` found for one adapted module.

    Attributes
    ----------
    name : str
        The module's dotted name.
    embedding : bool
        An Embedding adapter (``lora_embedding_A/B``).
    r, alpha, scaling : int, float, float
        From the config, after ``rank_pattern`` / ``alpha_pattern``
        (:meth:`AdapterConfig.settings_for`).
    shape_A, shape_B : tuple of int or None
        As stored; None when the file lacks the factor.
    dtype : str
        The stored dtype (``"BF16"``, ``"F32"``, ...; ``"F32/BF16"`` when A
        and B differ).
    norm : float or None
        ``‖scaling·B·A‖_F``, computed in float64 without forming ``B @ A``;
        None when the factors do not fit together.
    b_zero : bool
        B is all zeros: a LoRA adapter changes nothing (a fresh, untrained
        adapter); a DoRA adapter still rescales each row by ``m / ‖W‖_row``.
    shape_magnitude : tuple of int or None
        DoRA's magnitude as stored; None when the file has none.
    """

    name: str
    embedding: bool
    r: int
    alpha: float
    scaling: float
    shape_A: tuple[int, ...] | None
    shape_B: tuple[int, ...] | None
    dtype: str
    norm: float | None
    b_zero: bool
    shape_magnitude: tuple[int, ...] | None = None


@dataclass(frozen=True)
class InspectReport:
    """The result of :func:`inspect_adapter`.

    Attributes
    ----------
    path : pathlib.Path
        The adapter folder.
    config : AdapterConfig
    modules : list of ModuleReport
        One per adapted module, sorted by name.
    full : dict from str to str
        Full tensors the adapter replaces (trained biases, ``modules_to_save``):
        base state-dict key -> file key.
    problems : list of str
        One line each; empty when the folder is consistent.
    """

    path: Path
    config: AdapterConfig
    modules: list[ModuleReport]
    full: dict[str, str]
    problems: list[str]

    @property
    def passed(self) -> bool:
        """No problem found."""
        return not self.problems

    def format(self) -> str:
        """A table of the adapted modules, then the problems (one per line) and a verdict line.

        Returns
        -------
        str
        """
        rows: list[tuple[str, ...]] = [
            ("module", "r", "alpha", "scaling", "A", "B", "dtype", "|scaling*B@A|_F", "B==0")
        ]
        for m in self.modules:
            rows.append((
                m.name or "<the model itself>",
                str(m.r),
                f"{m.alpha:g}",
                f"{m.scaling:.6g}",
                "missing" if m.shape_A is None else "x".join(map(str, m.shape_A)),
                "missing" if m.shape_B is None else "x".join(map(str, m.shape_B)),
                m.dtype,
                "-" if m.norm is None else f"{m.norm:.6g}",
                "yes" if m.b_zero else "no",
            ))  # fmt: skip
        if self.config.use_dora or any(m.shape_magnitude is not None for m in self.modules):
            shapes = ["missing" if m.shape_magnitude is None else "x".join(map(str, m.shape_magnitude))
                      for m in self.modules]  # fmt: skip
            rows = [(*row, shape) for row, shape in zip(rows, ["m", *shapes], strict=True)]  # DoRA's magnitude
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        c = self.config
        rule = "alpha/sqrt(r) (rsLoRA)" if c.use_rslora else "alpha/r"
        lines.insert(0, f"{self.path}: r={c.r} lora_alpha={c.alpha:g} scaling={rule} "
                        f"fan_in_fan_out={c.fan_in_fan_out} bias={c.bias}"
                        + (" use_dora=True" if c.use_dora else ""))  # fmt: skip
        if self.full:
            lines.append(f"full tensors replaced in the base: {', '.join(sorted(self.full))}")
        lines += [f"problem: {p}" for p in self.problems]
        verdict = "consistent" if self.passed else f"{len(self.problems)} problem(s)"
        lines.append(f"{len(self.modules)} adapted module(s), {verdict}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready object.

        Returns
        -------
        dict
        """
        return {
            "path": str(self.path),
            "passed": self.passed,
            "config": self.config.to_json(),
            "modules": [
                {
                    "name": m.name,
                    "embedding": m.embedding,
                    "r": m.r,
                    "alpha": m.alpha,
                    "scaling": m.scaling,
                    "shape_A": None if m.shape_A is None else list(m.shape_A),
                    "shape_B": None if m.shape_B is None else list(m.shape_B),
                    "dtype": m.dtype,
                    "norm": m.norm,
                    "b_zero": m.b_zero,
                    "shape_magnitude": None if m.shape_magnitude is None else list(m.shape_magnitude),
                }
                for m in self.modules
            ],
            "full": dict(self.full),
            "problems": list(self.problems),
        }


def update_norm(A: np.ndarray, B: np.ndarray, scaling: float) -> float:
    """``‖scaling·B·A‖_F`` in float64, without forming the ``(out, in)`` product.

    ``‖BA‖_F² = trace(AᵀBᵀBA) = trace((BᵀB)(AAᵀ))``, a product of two
    ``(r, r)`` matrices: ``O((out + in)·r²)`` work instead of ``O(out·in·r)``.

    Parameters
    ----------
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    scaling : float

    Returns
    -------
    float
    """
    A64, B64 = np.asarray(A, np.float64), np.asarray(B, np.float64)
    a = float(np.max(np.abs(A64))) if A64.size else 0.0
    b = float(np.max(np.abs(B64))) if B64.size else 0.0
    if a == 0.0 or b == 0.0:
        return 0.0
    A64, B64 = A64 / a, B64 / b  # entries in [-1, 1]: the Gram products neither overflow nor underflow
    gram_B = B64.T @ B64  # (r, r)
    gram_A = A64 @ A64.T  # (r, r)
    squared = float(np.sum(gram_B * gram_A))  # trace(XY) = sum(X * Yᵀ), and gram_A is symmetric
    return abs(scaling) * a * b * math.sqrt(max(squared, 0.0))  # Python floats: inf past float64, no warning


def _shown(name: str) -> str:
    return repr(name) if name else "<the model itself>"


def _dora_problems(
    name: str, use_dora: bool, A: np.ndarray | None, B: np.ndarray | None, M: np.ndarray | None, what: str
) -> list[str]:
    """The problems of one module's DoRA magnitude ``M`` (None: absent) against the config and its ``B``."""
    shown = _shown(name)
    if A is None and B is None:
        return [f"module {shown} has {MAGNITUDE_SUFFIX} but no {what}A nor {what}B"]
    if M is None:
        return [f"module {shown} has no {MAGNITUDE_SUFFIX}, which use_dora=True needs"] if use_dora else []
    problems = []
    if not use_dora:
        problems.append(
            f"module {shown} has {MAGNITUDE_SUFFIX}, but the config's use_dora is false: PEFT would load it as "
            f"plain LoRA and ignore the magnitude"
        )
    if B is not None and B.ndim == 2 and M.shape != (B.shape[0],):
        problems.append(
            f"module {shown}: {MAGNITUDE_SUFFIX} has shape {M.shape}, but DoRA needs one value per row of "
            f"{what}B, shape ({B.shape[0]},)"
        )
    return problems


def check_adapter(adapter: Adapter) -> tuple[list[ModuleReport], list[str]]:
    """The per-module reports and the problems of an adapter that was read.

    The checks of :func:`inspect_adapter`, for a caller holding an
    :class:`Adapter` already (:func:`merge_adapter` refuses any problem).

    Parameters
    ----------
    adapter : Adapter

    Returns
    -------
    tuple of (list of ModuleReport, list of str)
    """
    config, tensors, layout = adapter.config, adapter.tensors, adapter.layout
    problems: list[str] = []
    for key in layout.unknown:
        problems.append(f"key {key!r} is not a LoRA tensor in PEFT's form (base_model.model.<name>.lora_A.weight, ...)")
    for key, arr in tensors.items():
        if arr.size == 0:
            problems.append(f"tensor {key!r} is empty (shape {arr.shape}): the adapter was saved without its weights")
        elif arr.dtype.kind == "f" and not np.isfinite(arr).all():
            problems.append(f"tensor {key!r} holds non-finite values ({int(np.sum(~np.isfinite(arr)))} of {arr.size})")
    modules = []
    for name in sorted(layout.factors):
        keys = layout.factors[name]
        settings = config.settings_for(name)
        A = None if keys.A is None else tensors[keys.A]
        B = None if keys.B is None else tensors[keys.B]
        what = "lora_embedding_" if keys.embedding else "lora_"
        M = None if keys.magnitude is None else tensors[keys.magnitude]
        problems += _dora_problems(name, config.use_dora, A, B, M, what)
        for factor, present, other in (("A", A, "B"), ("B", B, "A")):
            if present is None and (A is not None or B is not None):
                problems.append(f"module {_shown(name)} has {what}{other} but no {what}{factor}")
        if not config.matches(name):
            problems.append(f"module {_shown(name)} does not match target_modules {config.target_modules!r}")
        fits = A is not None and B is not None and A.ndim == 2 and B.ndim == 2 and A.shape[0] == B.shape[1]
        if A is not None and B is not None and not fits:
            problems.append(
                f"module {_shown(name)}: {what}A must be (r, in) and {what}B (out, r) with the same r, "
                f"got {A.shape} and {B.shape}"
            )
        for factor, stored_arr, axis in (("A", A, 0), ("B", B, 1)):
            if stored_arr is not None and stored_arr.ndim == 2 and stored_arr.shape[axis] != settings.r:
                source = "rank_pattern" if match_pattern_key(config.rank_pattern, name) is not None else "r"
                problems.append(
                    f"module {_shown(name)}: {what}{factor} has shape {stored_arr.shape}, whose rank "
                    f"{stored_arr.shape[axis]} "
                    f"disagrees with the config's {source} = {settings.r}"
                )
        ok = A is not None and B is not None and fits and A.size > 0 and B.size > 0
        ok = ok and A is not None and B is not None and bool(np.isfinite(A).all() and np.isfinite(B).all())
        stored = sorted({adapter.dtypes[k] for k in (keys.A, keys.B) if k is not None})
        modules.append(
            ModuleReport(
                name=name,
                embedding=keys.embedding,
                r=settings.r,
                alpha=settings.alpha,
                scaling=settings.scaling,
                shape_A=None if A is None else A.shape,
                shape_B=None if B is None else B.shape,
                dtype="/".join(stored),
                norm=update_norm(A, B, settings.scaling) if ok and A is not None and B is not None else None,
                b_zero=B is not None and not np.any(B),
                shape_magnitude=None if M is None else M.shape,
            )
        )
    for base_key, key in layout.full.items():
        module = base_key.rpartition(".")[0]
        if config.saves_module(base_key):
            continue
        if base_key.endswith(".bias") and config.bias == "all":
            continue
        if base_key.endswith(".bias") and config.bias == "lora_only" and module in layout.factors:
            continue
        problems.append(
            f"tensor {key!r} is neither a LoRA factor, a bias the config trains (bias={config.bias!r}) "
            f"nor in modules_to_save {list(config.modules_to_save)!r}"
        )
    if not layout.factors and not layout.full:
        problems.append("the weights file holds no LoRA factor")
    return modules, problems


def inspect_adapter(path: PathLike) -> InspectReport:
    """Check a PEFT adapter folder for consistency, and describe each adapted module, without a model.

    For each adapted module: its r, alpha and scaling (from the config,
    rsLoRA aware, after ``rank_pattern`` / ``alpha_pattern``), the shapes and
    stored dtype of A and B, ``‖scaling·B·A‖_F`` and whether B is all zeros.
    The problems found, one line each: factor shapes that disagree with the
    config's r (or its ``rank_pattern``) or with each other, empty tensors,
    modules that ``target_modules`` does not select, an A without its B or a
    B without its A, non-finite values, keys in no PEFT form, DoRA's
    magnitude (``lora_magnitude_vector``) missing under ``use_dora``,
    present without it, or of another shape than ``(out,)``, and full
    tensors that neither the ``bias`` setting nor ``modules_to_save``
    explains.

    Parameters
    ----------
    path : str or os.PathLike
        The adapter folder.

    Returns
    -------
    InspectReport

    Raises
    ------
    FileNotFoundError, ValueError
        The folder cannot be read (see :func:`read_adapter`): a missing
        file, an invalid config, a corrupt weights file, a pickle file.
    """
    adapter = read_adapter(path, dtype="float64")
    modules, problems = check_adapter(adapter)
    return InspectReport(
        path=adapter.path, config=adapter.config, modules=modules, full=dict(adapter.layout.full), problems=problems
    )


# ---------------------------------------------------------------- merge

MERGE_DTYPES = ("keep", "float32", "float16", "bfloat16")
_FORMAT_OF = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_FLOAT_FORMATS = ("F64", "F32", "F16", "BF16")
_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4,
    "BF16": 2, "F16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
# The safetensors package's write order (widest items first, then by name): every
# tensor starts aligned to its item size, so the merged file loads zero-copy.
_WRITE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL")
# Copies go through a buffer of this size: a tensor is never read whole to be copied.
_COPY_BYTES = 1 << 24


@dataclass(frozen=True)
class _Planned:
    """One tensor of the merged file: where its values come from, and how it is stored."""

    name: str
    stored: str  # the output's format dtype
    shape: tuple[int, ...]
    source: str  # "copy" (the base's bytes), "convert", "merge", "replace"


def delta_weight(A: np.ndarray, B: np.ndarray, scaling: float, *, transpose: bool) -> np.ndarray:
    """``scaling·(B @ A)`` in float64, or its transpose (``fan_in_fan_out``, embeddings).

    Parameters
    ----------
    A : ndarray, shape (r, in)
    B : ndarray, shape (out, r)
    scaling : float
    transpose : bool
        Return ``(in, out)``, for a base weight stored that way (GPT-2's
        ``Conv1D``, PEFT's ``fan_in_fan_out``; an Embedding's ``(num, dim)``).

    Returns
    -------
    ndarray of float64, shape (out, in) or (in, out)
    """
    delta = np.asarray(B, np.float64) @ np.asarray(A, np.float64)  # (out, in)
    delta *= scaling
    return delta.T if transpose else delta


def row_norms(V: np.ndarray, axis: int = 1) -> np.ndarray:
    """The Euclidean norm of each row (``axis=1``) or column (``axis=0``) of ``V``, without overflow.

    Each row is divided by its largest magnitude before squaring, so a norm
    is finite whenever it fits the dtype (``np.linalg.norm`` squares first:
    ``inf`` past ``sqrt(max)``, about 1.3e154 in float64).

    Parameters
    ----------
    V : ndarray of float, shape (out, in)
    axis : {1, 0}, default 1

    Returns
    -------
    ndarray, shape (out,) for ``axis=1``, (in,) for ``axis=0``
    """
    peak = np.max(np.abs(V), axis=axis, keepdims=True)  # (out, 1) or (1, in)
    peak[peak == 0] = 1.0  # an all-zero row: its norm is 0 either way
    scaled = V / peak  # (out, in): the one temporary; einsum squares and sums without another
    sums = np.einsum("ij,ij->i", scaled, scaled) if axis == 1 else np.einsum("ij,ij->j", scaled, scaled)
    with np.errstate(over="ignore"):  # a norm past the dtype: inf, for the caller to refuse
        return np.sqrt(sums) * peak.reshape(-1)


def dora_rescale(V: np.ndarray, magnitude: np.ndarray, *, transpose: bool) -> np.ndarray:
    """DoRA's merged weight ``W' = (m / ‖V‖_row)[:, None] · V``, for ``V = W + scaling·B@A``.

    PEFT's ``DoraLinearVariant.merge`` (and ``DoraEmbeddingVariant.merge``):
    the norm runs over each output feature's weights, the ``in`` axis, so
    ``m`` holds one value per output feature.

    Parameters
    ----------
    V : ndarray of float64, shape (out, in), or (in, out) when ``transpose``
        The LoRA-merged weight; it is not changed.
    magnitude : ndarray, shape (out,)
        DoRA's ``m``.
    transpose : bool
        ``V`` is stored ``(in, out)`` (``fan_in_fan_out``, an Embedding's
        ``(num_embeddings, embedding_dim)``): the norm runs down each
        column, and ``m`` scales columns.

    Returns
    -------
    ndarray of float64, the shape of ``V``

    Raises
    ------
    ValueError
        An output feature whose ``V`` is all zeros: ``m / 0`` has no value
        (PEFT adds no epsilon and would write ``inf`` or ``nan``).
    FloatingPointError
        A norm or a rescaled weight past float64.
    """
    axis = 0 if transpose else 1  # the "in" axis of V as stored
    norms = row_norms(V, axis)  # (out,)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(
            f"DoRA needs every output feature's weights W + scaling * B @ A to be nonzero, got an all-zero "
            f"{'column' if transpose else 'row'} {int(zero[0])} (norm 0): m / norm has no value"
        )
    factor = np.asarray(magnitude, np.float64) / norms  # (out,): m / ‖V‖_row
    with np.errstate(over="ignore", invalid="ignore"):  # checked right below
        merged = V * (factor[None, :] if transpose else factor[:, None])  # (out, in) or (in, out)
    if not np.isfinite(merged).all():
        raise FloatingPointError("DoRA's rescaled weight (m / norm) * (W + scaling * B @ A) is not finite in float64")
    return merged


def _round_to(values: np.ndarray, stored: str) -> np.ndarray:
    """float64 values rounded once to the format dtype ``stored``, as the bytes to write."""
    if stored == "BF16":
        return bfloat16_bits(values).astype("<u2", copy=False)  # nearest, ties to even, from float64 directly
    with np.errstate(over="ignore"):  # past the range: inf, checked by the caller
        return values.astype({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[stored])


def _values(arr: np.ndarray, stored: str) -> np.ndarray:
    """The values a tensor's bytes ``arr`` (from :func:`_round_to`) stand for."""
    return bfloat16_to_float32(arr) if stored == "BF16" else arr


def merge_adapter(base: PathLike, adapter_dir: PathLike, out: PathLike, *, dtype: str = "keep") -> Path:
    """Merge a PEFT LoRA adapter into a base weights file, without any model code.

    Every adapted weight ``W`` (the base tensor ``<name>.weight``) becomes
    ``W + scaling·B@A`` (``(B@A)ᵀ`` with ``fan_in_fan_out`` and for
    Embeddings), and with ``use_dora`` then ``(m / ‖V‖_row)·V`` for that
    ``V`` (:func:`dora_rescale`, the norm over the ``in`` axis), computed
    in float64 and rounded once to the output dtype;
    ``scaling`` is each layer's (rsLoRA, ``rank_pattern`` and
    ``alpha_pattern`` aware, :meth:`AdapterConfig.settings_for`). The
    tensors of ``modules_to_save`` and the trained biases (``bias="all"`` or
    ``"lora_only"``) replace the base's. Every other tensor is copied bit for
    bit when its dtype is kept. The output keeps the base's
    ``__metadata__`` and is written atomically: nothing appears under
    ``out`` unless the whole merge succeeded.

    Memory: the base is read one tensor at a time (copies go through a
    16 MiB buffer), so a merge holds the adapter, one adapted weight in
    float64 and its update.

    Parameters
    ----------
    base : str or os.PathLike
        A ``.safetensors`` file whose keys are the model's ``state_dict``
        keys (a transformers checkpoint: ``transformer.h.0.attn.c_attn.weight``).
    adapter_dir : str or os.PathLike
        The PEFT adapter folder; it must pass :func:`inspect_adapter`.
    out : str or os.PathLike
        The merged ``.safetensors`` file (its folder must exist; not ``base``).
    dtype : {"keep", "float32", "float16", "bfloat16"}, default "keep"
        The floating tensors' dtype in the output: ``"keep"`` keeps each
        base tensor's; otherwise every floating tensor is stored in that
        dtype (integer and bool tensors are kept).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    FileNotFoundError
        A missing base file, adapter folder or output folder.
    ValueError
        One line: an unknown ``dtype``, an adapter with a problem
        (:func:`inspect_adapter`), a base key missing, a shape that does not
        fit (naming both shapes, and whether ``fan_in_fan_out`` would fit),
        a base weight that is not floating or not finite, ``out`` equal to ``base``,
        a DoRA weight with an all-zero row (:func:`dora_rescale`).
    FloatingPointError
        A merged weight overflows the output dtype.
    """
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}")
    base, out = Path(base), Path(out)
    if not base.is_file():
        raise FileNotFoundError(f"no such base weights file: {base}")
    if out.exists() and out.resolve() == base.resolve():
        raise ValueError(f"out must not be the base file itself, got {out}")
    adapter = read_adapter(adapter_dir, dtype="float64")  # exact: every stored float is a float64
    _, problems = check_adapter(adapter)
    if problems:
        more = f" (and {len(problems) - 1} more: see 'lowrank adapter inspect')" if len(problems) > 1 else ""
        raise ValueError(f"{adapter.path}: cannot merge: {problems[0]}{more}")
    header = read_safetensors_header(base)
    deltas = _plan_deltas(adapter, header.tensors, base)
    magnitudes = {  # DoRA: base key -> m; check_adapter found one for each module, with use_dora on
        f"{name}.weight" if name else "weight": adapter.tensors[keys.magnitude]
        for name, keys in adapter.layout.factors.items()
        if keys.magnitude is not None
    }
    replaced = {}
    for base_key, key in adapter.layout.full.items():
        info = header.tensors.get(base_key)
        if info is None:
            raise ValueError(f"{base}: no tensor {base_key!r} for the adapter's {key!r} to replace")
        if tuple(info.shape) != adapter.tensors[key].shape:
            raise ValueError(
                f"{base}: tensor {base_key!r} has shape {tuple(info.shape)}, the adapter's {key!r} "
                f"{adapter.tensors[key].shape}"
            )
        replaced[base_key] = key

    plan = []
    for name, info in header.tensors.items():
        stored = info.dtype
        if dtype != "keep" and stored in _FLOAT_FORMATS:
            stored = _FORMAT_OF[dtype]
        source = "merge" if name in deltas else "replace" if name in replaced else "copy"
        if source == "copy" and stored != info.dtype:
            source = "convert"
        plan.append(_Planned(name=name, stored=stored, shape=tuple(info.shape), source=source))
    plan.sort(key=lambda p: (_WRITE_ORDER.index(p.stored), p.name))
    header_bytes = _header_json(plan, header.metadata)

    def write(f: IO[bytes]) -> None:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        with open(base, "rb", buffering=0) as src:
            buffer = bytearray(_COPY_BYTES)
            for p in plan:
                info = header.tensors[p.name]
                if p.source == "copy":  # the base's own bytes
                    src.seek(header.data_start + info.begin)
                    _copy_bytes(src, f, info.end - info.begin, buffer, base)
                    continue
                if p.source == "convert":  # chunk by chunk: never the whole tensor, nor its temporaries
                    src.seek(header.data_start + info.begin)
                    _convert_bytes(src, f, info, p, base)
                    continue
                if p.source == "replace":
                    values = adapter.tensors[replaced[p.name]]  # float64
                else:
                    values = read_safetensors(base, [p.name])[p.name]  # BF16 -> float32, exactly
                if p.source == "merge":
                    A, B, scaling, transpose = deltas[p.name]
                    values = values.astype(np.float64)  # (out, in), or (in, out) transposed
                    if not np.isfinite(values).all():
                        raise ValueError(
                            f"{base}: tensor {p.name!r} holds non-finite values: refusing to merge into it"
                        )
                    with np.errstate(over="ignore", invalid="ignore"):  # checked right below
                        values += delta_weight(A, B, scaling, transpose=transpose)
                    if not np.isfinite(values).all():
                        raise FloatingPointError(
                            f"merging into {p.name!r} overflows float64: W + scaling * B @ A is not finite "
                            f"(scaling {scaling:g})"
                        )
                    if p.name in magnitudes:  # DoRA: W' = (m / ‖V‖_row) V, V = W + scaling * B @ A
                        try:
                            values = dora_rescale(values, magnitudes[p.name], transpose=transpose)
                        except (ValueError, FloatingPointError) as exc:
                            raise type(exc)(f"{base}: merging into {p.name!r}: {exc}") from None
                stored = _round_to(values, p.stored) if values.dtype.kind == "f" else values
                if values.dtype.kind == "f" and np.any(~np.isfinite(_values(stored, p.stored)) & np.isfinite(values)):
                    raise FloatingPointError(
                        f"writing {p.name!r} as {p.stored} overflows: a value is past the largest {p.stored}"
                    )
                f.write(np.ascontiguousarray(stored).reshape(-1).data)

    return atomic_write(out, write)


@dataclass(frozen=True)
class AdaptedWeight:
    """One adapted Linear/Conv1D weight of a base file, with its adapter's factors (all float64).

    Attributes
    ----------
    name : str
        The module's dotted name.
    weight : ndarray of shape (out, in)
        The base weight, transposed from ``(in, out)`` for ``fan_in_fan_out``.
    A : ndarray of shape (r, in)
    B : ndarray of shape (out, r)
    scaling : float
    stored : str
        The base weight's dtype in the file (``"BF16"``, ``"F32"``, ...).
    """

    name: str
    weight: np.ndarray
    A: np.ndarray
    B: np.ndarray
    scaling: float
    stored: str


def adapted_weights(base: PathLike, adapter_dir: PathLike) -> Iterator[AdaptedWeight]:
    """Each adapted Linear/Conv1D weight of ``base`` with its factors, one at a time.

    The adapter is checked as :func:`merge_adapter` checks it (the same
    shape rules, fan_in_fan_out included); Embedding adapters are skipped
    (their forward is a lookup, not a product). Only one base weight is
    held at a time.

    Parameters
    ----------
    base : str or os.PathLike
        A ``.safetensors`` file of the model's ``state_dict``.
    adapter_dir : str or os.PathLike
        The PEFT adapter folder.

    Yields
    ------
    AdaptedWeight
        In the order of the module names.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`merge_adapter`, for the same problems; ValueError too for
        a DoRA adapter (``use_dora``), whose weights are not ``W + scaling·B@A``.
    """
    base = Path(base)
    if not base.is_file():
        raise FileNotFoundError(f"no such base weights file: {base}")
    adapter = read_adapter(adapter_dir, dtype="float64")
    if adapter.config.use_dora:
        raise ValueError(
            f"{adapter.path}: a DoRA adapter (use_dora): its weights are (m / ‖W + scaling·B@A‖) · (W + "
            f"scaling·B@A), not the LoRA weights W + scaling·B@A that adapted_weights gives"
        )
    _, problems = check_adapter(adapter)
    if problems:
        raise ValueError(f"{adapter.path}: {problems[0]}")
    header = read_safetensors_header(base)
    deltas = _plan_deltas(adapter, header.tensors, base)
    for name, keys in sorted(adapter.layout.factors.items()):
        base_key = f"{name}.weight" if name else "weight"
        if keys.embedding:
            continue
        A, B, scaling, transpose = deltas[base_key]
        weight = read_safetensors(base, [base_key])[base_key].astype(np.float64)
        yield AdaptedWeight(
            name=name,
            weight=weight.T if transpose else weight,
            A=A,
            B=B,
            scaling=scaling,
            stored=header.tensors[base_key].dtype,
        )


def _plan_deltas(
    adapter: Adapter, tensors: Mapping[str, TensorInfo], base: Path
) -> dict[str, tuple[np.ndarray, np.ndarray, float, bool]]:
    """Base key -> (A, B, scaling, transpose) for every adapted module, after checking each fits its base tensor."""
    config = adapter.config
    deltas = {}
    for name, keys in sorted(adapter.layout.factors.items()):
        assert keys.A is not None and keys.B is not None  # check_adapter found no problem
        A, B = adapter.tensors[keys.A], adapter.tensors[keys.B]
        base_key = f"{name}.weight" if name else "weight"
        info = tensors.get(base_key)
        if info is None:
            raise ValueError(f"{base}: no tensor {base_key!r} for the adapter's module {_shown(name)}")
        if info.dtype not in _FLOAT_FORMATS:
            raise ValueError(f"{base}: tensor {base_key!r} must be floating to merge into, got {info.dtype}")
        transpose = keys.embedding or config.fan_in_fan_out
        straight, flipped = (B.shape[0], A.shape[1]), (A.shape[1], B.shape[0])  # (out, in), (in, out)
        expected = flipped if transpose else straight
        shape = tuple(info.shape)
        if shape != expected:
            if keys.embedding:
                hint = "an Embedding's weight is (num_embeddings, embedding_dim)"
            elif shape == (flipped if not transpose else straight):
                hint = f"fan_in_fan_out={not config.fan_in_fan_out} would fit"
            else:
                hint = "fan_in_fan_out would not fit either"
            raise ValueError(
                f"{base}: tensor {base_key!r} has shape {shape}, but the adapter's module {_shown(name)} needs "
                f"{expected} (fan_in_fan_out={config.fan_in_fan_out}: A {A.shape}, B {B.shape}); {hint}"
            )
        deltas[base_key] = (A, B, config.settings_for(name).scaling, transpose)
    return deltas


def _header_json(plan: list[_Planned], metadata: Mapping[str, str]) -> bytes:
    """The merged file's header, as the safetensors package writes one: compact JSON padded to 8 bytes."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for p in plan:
        nbytes = math.prod(p.shape) * _ITEMSIZE[p.stored]
        header[p.name] = {"dtype": p.stored, "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8)


_NUMPY_OF = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
_CONVERT_ITEMS = 1 << 20  # elements per chunk when converting: 4 MiB of float32


def _convert_bytes(src: Any, dst: IO[bytes], info: TensorInfo, p: _Planned, path: Path) -> None:
    """Write the float tensor at ``src``'s position, stored as ``info.dtype``, as ``p.stored``, by chunks."""
    itemsize = _ITEMSIZE[info.dtype]
    left = math.prod(info.shape)
    while left:
        n = min(left, _CONVERT_ITEMS)
        raw = src.read(n * itemsize)
        if len(raw) != n * itemsize:
            raise ValueError(f"{path}: the file ended inside {p.name!r} (it changed while being merged)")
        values = np.frombuffer(raw, _NUMPY_OF[info.dtype])  # (n,)
        if info.dtype == "BF16":
            values = bfloat16_to_float32(values)  # exact
        stored = _round_to(values, p.stored)
        if np.any(~np.isfinite(_values(stored, p.stored)) & np.isfinite(values)):
            raise FloatingPointError(
                f"writing {p.name!r} as {p.stored} overflows: a value is past the largest {p.stored}"
            )
        dst.write(stored.data)
        left -= n


def _copy_bytes(src: Any, dst: IO[bytes], nbytes: int, buffer: bytearray, path: Path) -> None:
    view = memoryview(buffer)
    left = nbytes
    while left:
        got = src.readinto(view[: min(left, len(view))])
        if not got:
            raise ValueError(f"{path}: the file ended inside a tensor (it changed while being merged)")
        dst.write(view[:got])
        left -= got
