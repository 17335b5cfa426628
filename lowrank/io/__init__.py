"""Files with the ecosystem: pickle-free, atomic, and PEFT's adapter folders.

Two layers share this folder. :mod:`lowrank.io.files` holds the file
primitives (atomic writes, ``.npz``, JSON, safetensors) and imports nothing
of lowrank above :mod:`lowrank.utils`; :mod:`lowrank.io.peft` reads and
writes PEFT adapters and sits above :mod:`lowrank.nn`. The PEFT names load on
first use, so importing the file primitives never imports the network code.
"""

import importlib
from typing import Any

from lowrank.io.files import (
    PathLike,
    atomic_write,
    load_json,
    load_npz,
    load_safetensors,
    save_json,
    save_npz,
    save_safetensors,
)

_PEFT_NAMES = frozenset({"PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "load_peft_adapter", "save_peft_adapter"})

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "PathLike",
    "atomic_write",
    "load_json",
    "load_npz",
    "load_peft_adapter",
    "load_safetensors",
    "save_json",
    "save_npz",
    "save_peft_adapter",
    "save_safetensors",
]


def __getattr__(name: str) -> Any:
    """Load :mod:`lowrank.io.peft` on first use of one of its names (PEP 562)."""
    if name in _PEFT_NAMES:
        return getattr(importlib.import_module("lowrank.io.peft"), name)
    if name == "peft":
        return importlib.import_module("lowrank.io.peft")
    raise AttributeError(f"module 'lowrank.io' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _PEFT_NAMES)
