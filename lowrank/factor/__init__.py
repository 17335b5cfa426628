"""Low-rank factorization: exact and randomized SVD, its range finder, ALS (explicit and implicit), LowRank.

NumPy only; imports nothing of lowrank but :mod:`lowrank.utils`.
"""

from lowrank.factor.als import ALSResult, als
from lowrank.factor.implicit_als import ImplicitALSResult, implicit_als, implicit_als_objective
from lowrank.factor.lowrank_matrix import LowRank, lora_param_count
from lowrank.factor.svd import (
    SVDResult,
    eckart_young_errors,
    energy_kept,
    randomized_range_finder,
    randomized_svd,
    rank_for_energy,
    subspace_iteration,
    svd_in_range,
    truncated_svd,
)

__all__ = [
    "ALSResult",
    "ImplicitALSResult",
    "LowRank",
    "SVDResult",
    "als",
    "eckart_young_errors",
    "energy_kept",
    "implicit_als",
    "implicit_als_objective",
    "lora_param_count",
    "randomized_range_finder",
    "randomized_svd",
    "rank_for_energy",
    "subspace_iteration",
    "svd_in_range",
    "truncated_svd",
]
