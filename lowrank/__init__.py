"""lowrank: low-rank factorization and LoRA, by hand in NumPy.

A reference implementation: truncated and randomized SVD, ALS with missing
entries, and LoRA's forward and backward passes, every gradient written out
and checked against finite differences. Runtime dependency: NumPy only.

The package is layered (``docs/architecture.md``): ``utils`` at the bottom,
then ``factor`` and ``nn``, then ``io``, ``train`` and ``reference``, then the
command line. Only the factorization functions are imported eagerly; the
other subpackages load on first use (``lowrank.nn``, ``lowrank.io``, ...),
so ``import lowrank`` costs little more than ``import numpy``.
"""

import importlib
from typing import Any

import lowrank.als  # noqa: F401  (the old module path, loaded first so the name below rebinds to the function)
from lowrank._version import __version__
from lowrank.factor.als import ALSResult, als
from lowrank.factor.certificates import ALSCertificate, SVDCertificate, check_als, check_implicit_als, check_svd
from lowrank.factor.implicit_als import ImplicitALSResult, implicit_als
from lowrank.factor.lowrank_matrix import LowRank, lora_param_count
from lowrank.factor.svd import (
    SVDResult,
    eckart_young_errors,
    energy_kept,
    randomized_range_finder,
    randomized_svd,
    rank_for_energy,
    truncated_svd,
)

_SUBMODULES = frozenset({
    "factor", "io", "nn", "precision", "reference", "train", "utils",
    "als", "data", "demo", "gradcheck", "lowrank_matrix", "svd", "testing", "vectors",
})  # fmt: skip


def __getattr__(name: str) -> Any:
    """Import a subpackage on first attribute access (PEP 562): ``lowrank.io.load_peft_adapter``."""
    if name in _SUBMODULES:
        return importlib.import_module(f"lowrank.{name}")
    raise AttributeError(f"module 'lowrank' has no attribute {name!r}")


def __dir__() -> list[str]:
    """List the eager names and the lazy subpackages, for ``dir(lowrank)`` and tab completion."""
    return sorted(set(globals()) | _SUBMODULES)


__all__ = [
    "ALSCertificate",
    "ALSResult",
    "ImplicitALSResult",
    "LowRank",
    "SVDCertificate",
    "SVDResult",
    "__version__",
    "als",
    "check_als",
    "check_implicit_als",
    "check_svd",
    "eckart_young_errors",
    "energy_kept",
    "implicit_als",
    "lora_param_count",
    "randomized_range_finder",
    "randomized_svd",
    "rank_for_energy",
    "truncated_svd",
]
