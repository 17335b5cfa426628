"""Files with the ecosystem: pickle-free, atomic, and PEFT's adapter folders.

Two layers share this folder. :mod:`lowrank.io.files` (atomic writes of
files and folders, ``.npy``/``.npz``, JSON), :mod:`lowrank.io.safetensors`
(the format with NumPy alone) and :mod:`lowrank.io.adapter` (PEFT adapter
folders read, inspected and merged without a model) import nothing of
lowrank above :mod:`lowrank.utils`; :mod:`lowrank.io.peft` loads adapters
into a lowrank model and saves them from one, above :mod:`lowrank.nn`. The
adapter and PEFT names load on first use, so importing the file primitives
never imports the network code.
"""

import importlib
from typing import Any

from lowrank.io.files import (
    PathLike,
    atomic_write,
    atomic_write_folder,
    check_writable,
    load_json,
    load_npy,
    load_npz,
    load_safetensors,
    save_json,
    save_npz,
    save_safetensors,
)

_PEFT_NAMES = frozenset({"PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "load_peft_adapter", "save_peft_adapter"})
_ADAPTER_NAMES = frozenset({"AdapterConfig", "inspect_adapter", "merge_adapter", "read_adapter"})
_SUBMODULES = frozenset({"adapter", "files", "peft", "safetensors"})

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "AdapterConfig",
    "PathLike",
    "atomic_write",
    "atomic_write_folder",
    "check_writable",
    "inspect_adapter",
    "load_json",
    "load_npy",
    "load_npz",
    "load_peft_adapter",
    "load_safetensors",
    "merge_adapter",
    "read_adapter",
    "save_json",
    "save_npz",
    "save_peft_adapter",
    "save_safetensors",
]


def __getattr__(name: str) -> Any:
    """Load :mod:`lowrank.io.peft` on first use of one of its names (PEP 562)."""
    if name in _PEFT_NAMES:
        return getattr(importlib.import_module("lowrank.io.peft"), name)
    if name in _ADAPTER_NAMES:
        return getattr(importlib.import_module("lowrank.io.adapter"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"lowrank.io.{name}")
    raise AttributeError(f"module 'lowrank.io' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _PEFT_NAMES | _ADAPTER_NAMES | _SUBMODULES)
