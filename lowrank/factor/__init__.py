"""Low-rank factorization: exact and randomized SVD, ALS, and the LowRank matrix.

NumPy only; imports nothing of lowrank but :mod:`lowrank.utils`.
"""

from lowrank.factor.als import ALSResult, als
from lowrank.factor.lowrank_matrix import LowRank, lora_param_count
from lowrank.factor.svd import (
    SVDResult,
    eckart_young_errors,
    energy_kept,
    randomized_svd,
    rank_for_energy,
    truncated_svd,
)

__all__ = [
    "ALSResult",
    "LowRank",
    "SVDResult",
    "als",
    "eckart_young_errors",
    "energy_kept",
    "lora_param_count",
    "randomized_svd",
    "rank_for_energy",
    "truncated_svd",
]
