"""LoRA and small networks by hand: kernels, layers, optimizers.

``lowrank.nn.functional`` holds the pure forward/backward kernel pairs (every
formula); the classes here hold parameters and call them.
"""

from lowrank.nn import functional
from lowrank.nn.lora import LoRALinear, inject_lora, merge_lora, trainable_summary
from lowrank.nn.mlp import MLP
from lowrank.nn.modules import (
    GELU,
    Linear,
    Module,
    Parameter,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)

__all__ = [
    "GELU",
    "MLP",
    "Linear",
    "LoRALinear",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "functional",
    "inject_lora",
    "merge_lora",
    "trainable_summary",
]
