"""PyTorch CPU bfloat16 and float16 LoRA layers against lowrank.precision's bounds and emulation.

PyTorch runs the layer as PEFT does (``linear(x, W, b) + linear(linear(x, A), B)
* scaling``) in the format, with its own float32 accumulation order; every
output must lie inside :func:`lowrank.precision.lora_linear_bound` around the
float64 result. PyTorch's merged layer (PEFT's ``merge`` in the format) too.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowrank import precision as P

torch = pytest.importorskip("torch")
F = torch.nn.functional
TORCH_TYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _t(a: np.ndarray, fmt: str):
    return torch.from_numpy(np.ascontiguousarray(a)).to(TORCH_TYPES[fmt])


def _torch_forward(x, W, bias, A, B, s, fmt, form):
    """PEFT's unmerged forward, or its merge (``W + (B @ A) * s`` in the format) then the base layer."""
    xt, Wt, At, Bt = (_t(a, fmt) for a in (x, W, A, B))
    bt = None if bias is None else _t(bias, fmt)
    with torch.no_grad():
        if form == "unmerged":
            y = F.linear(xt, Wt, bt) + F.linear(F.linear(xt, At), Bt) * s
        else:
            merged = Wt + (Bt @ At) * s
            y = F.linear(xt, merged, bt)
    return y.float().numpy()


@st.composite
def torch_layers(draw):
    n, d_in, d_out = (draw(st.integers(1, 24)) for _ in range(3))
    r = draw(st.integers(1, 6))
    values = st.floats(-4, 4, allow_nan=False, allow_infinity=False)
    arr = lambda shape: draw(hnp.arrays(np.float64, shape, elements=values))  # noqa: E731
    bias = draw(st.none() | st.just(arr((d_out,))))
    return arr((n, d_in)), arr((d_out, d_in)), bias, arr((r, d_in)), arr((d_out, r)), draw(st.floats(-8, 8))


@given(torch_layers(), st.sampled_from(["bfloat16", "float16"]), st.sampled_from(["unmerged", "merged"]))
def test_torch_half_precision_lora_lies_inside_the_bound(layer, fmt, form):
    x, W, bias, A, B, s = layer
    y = _torch_forward(x, W, bias, A, B, s, fmt, form)
    exact = x @ W.T + (0 if bias is None else bias) + s * ((x @ A.T) @ B.T)
    bound = P.lora_linear_bound(x, W, bias, A, B, s, fmt, form)
    assert (np.abs(y - exact) <= bound).all()


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_torch_and_the_emulation_agree_to_a_few_units_on_a_typical_layer(fmt):
    """Same roundings at the same places; only the float32 summation order differs."""
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((64, 256)), rng.uniform(-1, 1, (128, 256)) / 16
    A, B, bias = rng.uniform(-1, 1, (8, 256)) / 16, 0.1 * rng.standard_normal((128, 8)), rng.standard_normal(128)
    ours, _ = P.lora_linear(x, W, bias, A, B, 2.0, fmt)
    theirs = _torch_forward(x, W, bias, A, B, 2.0, fmt, "unmerged")
    exact = x @ W.T + bias + 2.0 * ((x @ A.T) @ B.T)
    bound = P.lora_linear_bound(x, W, bias, A, B, 2.0, fmt)
    assert (np.abs(theirs - exact) <= bound).all() and (np.abs(ours - exact) <= bound).all()
    assert np.mean(ours == theirs) > 0.99  # measured: 99.8 % (float16), 100 % (bfloat16) bit for bit
    # the rest differ by a rounding flip in base or v: a unit or two of the terms' magnitude
    assert (np.abs(ours - theirs) <= 2 * P.unit_roundoff(fmt) * (np.abs(x) @ np.abs(W).T + np.abs(bias))).all()


def test_torch_rounds_float64_twice_where_lowrank_rounds_once():
    x = np.array([1 + 2**-8 + 2**-30])
    assert torch.from_numpy(x).to(torch.bfloat16).double().item() == 1.0  # through float32
    assert P.round_to(x, "bfloat16")[0] == 1 + 2**-7


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_torch_casts_of_float32_equal_round_to(fmt):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[~np.isnan(x)]
    theirs = torch.from_numpy(x).to(TORCH_TYPES[fmt]).float().numpy()
    np.testing.assert_array_equal(P.round_to(x, fmt).view(np.uint32), theirs.view(np.uint32))
