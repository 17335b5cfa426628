"""Files with the ecosystem: pickle-free, atomic, and PEFT's adapter folders.

:mod:`lowrank.io.files` holds the file primitives (the bottom layer: NumPy
only); :mod:`lowrank.io.peft` reads and writes PEFT adapters (above
:mod:`lowrank.nn`).
"""

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
from lowrank.io.peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, load_peft_adapter, save_peft_adapter

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
