"""``precision.bounds.dora_linear_bound``: PEFT's 16-bit DoRA forward, emulated here step by step, stays inside it.

The emulation is written out in this file from PEFT's ``DoraLinearLayer``
(every operation a float32 result rounded to the format); the exact output
is the float64 formula. PEFT's own bfloat16 and float16 layers are held
against the same bound in ``tests/crosscheck/test_dora_peft_adapter.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowrank.precision import FORMATS, round_to
from lowrank.precision.bounds import dora_linear_bound


@st.composite
def dora_layers(draw, max_features: int = 12, max_rank: int = 4):
    """x (batch, in), W (out, in), bias or None, A (r, in), B (out, r), m (out,), scaling, in float64."""
    n, d_in, d_out = (draw(st.integers(1, max_features)) for _ in range(3))
    r = draw(st.integers(1, max_rank))
    values = st.floats(-4, 4, allow_nan=False, allow_infinity=False)  # subnormals included: the h terms
    arr = lambda shape: draw(hnp.arrays(np.float64, shape, elements=values))  # noqa: E731
    x, W, A, B = arr((n, d_in)), arr((d_out, d_in)), arr((r, d_in)), arr((d_out, r))
    bias = draw(st.none() | st.just(arr((d_out,))))
    m = draw(hnp.arrays(np.float64, (d_out,), elements=st.floats(0.25, 4)))
    scaling = draw(st.floats(-8, 8, allow_nan=False))
    return x, W, bias, A, B, m, scaling


def emulated(x, W, bias, A, B, m, s, fmt):
    """PEFT's DoraLinearLayer forward (eval, base result handed in) in fmt, each float32 result rounded."""

    def R(v):
        return round_to(np.asarray(v, np.float32), fmt)

    x, W, A, B, m = R(x), R(W), R(A), R(B), R(m)
    b = None if bias is None else R(bias)
    s32 = np.float32(s)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        base = R(x @ W.T + (0 if b is None else b))  # (N, out)
        V = R(W + R(s32 * R(B @ A)))  # (out, in)
        n = R(np.sqrt(np.sum(V * V, axis=1, dtype=np.float32)))  # (out,)
        c = R(m / n)  # (out,)
        z = base if b is None else R(base - b)  # (N, out): x W^T
        lora = R(R(x @ A.T) @ B.T)  # (N, out)
        return R(base + R(R(R(c - 1) * z) + R(R(c * lora) * s32)))


def exact(x, W, bias, A, B, m, s):
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero row: its column is left out (no bound)
        c = m / np.linalg.norm(W + s * B @ A, axis=1)  # (out,)
        return x @ W.T + (0.0 if bias is None else bias) + (c - 1) * (x @ W.T) + c * (s * (x @ A.T) @ B.T)


@given(dora_layers(), st.sampled_from(FORMATS))
def test_the_emulated_dora_error_never_exceeds_the_bound(layer, fmt):
    x, W, bias, A, B, m, s = layer
    bound = dora_linear_bound(x, W, bias, A, B, m, s, fmt)
    resolved = np.isfinite(bound)  # a column whose norm could round to 0 has no bound
    y_hat = emulated(x, W, bias, A, B, m, s, fmt)
    assume(np.isfinite(y_hat[resolved]).all())  # the bound assumes no overflow
    err = np.abs(y_hat.astype(np.float64) - exact(x, W, bias, A, B, m, s))
    assert (err[resolved] <= bound[resolved]).all(), float(np.max(err[resolved] / bound[resolved]))


def test_a_norm_too_small_to_resolve_gives_an_infinite_bound_and_shapes_are_checked():
    W = np.array([[1.0, 0.0], [1e-45, 0.0]])  # row 1 rounds to 0 in bfloat16
    bound = dora_linear_bound(np.ones((1, 2)), W, None, np.zeros((1, 2)), np.zeros((2, 1)), np.ones(2), 1.0, "bfloat16")
    assert np.isfinite(bound[0, 0]) and bound[0, 1] == np.inf
    with pytest.raises(ValueError, match=r"magnitude must have shape \(2,\), got \(3,\)"):
        dora_linear_bound(np.ones((1, 2)), W, None, np.zeros((1, 2)), np.zeros((2, 1)), np.ones(3), 1.0, "bfloat16")
