"""Low-rank factorization: exact and randomized SVD, its range finder, ALS (explicit, implicit), LowRank, certificates.

NumPy only; imports nothing of lowrank but :mod:`lowrank.utils`.
"""

from lowrank.factor.als import ALSResult, als
from lowrank.factor.certificates import (
    ALSCertificate,
    SVDCertificate,
    check_als,
    check_implicit_als,
    check_svd,
    factors_from_id_tables,
)
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
    "ALSCertificate",
    "ALSResult",
    "ImplicitALSResult",
    "LowRank",
    "SVDCertificate",
    "SVDResult",
    "als",
    "check_als",
    "check_implicit_als",
    "check_svd",
    "eckart_young_errors",
    "energy_kept",
    "factors_from_id_tables",
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
