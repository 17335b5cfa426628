"""PEFT LoRA adapter folders, read with NumPy alone and without any model.

A PEFT LoRA adapter is a folder with two files::

    adapter_config.json        LoraConfig's fields (r, lora_alpha, target_modules, ...)
    adapter_model.safetensors  the trained tensors, named as PEFT saves them:
        base_model.model.<name>.lora_A.weight        (r, in)     a Linear or Conv1D layer
        base_model.model.<name>.lora_B.weight        (out, r)
        base_model.model.<name>.lora_embedding_A     (r, num_embeddings)   an Embedding
        base_model.model.<name>.lora_embedding_B     (embedding_dim, r)
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

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowrank.io.files import PathLike, load_json
from lowrank.io.safetensors import read_safetensors, read_safetensors_header
from lowrank.utils.validation import check_bool, check_choice, check_int, check_real

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "Adapter",
    "AdapterConfig",
    "AdapterLayout",
    "FactorKeys",
    "LayerSettings",
    "match_pattern_key",
    "match_target_modules",
    "parse_adapter_keys",
    "read_adapter",
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
    "modules_to_save", "rank_pattern", "alpha_pattern",
})  # fmt: skip
# Every other field must be off (None, False, "none", empty): each one, when on,
# changes the maths in a way lowrank does not implement (DoRA, layers_to_transform,
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
        """The factor of ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (PEFT's ``update_layer``)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} must be a valid regular expression, got {pattern!r}: {exc}") from None


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
            field switched on (``use_dora``, ``layers_to_transform``,
            ``lora_bias``, ...), named.
        """
        if not isinstance(obj, dict):
            raise ValueError(f"{where} must hold a JSON object (PEFT's LoraConfig), got {type(obj).__name__}")
        peft_type = obj.get("peft_type")
        if peft_type != "LORA":
            raise ValueError(f"{where}: peft_type must be 'LORA' (only LoRA adapters are supported), got {peft_type!r}")
        unsupported = [
            f"{k}={obj[k]!r}" for k in sorted(obj) if k not in IGNORED_FIELDS | READ_FIELDS and not is_off(obj[k])
        ]
        if unsupported:
            raise ValueError(
                f"{where}: unsupported PEFT setting(s) {', '.join(unsupported)}: each changes what the adapter "
                f"computes and lowrank implements plain (rs)LoRA only; refusing rather than ignoring them"
            )
        try:  # in a file every fault is a ValueError, whatever the helper's kind
            r = check_int(obj.get("r"), "r", low=1)
            alpha = check_real(obj.get("lora_alpha", 8), "lora_alpha", 0.0, low_open=True)
            dropout = check_real(obj.get("lora_dropout", 0.0), "lora_dropout", 0.0, 1.0, high_open=True)
            use_rslora = check_bool(obj.get("use_rslora", False), "use_rslora")
            fan_in_fan_out = check_bool(obj.get("fan_in_fan_out", False), "fan_in_fan_out")
            bias = check_choice(obj.get("bias", "none"), "bias", BIAS_MODES)
            targets = obj.get("target_modules")
            if isinstance(targets, list):
                targets = tuple(targets)
            match_target_modules(targets, "")  # refuses the wrong kind or an invalid regular expression
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
        written as PEFT writes them off (``use_dora false``, ...), and
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
            "use_dora": False,
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
    """

    name: str
    embedding: bool
    A: str | None
    B: str | None


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
        if match is not None:
            name, factor = match.group(1) or "", match.group(2)
            entry = found.setdefault(name, {"embedding": match.re is _EMBEDDING_KEY})
            if entry["embedding"] != (match.re is _EMBEDDING_KEY) or factor in entry:
                unknown.append(key)  # a module with both kinds of factor, or a factor twice
                continue
            entry[factor] = key
        elif re.search(r"(^|\.)lora_", rest):
            unknown.append(key)  # another LoRA variant's tensor (DoRA's magnitude, lora_B.bias, ...)
        else:
            full[rest.replace(".base_layer.", ".")] = key
    factors = {
        name: FactorKeys(name=name, embedding=entry["embedding"], A=entry.get("A"), B=entry.get("B"))
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
