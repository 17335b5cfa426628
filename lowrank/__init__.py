"""lowrank: low-rank factorization and LoRA, by hand in NumPy.

A reference implementation: truncated and randomized SVD, ALS with missing
entries, and LoRA's forward and backward passes, every gradient written out
and checked against finite differences. Runtime dependency: NumPy only.
"""

from lowrank.als import ALSResult, als
from lowrank.lowrank_matrix import LowRank, lora_param_count
from lowrank.svd import (
    SVDResult,
    eckart_young_errors,
    energy_kept,
    randomized_svd,
    rank_for_energy,
    truncated_svd,
)

__version__ = "0.1.0"

__all__ = [
    "ALSResult",
    "LowRank",
    "SVDResult",
    "__version__",
    "als",
    "eckart_young_errors",
    "energy_kept",
    "lora_param_count",
    "randomized_svd",
    "rank_for_energy",
    "truncated_svd",
]
