"""The multi-layer perceptron: Linear, activation, …, Linear, as a Sequential.

>>> import numpy as np
>>> from lowrank import nn
>>> model = nn.MLP([4, 8, 3], "tanh", random_state=0)
>>> [name for name, _ in model.named_parameters()]
['0.weight', '0.bias', '2.weight', '2.bias']
>>> model(np.zeros((5, 4), np.float32)).shape
(5, 3)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lowrank.nn.modules import GELU, Linear, Module, ReLU, Sequential, Sigmoid, Tanh
from lowrank.utils.validation import (
    RandomState,
    check_bool,
    check_choice,
    check_float_dtype,
    check_int,
    check_random_state,
)

__all__ = ["ACTIVATIONS", "MLP"]

# name -> a factory of a fresh activation module (one instance per use: see modules.py)
ACTIVATIONS: dict[str, Callable[[], Module]] = {
    "relu": ReLU,
    "tanh": Tanh,
    "sigmoid": Sigmoid,
    "gelu": GELU,  # the exact erf form, torch.nn.GELU()
    "gelu_tanh": lambda: GELU("tanh"),  # torch.nn.GELU(approximate="tanh")
}


class MLP(Sequential):
    """``Linear(sizes[0], sizes[1])``, activation, …, ``Linear(sizes[-2], sizes[-1])``.

    A :class:`Sequential` with no activation after the last layer (it outputs
    logits), so its parameters are named as torch's ``nn.Sequential`` of the
    same layers: ``"0.weight"``, ``"0.bias"``, ``"2.weight"``, …

    Parameters
    ----------
    sizes : sequence of int
        The layer widths, input first and output last: at least 2 entries,
        each >= 1. ``[d_in, d_out]`` is a single Linear.
    activation : {"relu", "tanh", "sigmoid", "gelu", "gelu_tanh"}, default "relu"
        Between consecutive Linear layers. ``"gelu"`` is the exact erf form,
        ``"gelu_tanh"`` the tanh approximation.
    bias : bool, default True
    dtype : float32 or float64, default float32
    random_state : None, int or numpy.random.Generator
        Resolved once and passed to every Linear in order, so the same seed
        gives the same network.

    Attributes
    ----------
    sizes : tuple of int
    activation : str
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "relu",
        *,
        bias: bool = True,
        dtype: Any = np.float32,
        random_state: RandomState = None,
    ) -> None:
        sizes = _check_sizes(sizes)
        activation = check_choice(activation, "activation", tuple(ACTIVATIONS))
        bias = check_bool(bias, "bias")
        dtype = check_float_dtype(dtype)
        rng = check_random_state(random_state)
        layers: list[Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            if i > 0:
                layers.append(ACTIVATIONS[activation]())
            layers.append(Linear(n_in, n_out, bias=bias, dtype=dtype, random_state=rng))
        super().__init__(*layers)
        self.sizes = sizes
        self.activation = activation

    def extra_repr(self) -> str:
        """``sizes=[…], activation='…'``."""
        return f"sizes={list(self.sizes)}, activation={self.activation!r}"


def _check_sizes(sizes: Any) -> tuple[int, ...]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (Sequence, np.ndarray)):
        raise TypeError(f"sizes must be a sequence of layer widths, got {type(sizes).__name__} {sizes!r}")
    if len(sizes) < 2:
        raise ValueError(f"sizes must have at least 2 entries (input and output widths), got {list(sizes)!r}")
    return tuple(check_int(s, f"sizes[{i}]", low=1) for i, s in enumerate(sizes))
