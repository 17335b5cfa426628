"""LoRA and small networks by hand: kernels, layers, optimizers.

``lowrank.nn.functional`` holds the pure forward/backward kernel pairs (every
formula); the classes here hold parameters and call them.
"""

from lowrank.nn import functional
from lowrank.nn.gpt2 import GPT2, GPT2Config, lm_loss
from lowrank.nn.lora import (
    LORA_BIAS,
    LORA_LAYERS,
    LoRAEmbedding,
    LoRALinear,
    LoRAMergedLinear,
    TrainedBeside,
    check_lora_config,
    check_pissa_rank,
    inject_lora,
    mark_only_lora_as_trainable,
    match_target_modules,
    merge_lora,
    replace_modules,
    trainable_summary,
    trained_beside_lora,
)
from lowrank.nn.mlp import MLP
from lowrank.nn.modules import (
    GELU,
    Conv1D,
    Embedding,
    LayerNorm,
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
    "GPT2",
    "LORA_BIAS",
    "LORA_LAYERS",
    "MLP",
    "Conv1D",
    "Embedding",
    "GPT2Config",
    "LayerNorm",
    "Linear",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAMergedLinear",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "TrainedBeside",
    "check_lora_config",
    "check_pissa_rank",
    "functional",
    "inject_lora",
    "lm_loss",
    "mark_only_lora_as_trainable",
    "match_target_modules",
    "merge_lora",
    "replace_modules",
    "trainable_summary",
    "trained_beside_lora",
]
