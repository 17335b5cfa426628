"""PEFT LoRA adapters: load them into lowrank models, save lowrank models as them.

Above :mod:`lowrank.nn` in the layers: loading an adapter is injection with
given factors, so it swaps layers through the same path as
:func:`lowrank.nn.inject_lora`. The folder itself (the config model, PEFT's
key grammar, the reader) is :mod:`lowrank.io.adapter`, which needs no model.

An adapter is saved as a unit: both files are written into a temporary
folder beside the target, which then takes the target's place
(:func:`lowrank.io.files.atomic_write_folder`), and the
weights file records a digest of the config it was written with
(``__metadata__["lowrank_config_sha256"]``), checked on load, so weights and
a config from two different saves are never loaded together.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lowrank.io.adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    KEY_PREFIX,
    MAGNITUDE_SUFFIX,
    MAX_UNBOUNDED_REPEATS,
    Adapter,
    AdapterConfig,
    check_regex_is_safe,
    read_adapter,
)
from lowrank.io.files import PathLike, atomic_write_folder, save_json, save_safetensors
from lowrank.nn.lora import (
    ADAPTABLE,
    LORA_BIAS,
    LORA_LAYERS,
    LoRAEmbedding,
    LoRALinear,
    LoRAMergedLinear,
    inject_lora,
    mark_only_lora_as_trainable,
    replace_modules,
    trained_beside_lora,
)
from lowrank.nn.modules import Conv1D, Embedding, Linear, Module
from lowrank.utils.validation import check_choice, check_random_state

__all__ = [
    "CONFIG_DIGEST_KEY",
    "MAX_UNBOUNDED_REPEATS",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "check_regex_is_safe",
    "load_peft_adapter",
    "save_peft_adapter",
]

PEFT_CONFIG_NAME = ADAPTER_CONFIG_NAME
PEFT_WEIGHTS_NAME = ADAPTER_WEIGHTS_NAME
# In the weights file's __metadata__ (PEFT reads only "format"): the sha256 of the
# config the weights were saved with (what the loader reads of it, as canonical JSON).
# Not in adapter_config.json: PEFT would accept an unknown field, but lowrank's reader
# refuses every field it does not know, as it must for a field that changes the maths.
CONFIG_DIGEST_KEY = "lowrank_config_sha256"

# ---------------------------------------------------------------- loading


def _config_digest(config: AdapterConfig) -> str:
    """The sha256 of what the loader reads from a config: its ``to_json()`` as canonical JSON.

    Bookkeeping fields (``base_model_name_or_path``, ``task_type``, ...) are
    not part of it, so editing them keeps the pair valid; editing ``r`` or
    ``lora_alpha`` does not.
    """
    text = json.dumps(config.to_json(), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_pair(adapter: Adapter) -> None:
    """Refuse weights recorded as saved with another config than the one beside them."""
    recorded = adapter.metadata.get(CONFIG_DIGEST_KEY)
    if recorded is None:
        return  # a file PEFT or another tool wrote: nothing recorded, nothing to compare
    found = _config_digest(adapter.config)
    if recorded != found:
        raise ValueError(
            f"{adapter.path / PEFT_WEIGHTS_NAME} was saved with another {PEFT_CONFIG_NAME} than the one beside it "
            f"(config sha256 recorded {recorded[:12]}..., found {found[:12]}...): the two files come from "
            f"different saves; refusing a mixed adapter"
        )


def _finite_floats(arr: np.ndarray, key: str, where: Path) -> np.ndarray:
    if arr.dtype.kind != "f" or not np.isfinite(arr).all():
        raise ValueError(f"{where}: {key!r} must hold finite floats")
    return arr


def _saved_modules(config: AdapterConfig, modules: dict[str, Module], adapted: set[str], where: Path) -> list[str]:
    """The model's modules that ``modules_to_save`` wraps: PEFT's suffix rule, outermost only, none adapted."""
    lora = [n for n, m in modules.items() if isinstance(m, LORA_LAYERS)]
    inside_lora = {n for n in modules if any(n.startswith(f"{o}.") for o in lora if o)}  # lora_A, lora_B
    found = [n for n in modules if n and n not in inside_lora and config.saves_module(n)]
    found = [n for n in found if not any(n.startswith(f"{o}.") for o in found if o != n)]
    clash = [n for n in found if n in adapted or n in lora]
    if clash:
        raise ValueError(
            f"{where}: modules_to_save {list(config.modules_to_save)} selects {clash}, which the adapter adapts "
            f"or which are LoRA layers: a module is adapted or trained whole, not both"
        )
    return found


def load_peft_adapter(model: Any, path: PathLike, *, random_state: Any = None) -> Any:
    """Load a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into ``model``.

    The folder is read by :func:`lowrank.io.adapter.read_adapter` (with NumPy
    alone; its config validated by :class:`~lowrank.io.adapter.AdapterConfig`),
    and every tensor is cast to the dtype of the layer it loads into, which is
    float32 for a model built with lowrank's defaults: bfloat16 and float16
    files load exactly (every bf16 and fp16 value is a float32), a float64
    file into a float32 model is rounded once.

    Each adapted layer named in the file (``base_model.model.<name>.lora_A.weight``
    and ``.lora_B.weight``) must be a :class:`~lowrank.nn.Linear`, a
    :class:`~lowrank.nn.Conv1D` or an unmerged :class:`~lowrank.nn.LoRALinear`
    of ``model``; an Embedding adapter (``<name>.lora_embedding_A`` and
    ``.lora_embedding_B``, e.g. GPT-2's ``transformer.wte``) needs an
    :class:`~lowrank.nn.Embedding` or an unmerged :class:`~lowrank.nn.LoRAEmbedding`
    there. Loading is injection with given factors: a LoRA layer there is
    first swapped back for its base (:func:`~lowrank.nn.replace_modules`), then
    :func:`~lowrank.nn.inject_lora` wraps the named layers, each with its own
    ``r`` and ``alpha`` as PEFT resolves them from ``r``, ``lora_alpha``,
    ``rank_pattern`` and ``alpha_pattern``
    (:meth:`~lowrank.io.adapter.AdapterConfig.settings_for`), with
    ``use_rslora`` and ``lora_dropout``, and the file's ``A`` and ``B``
    replace the initial factors. As PEFT does, every other parameter is then
    frozen (:func:`~lowrank.nn.mark_only_lora_as_trainable`) except what the
    config trains besides: the biases ``bias`` names and the modules
    ``modules_to_save`` names.

    Config fields read: ``r``, ``lora_alpha``, ``use_rslora``,
    ``lora_dropout``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``
    (every adapted layer must match it, by the one matcher
    :func:`~lowrank.io.adapter.match_target_modules`), ``bias``,
    ``modules_to_save``, ``fan_in_fan_out`` and ``use_dora``.

    - ``use_dora``: every adapted layer becomes a DoRA layer
      (``LoRALinear(..., use_dora=True)``) and its magnitude ``m (out,)``
      is the file's ``<name>.lora_magnitude_vector`` (PEFT's key; also read
      with a ``.weight`` suffix, which PEFT accepts too). A magnitude in a
      file whose config has ``use_dora`` false is refused, as is a DoRA
      adapter on an Embedding (lowrank has no DoRA embedding layer).

    - ``bias`` ``"lora_only"`` or ``"all"``: the file's biases
      (``<name>.base_layer.bias`` for an adapted layer, ``<name>.bias`` for
      any other, as PEFT saves them) replace the model's and stay trainable.
    - ``modules_to_save``: the modules whose name ends with an entry (PEFT's
      rule) get their full tensors from the file (``<name>.weight``, ...,
      PEFT's saved names, without ``modules_to_save.default``) and stay
      trainable. With ``bias="all"`` PEFT also saves such a module's bias as
      ``<name>.modules_to_save.bias`` (equal to ``<name>.bias``, checked) and
      ``<name>.original_module.bias`` (the untouched base bias, skipped).
    - ``fan_in_fan_out`` says the *torch* base layers stored their weight as
      ``(in, out)`` (GPT-2's Conv1D, ``y = x @ W + b``). PEFT's factors are
      ``(r, in)`` and ``(out, r)`` either way, and PEFT decides per layer
      (a Conv1D is always transposed, an ``nn.Linear`` never, whatever the
      flag says), and so does lowrank: the adapter loads unchanged into a
      :class:`~lowrank.nn.Conv1D` (``nn.GPT2`` holds transformers' layout,
      so its checkpoint and its adapters load as they are) and into a
      :class:`~lowrank.nn.Linear`, whose weight is ``(out, in)``; into a
      Linear the *base* weights must have been loaded transposed
      (``linear.weight = conv1d_weight.T``), which lowrank cannot check
      for a square layer, so that is the caller's part.

    Bookkeeping fields and the initialization fields are ignored. Any other
    field that is switched on (``layers_to_transform``, ``lora_bias``, ...)
    is refused with a ValueError that names it; so is a
    folder holding only a pickled ``adapter_model.bin``. An adapter trained
    from a PiSSA, OLoRA or CorDA initialization is relative to the *residual*
    base weights that initialization produced; load those into ``model`` first.

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
        A corrupt or truncated file, an unsupported config field, a pickled
        ``adapter_model.bin``, weights saved by lowrank beside another config
        than theirs (a mixed adapter), a regular expression in the config
        that could hang the matcher (:func:`check_regex_is_safe`), a key that
        is not a LoRA factor or a tensor the config trains, a layer or
        parameter the model does not have, a shape mismatch. Everything is
        checked before the model is changed.
    RuntimeError
        A layer to load into is a merged LoRALinear (``unmerge()`` it first).
    TypeError
        ``model`` is not a Module, or ``random_state`` is of the wrong kind.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    rng = check_random_state(random_state)  # once, for every new layer
    adapter = read_adapter(path)
    folder = adapter.path
    config_path, weights_path = folder / PEFT_CONFIG_NAME, folder / PEFT_WEIGHTS_NAME
    _check_pair(adapter)
    config, layout, tensors = adapter.config, adapter.layout, adapter.tensors
    if layout.unknown:
        raise ValueError(
            f"{weights_path}: unsupported key(s) {list(layout.unknown)}: lowrank loads "
            f"'base_model.model.<name>.lora_A.weight' and '.lora_B.weight', and the biases and "
            f"modules_to_save tensors the config names"
        )
    if not layout.factors:
        raise ValueError(f"{weights_path} holds no LoRA factors")

    modules = dict(model.named_modules())
    checked: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (A, B)
    magnitudes: dict[str, np.ndarray] = {}  # name -> DoRA's m (out,), when use_dora
    settings = {}
    unwrap: dict[str, Module] = {}  # LoRALinear layers to load into -> their base Linear
    for name, keys in sorted(layout.factors.items()):
        shown = name or "<the model itself>"
        if keys.A is None or keys.B is None:
            factor = "lora_embedding_" if keys.embedding else "lora_"
            suffix = "" if keys.embedding else ".weight"
            missing = f"{KEY_PREFIX}{name + '.' if name else ''}{factor}{'A' if keys.A is None else 'B'}{suffix}"
            raise ValueError(f"{weights_path}: layer {shown!r} has no {missing!r}")
        layer = modules.get(name)  # the model's names first: a pattern only ever meets names the model has
        kinds = (Embedding, LoRAEmbedding) if keys.embedding else (Linear, Conv1D, LoRALinear)
        if not isinstance(layer, kinds) or isinstance(layer, LoRAMergedLinear):
            found = "no such module" if layer is None else type(layer).__name__
            want = "an Embedding" if keys.embedding else "a Linear or a Conv1D"
            raise ValueError(f"the adapter adapts {shown!r}, which must be {want} of model, got {found}")
        if isinstance(layer, (LoRALinear, LoRAEmbedding)):
            if layer.merged:
                raise RuntimeError(
                    f"layer {shown!r} is a merged {type(layer).__name__}: unmerge() it before loading an adapter"
                )
            base = layer.base
            unwrap[name] = base.train(layer.training)  # the base is not in the tree: its own mode is stale
        else:
            base = layer
        if not config.matches(name):
            raise ValueError(
                f"{weights_path}: layer {shown!r} does not match target_modules {config.target_modules!r} "
                f"of {config_path.name}"
            )
        layer_settings = config.settings_for(name)
        A, B = tensors[keys.A], tensors[keys.B]
        r = layer_settings.r
        if isinstance(base, Embedding):  # PEFT's lora_embedding_A (r, num), lora_embedding_B (dim, r)
            expected_A, expected_B = (r, base.num_embeddings), (base.embedding_dim, r)
            what = "lora_embedding_A of shape (r, num_embeddings)", "lora_embedding_B of shape (embedding_dim, r)"
        else:
            expected_A, expected_B = (r, base.in_features), (base.out_features, r)
            what = "lora_A of shape (r, in)", "lora_B of shape (out, r)"
        if A.shape != expected_A or B.shape != expected_B:
            raise ValueError(
                f"{weights_path}: layer {shown!r} needs {what[0]} = {expected_A} and {what[1]} "
                f"= {expected_B} (r = {r} by {config_path.name}), got {A.shape} and {B.shape}"
            )
        checked[name] = (_finite_floats(A, keys.A, weights_path), _finite_floats(B, keys.B, weights_path))
        settings[name] = layer_settings
        if keys.magnitude is not None or config.use_dora:
            if isinstance(base, Embedding):
                raise ValueError(
                    f"{weights_path}: layer {shown!r} is an Embedding with DoRA (use_dora): lowrank has no DoRA "
                    f"Embedding layer to load it into ('lowrank adapter merge' merges it into a weights file)"
                )
            magnitudes[name] = _check_magnitude(adapter, name, keys.magnitude, base.out_features)

    saved_modules = _saved_modules(config, modules, set(checked), config_path)
    full = _check_full_tensors(adapter, model, set(checked), saved_modules)

    # Everything checked, nothing changed yet: inject as inject_lora does, then set the file's tensors.
    model = replace_modules(model, unwrap)
    model = inject_lora(
        model,
        r={name: s.r for name, s in settings.items()},
        alpha={name: s.alpha for name, s in settings.items()},
        targets=list(checked),
        dropout=config.dropout,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        random_state=rng,
    )
    layers = dict(model.named_modules())
    for name, (A, B) in checked.items():
        layer = layers[name]
        layer.A.data = np.array(A, dtype=layer.weight.dtype, order="C")  # (r, in) or (r, num)
        layer.B.data = np.array(B, dtype=layer.weight.dtype, order="C")  # (out, r) or (dim, r)
        if name in magnitudes:
            layer.magnitude.data = np.array(magnitudes[name], dtype=layer.weight.dtype, order="C")  # (out,)
    params = dict(model.named_parameters())
    for key, arr in full.items():
        params[key].data = np.array(arr, dtype=params[key].dtype, order="C")
    return mark_only_lora_as_trainable(model, bias=config.bias, also_trainable=saved_modules)


def _check_magnitude(adapter: Adapter, name: str, key: str | None, out_features: int) -> np.ndarray:
    """DoRA's magnitude of layer ``name`` from the file: present exactly when ``use_dora``, shape (out,), finite."""
    weights_path, shown = adapter.path / PEFT_WEIGHTS_NAME, name or "<the model itself>"
    prefix = f"{KEY_PREFIX}{name + '.' if name else ''}"
    if key is None:
        raise ValueError(
            f"{weights_path}: layer {shown!r} has no {prefix + MAGNITUDE_SUFFIX!r}, which use_dora=True in "
            f"{PEFT_CONFIG_NAME} needs"
        )
    if not adapter.config.use_dora:
        raise ValueError(
            f"{weights_path}: {key!r} is DoRA's magnitude, but {PEFT_CONFIG_NAME} has use_dora false: PEFT would "
            f"load the adapter as plain LoRA and ignore it; refusing an inconsistent adapter"
        )
    magnitude = _finite_floats(adapter.tensors[key], key, weights_path)
    if magnitude.shape != (out_features,):
        raise ValueError(
            f"{weights_path}: layer {shown!r} needs {key!r} of shape (out,) = ({out_features},), got {magnitude.shape}"
        )
    return magnitude


def _check_full_tensors(
    adapter: Adapter, model: Module, adapted: set[str], saved_modules: list[str]
) -> dict[str, np.ndarray]:
    """The file's full tensors (biases, modules_to_save) by the model's parameter names, every fault refused."""
    config, weights_path = adapter.config, adapter.path / PEFT_WEIGHTS_NAME
    params = dict(model.named_parameters())
    out: dict[str, np.ndarray] = {}
    duplicates: list[tuple[str, str]] = []
    for target, key in sorted(adapter.layout.full.items()):
        owner = next((m for m in saved_modules if target.startswith(f"{m}.")), None)
        if owner is not None:
            inner = target[len(owner) + 1 :]
            if inner.startswith("original_module."):
                continue  # PEFT's bias="all" also saves the untouched base bias of a saved module: not trained
            if inner.startswith("modules_to_save."):
                duplicates.append((f"{owner}.{inner.split('.', 1)[1]}", key))  # the trained copy once more
                continue
        else:
            module, _, leaf = target.rpartition(".")
            base_layer = key.endswith(".base_layer.bias")
            trained = leaf == "bias" and (
                config.bias == "all" or (config.bias == "lora_only" and module in adapted and base_layer)
            )
            if not trained:
                raise ValueError(
                    f"{weights_path}: key {key!r} is neither a LoRA factor nor a tensor the config trains "
                    f"(bias={config.bias!r}, modules_to_save={list(config.modules_to_save)})"
                )
        param = params.get(target)
        if param is None:
            raise ValueError(f"{weights_path}: {key!r} loads into {target!r}, which is not a parameter of model")
        arr = _finite_floats(adapter.tensors[key], key, weights_path)
        if arr.shape != param.shape:
            raise ValueError(f"{weights_path}: {key!r} must have {target!r}'s shape {param.shape}, got {arr.shape}")
        out[target] = arr
    for target, key in duplicates:
        if target not in out or not np.array_equal(out[target], adapter.tensors[key]):
            raise ValueError(f"{weights_path}: {key!r} disagrees with the saved module's {target!r}")
    for module in saved_modules:
        inside = dict(model.named_modules())[module].named_parameters()
        missing = [f"{module}.{n}" for n, _ in inside if f"{module}.{n}" not in out]
        if missing:
            raise ValueError(
                f"{weights_path}: modules_to_save {list(config.modules_to_save)} wraps {module!r}, but the file "
                f"lacks {missing}"
            )
    return out


# ---------------------------------------------------------------- saving


def _pattern_key(name: str, others: list[str]) -> str:
    """A rank_pattern/alpha_pattern key that PEFT's rule matches for ``name`` and no other adapted layer."""
    key = name.replace(".", r"\.")
    clash = any(o != name and (o.endswith(f".{name}")) for o in others)
    return f"^{key}" if clash else key


def save_peft_adapter(
    model: Any, path: PathLike, *, bias: str | None = None, modules_to_save: list[str] | None = None
) -> Path:
    """Write ``model``'s LoRA layers as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    Saves every :class:`~lowrank.nn.LoRALinear` (on a Linear or a Conv1D)
    and :class:`~lowrank.nn.LoRAEmbedding` (as ``lora_embedding_A`` and
    ``lora_embedding_B``); ``fan_in_fan_out`` is true when the adapted
    layers are Conv1D. A :class:`~lowrank.nn.LoRAMergedLinear` (loralib's
    ``enable_lora``) has no PEFT form and is refused.
    Writes ``adapter_config.json`` (by
    :meth:`~lowrank.io.adapter.AdapterConfig.to_json`: ``peft_type "LORA"``,
    ``r`` and ``lora_alpha`` the layers' most common values, ``rank_pattern``
    and ``alpha_pattern`` for the layers that differ, ``use_rslora``,
    ``lora_dropout``, ``bias``, ``modules_to_save``, ``target_modules``
    naming exactly the adapted layers, ``init_lora_weights true`` so PEFT does
    not re-initialize the base, ``use_dora``) and ``adapter_model.safetensors``
    (``base_model.model.<name>.lora_A.weight`` and ``.lora_B.weight``, for
    DoRA layers ``.lora_magnitude_vector`` (PEFT's key, no ``.weight``), the
    trained biases and the saved modules' tensors under PEFT's names, in the
    parameters' dtypes). The base weights are not part of an adapter: the
    torch model must hold the same base weights (for a PiSSA layer, the
    residual ``layer.weight``).

    The folder is written as a unit, by
    :func:`lowrank.io.files.atomic_write_folder`: both files go into a
    temporary folder beside it, which then takes the target's place, so a
    crash leaves the old adapter or the new one (or, for the microseconds
    between two renames, none under the name), never the weights of one save
    beside the config of another; other files of an existing folder (a
    README) are kept. Besides, the weights file records the sha256 of its
    config (``__metadata__["lowrank_config_sha256"]``) and
    :func:`load_peft_adapter` refuses a pair that disagrees.

    Parameters
    ----------
    model : lowrank.nn.Module
        With at least one unmerged LoRALinear; all of them must share
        ``use_rslora``, ``dropout`` and ``use_dora`` (one field each in PEFT's config);
        ``r`` and ``alpha`` may differ per layer.
    path : str or os.PathLike
        The folder; created if missing (its parent must exist).
    bias : {"none", "lora_only", "all"}, optional
        Which biases the adapter carries (PEFT's ``bias``): ``"lora_only"``
        the adapted layers' (as ``<name>.base_layer.bias``), ``"all"`` every
        bias of the model (the others as ``<name>.bias``). By default the
        model's own setting (:func:`lowrank.nn.trained_beside_lora`: what
        :func:`~lowrank.nn.inject_lora` or :func:`load_peft_adapter` set),
        so a loaded adapter saves back as it came; ``"none"`` for a model
        never marked.
    modules_to_save : list of str, optional
        Dotted names of modules saved in full (``<name>.weight``, ...), as
        :func:`load_peft_adapter` loads them; by default the model's own
        setting, as ``bias``. PEFT selects a module whose name *ends with*
        an entry, so an entry that is also the end of another module's
        name is refused.

    Returns
    -------
    pathlib.Path
        The folder.

    Raises
    ------
    TypeError
        ``model`` is not a Module, or ``modules_to_save`` is not a list of str.
    ValueError
        No LoRALinear or LoRAEmbedding, a LoRAMergedLinear, layers with
        different ``use_rslora``, ``dropout`` or ``use_dora``,
        a LoRAEmbedding beside DoRA layers (PEFT's ``use_dora`` would make it DoRA too),
        adapted Conv1D layers beside adapted Linear layers (one ``fan_in_fan_out`` flag
        cannot describe both), an unknown ``bias``, or a ``modules_to_save`` name that is not a
        module, is adapted, or is ambiguous under PEFT's rule.
    RuntimeError
        A merged LoRALinear.
    FileNotFoundError, NotADirectoryError
        The parent folder is missing, or ``path`` is a file.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    remembered = trained_beside_lora(model)
    bias = check_choice(remembered.bias if bias is None else bias, "bias", LORA_BIAS)
    if modules_to_save is None and remembered.modules_to_save:
        modules_to_save = list(remembered.modules_to_save)
    named = model.named_modules()
    modules = dict(named)
    fused = [name for name, m in named if isinstance(m, LoRAMergedLinear)]
    if fused:
        raise ValueError(
            f"layers {fused} are LoRAMergedLinear (enable_lora, loralib's MergedLinear), which a PEFT adapter "
            f"cannot express: PEFT adapts a fused projection whole; save model.state_dict() instead"
        )
    layers: list[tuple[str, LoRALinear | LoRAEmbedding]] = [
        (name, m) for name, m in named if isinstance(m, (LoRALinear, LoRAEmbedding))
    ]
    if not layers:
        raise ValueError("model has no LoRALinear or LoRAEmbedding layer: there is no adapter to save")
    merged = [name for name, m in layers if m.merged]
    if merged:
        raise RuntimeError(f"LoRA layers {merged} are merged: unmerge() them before saving the adapter")
    # An Embedding's LoRA path has no dropout (PEFT's neither) and no DoRA here: only the linear layers' count.
    rslora = {m.use_rslora for _, m in layers}
    dropouts = {m.dropout for _, m in layers if isinstance(m, LoRALinear)}
    doras = {m.use_dora for _, m in layers if isinstance(m, LoRALinear)}
    if len(rslora) > 1 or len(dropouts) > 1 or len(doras) > 1:
        raise ValueError(
            "every LoRA layer must share use_rslora, dropout and use_dora to be saved as one PEFT config, got "
            + ", ".join(
                f"{n or '<the model itself>'}: (use_rslora={m.use_rslora}"
                + (f", dropout={m.dropout:g}, use_dora={m.use_dora})" if isinstance(m, LoRALinear) else ")")
                for n, m in layers
            )
        )
    use_rslora = rslora.pop()
    dropout = dropouts.pop() if dropouts else 0.0
    use_dora = doras.pop() if doras else False
    embeddings = [name for name, m in layers if isinstance(m, LoRAEmbedding)]
    if use_dora and embeddings:  # PEFT's use_dora is one flag: it would make the Embedding DoRA too
        raise ValueError(
            f"LoRAEmbedding layers {embeddings} beside DoRA layers cannot be saved as one PEFT config: its "
            f"use_dora covers every adapted layer, and lowrank has no DoRA Embedding layer; save model.state_dict() "
            f"instead"
        )
    # PEFT's fan_in_fan_out: True when the adapted linear layers are Conv1D (GPT-2). PEFT corrects the
    # flag per layer when it loads (a Conv1D is always transposed, an nn.Linear never), but a tool that
    # reads the file without the model (lowrank adapter merge) trusts it: one flag must fit every layer.
    conv1d = {name: m.fan_in_fan_out for name, m in layers if isinstance(m, LoRALinear)}
    if len(set(conv1d.values())) > 1:
        raise ValueError(
            "the adapted layers mix Conv1D (weight stored (in, out)) and Linear: PEFT's one fan_in_fan_out flag "
            f"cannot describe both, and a merge without the model would transpose one kind; Conv1D layers "
            f"{[n for n, f in conv1d.items() if f]}, Linear layers {[n for n, f in conv1d.items() if not f]}"
        )
    fan_in_fan_out = any(conv1d.values())
    names = [name for name, _ in layers]
    saved = _check_modules_to_save(modules_to_save, modules, names)

    r = Counter(m.r for _, m in layers).most_common(1)[0][0]
    alpha = Counter(m.alpha for _, m in layers).most_common(1)[0][0]
    rank_pattern = {_pattern_key(n, names): m.r for n, m in layers if m.r != r}
    alpha_pattern = {_pattern_key(n, names): m.alpha for n, m in layers if m.alpha != alpha}
    # PEFT matches a list entry against every module whose name ends in "." + entry, so
    # a plain list is exact only when no other linear layer's name ends that way
    others = [n for n, m in named if isinstance(m, ADAPTABLE) and n not in names]
    ambiguous = any(o.endswith(f".{n}") for o in others for n in names)
    targets: str | tuple[str, ...] = (
        "^(?:" + "|".join(n.replace(".", r"\.") for n in names) + ")$" if ambiguous or "" in names else tuple(names)
    )
    adapter_config = AdapterConfig(
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
    )
    config = adapter_config.to_json()

    tensors: dict[str, np.ndarray] = {}
    for name, m in layers:
        prefix = f"{KEY_PREFIX}{name + '.' if name else ''}"
        if isinstance(m, LoRAEmbedding):
            tensors[f"{prefix}lora_embedding_A"] = m.A.data  # (r, num), PEFT's key has no ".weight"
            tensors[f"{prefix}lora_embedding_B"] = m.B.data  # (dim, r)
            continue
        tensors[f"{prefix}lora_A.weight"] = m.A.data  # (r, in)
        tensors[f"{prefix}lora_B.weight"] = m.B.data  # (out, r)
        if use_dora:
            tensors[f"{prefix}{MAGNITUDE_SUFFIX}"] = m.magnitude.data  # (out,): PEFT's key, without ".weight"
        if bias != "none" and m.bias is not None:
            tensors[f"{prefix}base_layer.bias"] = m.bias.data  # (out,)
    for module in saved:
        for pname, p in modules[module].named_parameters():
            tensors[f"{KEY_PREFIX}{module}.{pname}"] = p.data
    if bias == "all":
        adapted_biases = {f"{n}.bias" if n else "bias" for n in names}
        for pname, p in model.named_parameters():
            inside_saved = any(pname.startswith(f"{m}.") for m in saved)
            if pname.rpartition(".")[2] == "bias" and pname not in adapted_biases and not inside_saved:
                tensors[f"{KEY_PREFIX}{pname}"] = p.data
    metadata = {"format": "pt", CONFIG_DIGEST_KEY: _config_digest(adapter_config)}

    def write(folder: Path) -> None:
        save_safetensors(folder / PEFT_WEIGHTS_NAME, tensors, metadata=metadata)
        save_json(folder / PEFT_CONFIG_NAME, config)

    return Path(atomic_write_folder(path, write))


def _check_modules_to_save(modules_to_save: Any, modules: dict[str, Module], adapted: list[str]) -> list[str]:
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, (str, bytes)) or not isinstance(modules_to_save, (list, tuple)):
        raise TypeError(f"modules_to_save must be a list of module names, got {type(modules_to_save).__name__}")
    bad = [m for m in modules_to_save if not isinstance(m, str) or not m]
    if bad:
        raise TypeError(f"modules_to_save must hold module names (non-empty str), got {bad!r}")
    for entry in modules_to_save:
        if entry not in modules:
            raise ValueError(f"modules_to_save names {entry!r}, which is not a module of model")
        if entry in adapted or isinstance(modules[entry], LoRALinear):
            raise ValueError(f"modules_to_save names {entry!r}, which is adapted: a module is adapted or saved whole")
        # PEFT wraps every module whose name ends with the entry (a plain suffix)
        also = [n for n in modules if n and n != entry and n.endswith(entry) and not n.startswith(f"{entry}.")]
        if also:
            raise ValueError(
                f"modules_to_save names {entry!r}, which PEFT would also match in {also} (it selects every "
                f"module whose name ends with the entry); rename or save those too"
            )
    return list(modules_to_save)
