"""The catalogue of linear and LoRA reference cases: shapes, dtypes, scaling, dropout masks.

Defined once here and used by :func:`lowrank.reference.vectors.write_vectors`
(one file per case and dtype), by :func:`lowrank.reference.harness.assert_lora_linear_matches`
(each catalogue case is checked after the generated ones, and the generated
ones are drawn by :func:`lora_case_strategy`), and by the tests.

A case is its configuration (a frozen dataclass); :meth:`LoRACase.tensors`
draws its arrays from a Generator, the dropout mask through
:func:`lowrank.nn.functional.dropout_mask`, so the same Generator state gives
the same bits.

Example
-------
>>> import numpy as np
>>> case = LORA_CASES[0]
>>> case.name, case.scaling
('r1_alpha1', 1.0)
>>> t = case.tensors(np.random.default_rng(0), np.float32)
>>> sorted(t), t["x"].shape, t["A"].shape, t["B"].shape
(['A', 'B', 'bias', 'dy', 'weight', 'x'], (3, 5), (1, 5), (4, 1))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.io.adapter import lora_scaling

__all__ = [
    "CONV1D_CASES",
    "DORA_CASES",
    "DROPOUT_KINDS",
    "LINEAR_CASES",
    "LORA_CASES",
    "REFERENCE_DTYPES",
    "DoRACase",
    "LinearCase",
    "LoRACase",
    "lora_case_strategy",
]

REFERENCE_DTYPES = ("float32", "float64")
"""The dtypes every linear and LoRA case is written in."""

DROPOUT_KINDS = ("none", "full", "shared")
"""No mask; a mask of ``x``'s shape; a mask of shape ``(in_features,)`` broadcast over the batch."""

_DROPOUT_P = 0.5  # mask entries are 0 or 1/(1-p) = 2, exact in every float dtype


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


@dataclass(frozen=True)
class LinearCase:
    """A linear layer ``y = x @ weight.T + bias`` with ``x (*batch, in_features)``."""

    name: str
    batch: tuple[int, ...]
    in_features: int
    out_features: int
    bias: bool

    def tensors(self, rng: np.random.Generator, dtype: Any) -> dict[str, np.ndarray]:
        """``x``, ``weight``, ``bias`` (when the case has one) and ``dy``, standard normal, in ``dtype``."""
        t = {"x": _normal(rng, (*self.batch, self.in_features), dtype),
             "weight": _normal(rng, (self.out_features, self.in_features), dtype)}  # fmt: skip
        if self.bias:
            t["bias"] = _normal(rng, (self.out_features,), dtype)
        t["dy"] = _normal(rng, (*self.batch, self.out_features), dtype)
        return t


@dataclass(frozen=True)
class LoRACase:
    """A LoRA layer ``y = x @ W.T + b + scaling * ((x * mask) @ A.T) @ B.T``.

    Attributes
    ----------
    name : str
    batch : tuple of int
        Leading batch dimensions of ``x`` (possibly none).
    in_features, out_features, r : int
    alpha : float
    use_rslora : bool
        ``scaling = alpha / sqrt(r)`` if True, else ``alpha / r``.
    bias : bool
    dropout : {"none", "full", "shared"}
        See :data:`DROPOUT_KINDS`; the drop probability is 0.5.
    """

    name: str
    batch: tuple[int, ...]
    in_features: int
    out_features: int
    r: int
    alpha: float
    use_rslora: bool
    bias: bool
    dropout: str = "none"

    @property
    def scaling(self) -> float:
        """``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r`` (:func:`lowrank.io.adapter.lora_scaling`)."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    @property
    def dropout_p(self) -> float:
        """The drop probability: 0 without dropout, else 0.5."""
        return 0.0 if self.dropout == "none" else _DROPOUT_P

    @property
    def mask_shape(self) -> tuple[int, ...] | None:
        """``x``'s shape for a full mask, ``(in_features,)`` for a shared one, None without dropout."""
        if self.dropout == "none":
            return None
        return (*self.batch, self.in_features) if self.dropout == "full" else (self.in_features,)

    def describe(self) -> str:
        """One line: the shapes, the scaling and how it is made, the mask."""
        return (
            f"x {(*self.batch, self.in_features)}, weight {(self.out_features, self.in_features)}, "
            f"bias {(self.out_features,) if self.bias else None}, A {(self.r, self.in_features)}, "
            f"B {(self.out_features, self.r)}, scaling {self.scaling!r} (alpha {self.alpha:g}, r {self.r}, "
            f"{'rsLoRA alpha/sqrt(r)' if self.use_rslora else 'alpha/r'}), dropout_mask {self.mask_shape}"
        )

    def tensors(self, rng: np.random.Generator, dtype: Any) -> dict[str, np.ndarray]:
        """The case's arrays in ``dtype``, drawn from ``rng`` in a fixed order.

        Returns
        -------
        dict
            ``x (*batch, in)``, ``weight (out, in)``, ``bias (out,)`` when the
            case has one, ``A (r, in)``, ``B (out, r)`` (non-zero, so every
            gradient is exercised), ``dropout_mask`` (shape :attr:`mask_shape`)
            when the case has dropout, and the upstream gradient ``dy (*batch, out)``.
        """
        from lowrank.nn.functional import dropout_mask

        n_in, n_out = self.in_features, self.out_features
        t = {"x": _normal(rng, (*self.batch, n_in), dtype), "weight": _normal(rng, (n_out, n_in), dtype)}
        if self.bias:
            t["bias"] = _normal(rng, (n_out,), dtype)
        t["A"] = _normal(rng, (self.r, n_in), dtype)
        t["B"] = _normal(rng, (n_out, self.r), dtype)
        if self.mask_shape is not None:
            t["dropout_mask"] = dropout_mask(self.mask_shape, self.dropout_p, random_state=rng, dtype=dtype)
        t["dy"] = _normal(rng, (*self.batch, n_out), dtype)
        return t


LINEAR_CASES = (
    LinearCase("bias", (2, 3), 5, 4, True),
    LinearCase("nobias", (5,), 5, 4, False),
)
"""Linear layers: two leading batch dimensions with a bias; one without."""

LORA_CASES = (
    LoRACase("r1_alpha1", (3,), 5, 4, 1, 1.0, False, True),
    LoRACase("r2_alpha4_batch", (2, 3), 5, 4, 2, 4.0, False, True),
    LoRACase("r4_alpha16_rslora", (3,), 6, 5, 4, 16.0, True, True),
    LoRACase("r3_alpha6_nobias", (2, 2), 5, 3, 3, 6.0, False, False),
    LoRACase("r2_alpha8_dropout", (2, 3), 5, 4, 2, 8.0, False, True, "full"),
    LoRACase("r2_alpha2_dropout_shared", (4,), 5, 4, 2, 2.0, True, False, "shared"),
    LoRACase("r2_alpha4_largebatch", (12,), 3, 4, 2, 4.0, False, True),  # N > in_features: the folded path
)
"""LoRA layers: r = 1…4, plain and rsLoRA scaling, with and without bias, both mask kinds, batch dims."""


CONV1D_CASES = (
    LoRACase("r2_alpha4_dropout_batch", (2, 3), 5, 4, 2, 4.0, False, True, "full"),
    LoRACase("r3_alpha6_square_nobias", (4,), 5, 5, 3, 6.0, True, False),  # in = out: a transposed weight fits
)
"""LoRA on transformers' Conv1D: the tensors of :meth:`LoRACase.tensors`, the weight stored transposed, (in, out)."""


@dataclass(frozen=True)
class DoRACase(LoRACase):
    """A DoRA layer as PEFT computes it: a :class:`LoRACase` with a magnitude ``m (out,)``.

    ``V = W + scaling·B@A``, ``c = m / ‖V‖_row``, and
    ``y = x @ W.T + b + (c - 1)·((x * mask) @ W.T) + c·scaling·((x * mask) @ A.T) @ B.T``.
    Without dropout that is ``y = x @ (c[:, None]·V).T + b``. The fields are
    :class:`LoRACase`'s; the tensors add the magnitude ``m (out,)``.
    """

    def tensors(self, rng: np.random.Generator, dtype: Any) -> dict[str, np.ndarray]:
        """:meth:`LoRACase.tensors`, then ``magnitude (out,)``: ``sqrt(in)`` (about ``‖W‖_row``) times U(0.5, 2).

        Returns
        -------
        dict
            ``x``, ``weight``, ``bias`` (when the case has one), ``A``, ``B``,
            ``magnitude``, ``dropout_mask`` (when the case has dropout), ``dy``.
        """
        t = super().tensors(rng, dtype)
        magnitude = (np.sqrt(self.in_features) * rng.uniform(0.5, 2.0, self.out_features)).astype(dtype)
        order = ("x", "weight", "bias", "A", "B", "magnitude", "dropout_mask", "dy")
        return {k: magnitude if k == "magnitude" else t[k] for k in order if k == "magnitude" or k in t}

    def describe(self) -> str:
        """:meth:`LoRACase.describe`, and the magnitude's shape."""
        return f"{super().describe()}, magnitude {(self.out_features,)}"


DORA_CASES = (
    DoRACase("r2_alpha4", (3,), 5, 4, 2, 4.0, False, True),
    DoRACase("r3_alpha6_nobias_batch", (2, 3), 5, 3, 3, 6.0, False, False),
    DoRACase("r4_alpha16_rslora", (3,), 6, 5, 4, 16.0, True, True),
    DoRACase("r2_alpha8_dropout", (2, 3), 5, 4, 2, 8.0, False, True, "full"),
    DoRACase("r2_alpha2_dropout_shared", (4,), 5, 4, 2, 2.0, True, False, "shared"),
    DoRACase("r2_alpha4_largebatch", (12,), 3, 4, 2, 4.0, False, True),
)
"""DoRA layers: with and without bias, both mask kinds, rsLoRA, two batch dims, a batch larger than in."""


def lora_case_strategy(*, max_batch_dims: int = 2, max_features: int = 6, max_rank: int = 4) -> Any:
    """A hypothesis strategy of :class:`LoRACase` configurations (needs hypothesis).

    Shapes shrink towards one feature, rank 1 and no batch dimension; alpha
    is one of 1, 2, 0.5, 4; scaling plain or rsLoRA; bias or not; each
    dropout kind.

    Parameters
    ----------
    max_batch_dims : int, default 2
        Up to this many leading batch dimensions, each of size 1 to 4.
    max_features : int, default 6
    max_rank : int, default 4

    Returns
    -------
    hypothesis.strategies.SearchStrategy of LoRACase
    """
    from hypothesis import strategies as st

    @st.composite
    def draw_case(draw: Any) -> LoRACase:
        batch = tuple(draw(st.lists(st.integers(1, 4), max_size=max_batch_dims)))
        n_in, n_out = draw(st.integers(1, max_features)), draw(st.integers(1, max_features))
        r = draw(st.integers(1, max_rank))
        alpha = draw(st.sampled_from([1.0, 2.0, 0.5, 4.0]))
        use_rslora, bias = draw(st.booleans()), draw(st.booleans())
        dropout = draw(st.sampled_from(DROPOUT_KINDS))
        return LoRACase("drawn", batch, n_in, n_out, r, alpha, use_rslora, bias, dropout)

    return draw_case()
