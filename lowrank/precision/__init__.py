"""Low precision, emulated exactly in NumPy: rounding, mixed-precision LoRA kernels and error bounds.

- :mod:`~lowrank.precision.rounding`: :func:`round_to` bfloat16, float16 or
  float32 (round to nearest, ties to even, bit-exact with IEEE casts),
  :func:`to_bits` / :func:`from_bits`, :func:`unit_roundoff`.
- :mod:`~lowrank.precision.kernels`: a LoRA layer in a 16-bit format with
  float32 accumulation, as PyTorch runs it: :func:`lora_linear` and its
  backward, :func:`linear`, :func:`lora_merge`, :func:`lora_unmerge`.
- :mod:`~lowrank.precision.bounds`: a priori per-element bounds on their
  error, :func:`lora_linear_bound` and :func:`lora_merge_bound`.

NumPy only, and the package's bottom layer with :mod:`lowrank.utils`; the
derivations are in ``docs/precision.md``.
"""

from lowrank.precision.bounds import Bounded, gamma, lora_linear_bound, lora_merge_bound
from lowrank.precision.kernels import (
    PrecisionLoRACache,
    PrecisionLoRAGrads,
    linear,
    lora_linear,
    lora_linear_backward,
    lora_merge,
    lora_unmerge,
)
from lowrank.precision.rounding import FORMATS, Format, from_bits, round_to, smallest_subnormal, to_bits, unit_roundoff

__all__ = [
    "FORMATS",
    "Bounded",
    "Format",
    "PrecisionLoRACache",
    "PrecisionLoRAGrads",
    "from_bits",
    "gamma",
    "linear",
    "lora_linear",
    "lora_linear_backward",
    "lora_linear_bound",
    "lora_merge",
    "lora_merge_bound",
    "lora_unmerge",
    "round_to",
    "smallest_subnormal",
    "to_bits",
    "unit_roundoff",
]
