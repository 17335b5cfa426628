"""clip_grad_norm_ against torch.nn.utils.clip_grad_norm_: norm types, dtypes, non-finite norms, the error."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from strategies import float_arrays  # noqa: E402

from lowrank.nn import Parameter  # noqa: E402
from lowrank.nn.optim import NonFiniteNormError, clip_grad_norm_  # noqa: E402

TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


@st.composite
def gradient_sets(draw):
    dtypes = draw(st.lists(st.sampled_from([np.float32, np.float64]), min_size=1, max_size=3))
    return [draw(float_arrays(dt, draw(st.sampled_from([(3,), (2, 3), (1, 4)])), bound=4.0)) for dt in dtypes]


def both(grads):
    ours = [Parameter(np.zeros_like(g)) for g in grads]
    theirs = [torch.zeros(g.shape, dtype=TORCH_DTYPE[g.dtype], requires_grad=True) for g in grads]
    for p, t, g in zip(ours, theirs, grads, strict=True):
        p.grad = g.copy()
        t.grad = torch.tensor(g.copy())
    return ours, theirs


@given(gradient_sets(), st.sampled_from([1.0, 2.0, 3.0, math.inf]), st.floats(0.05, 20.0))
def test_clip_grad_norm_matches_torch(grads, norm_type, max_norm):
    ours, theirs = both(grads)
    total = clip_grad_norm_(ours, max_norm, norm_type=norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type)
    expected_dtype = {torch.float32: np.float32, torch.float64: np.float64}[ttotal.dtype]
    assert total.dtype == expected_dtype
    # torch sums a float32 gradient's norm in float32 in its own order: that norm is good to ~1e-7
    rtol = 1e-5 if any(g.dtype == np.float32 for g in grads) else 1e-12
    np.testing.assert_allclose(total, ttotal.numpy(), rtol=rtol, atol=1e-30)
    for p, t in zip(ours, theirs, strict=True):
        assert p.grad.dtype == t.grad.numpy().dtype
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=rtol,
                                   atol=np.finfo(p.grad.dtype).smallest_normal)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_a_non_finite_norm_scales_as_torch_does(bad, norm_type):
    grads = [np.array([bad, 1.0, -2.0]), np.array([0.5])]
    ours, theirs = both(grads)
    total = clip_grad_norm_(ours, 1.0, norm_type=norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type=norm_type)
    np.testing.assert_array_equal(total, ttotal.numpy())
    for p, t in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(p.grad, t.grad.numpy())  # NaN where torch has NaN, 0 where it has 0


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_error_if_nonfinite_raises_where_torch_raises(bad):
    ours, theirs = both([np.array([bad, 1.0])])
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="must be finite"):  # a RuntimeError here too
        clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    with pytest.raises(NonFiniteNormError):
        clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    ok, tok = both([np.array([3.0, 4.0])])
    assert clip_grad_norm_(ok, 1.0, error_if_nonfinite=True) == float(
        torch.nn.utils.clip_grad_norm_(tok, 1.0, error_if_nonfinite=True))
