"""Both evaluation paths of lora_linear against the formulas of docs/lora.md, written out here.

``lora_linear`` folds ``scaling * B @ A`` into the weight when the batch has
more rows than the layer has inputs (forward) or outputs (backward) and there
is no dropout mask; otherwise it evaluates the low-rank term as
``(xm @ A.T) @ B.T``. Hypothesis draws the arrays themselves (bounded floats,
so every failure shrinks), the batch size that picks each path, x in every
memory layout (C, Fortran, strided, reversed), masks, and ``B = 0``
(``strategies.lora_path_cases``). The reference is plain float64 NumPy in this
file, never a lowrank kernel, and its tolerance comes from the same formula
evaluated on absolute values (a bound on the rounding error of every sum).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import LORA_PATHS, lora_path_cases

from lowrank.nn import functional as F
from lowrank.nn.functional import dense


def by_hand(x, W, b, A, B, scaling, mask, dy):
    """y and every gradient of y = x W^T + b + scaling ((x * mask) A^T) B^T, in float64, from docs/lora.md."""
    x, W, A, B, dy = (np.asarray(a, np.float64) for a in (x, W, A, B, dy))
    batch, n_in, n_out = x.shape[:-1], W.shape[1], W.shape[0]
    x2, dy2 = x.reshape(-1, n_in), dy.reshape(-1, n_out)  # (N, in), (N, out)
    m2 = np.ones_like(x2) if mask is None else np.broadcast_to(mask, x.shape).reshape(-1, n_in)
    xm = x2 * m2  # (N, in)
    xa = xm @ A.T  # (N, r)
    y = x2 @ W.T + scaling * xa @ B.T + (0.0 if b is None else b)  # (N, out)
    dxa = scaling * dy2 @ B  # (N, r)
    return {
        "y": y.reshape(*batch, n_out),
        "x": (dy2 @ W + (dxa @ A) * m2).reshape(*batch, n_in),
        "A": dxa.T @ xm,  # (r, in)
        "B": scaling * dy2.T @ xa,  # (out, r)
        "weight": dy2.T @ x2,  # (out, in)
        "bias": None if b is None else dy2.sum(axis=0),  # (out,)
    }


def run(case, base_trainable):
    args = {k: v for k, v in case.items() if k != "dy"}
    y, cache = F.lora_linear(**args)
    return y, F.lora_linear_backward(case["dy"], cache, base_trainable=base_trainable)


def assert_close(name, got, expected, bound, dtype):
    """|got - expected| <= 8 (k + 2) eps * bound entry by entry, bound the formula on |inputs|, k the longest sum."""
    eps = np.finfo(dtype).eps
    err = np.abs(got.astype(np.float64) - expected)
    allowed = 8 * 16 * eps * bound + 1e-300
    assert np.all(err <= allowed), f"{name}: max error {err.max():.3g}, allowed {allowed.max():.3g}"


@given(case=lora_path_cases(), base_trainable=st.booleans())
def test_every_path_matches_the_formula_by_hand(case, base_trainable):
    y, g = run(case, base_trainable)
    args = {k: case[k] for k in ("x", "weight", "bias", "A", "B", "scaling", "dropout_mask", "dy")}
    ref = by_hand(*args.values())
    absolute = {k: None if v is None else np.abs(v) for k, v in args.items()}
    bound = by_hand(*absolute.values())
    dtype = case["x"].dtype
    assert y.dtype == dtype and y.shape == ref["y"].shape
    assert_close("y", y, ref["y"], bound["y"], dtype)
    assert g.x.shape == case["x"].shape
    for name in ("x", "A", "B") + (("weight", "bias") if base_trainable else ()):
        got = getattr(g, name)
        if ref[name] is None:
            assert got is None
            continue
        assert got.dtype == dtype and got.shape == ref[name].shape, name
        assert_close(name, got, ref[name], bound[name], dtype)
    if not base_trainable:
        assert g.weight is None and g.bias is None


@given(case=lora_path_cases(), base_trainable=st.booleans())
def test_outputs_and_gradients_are_c_contiguous_arrays_of_their_own(case, base_trainable):
    y, g = run(case, base_trainable)
    outputs = {"y": y, "dx": g.x, "dA": g.A, "dB": g.B, "dW": g.weight, "db": g.bias}
    for name, out in outputs.items():
        if out is None:
            continue
        assert out.flags.c_contiguous, f"{name} is not C-contiguous: strides {out.strides}"
        for given_name, given_array in case.items():
            if isinstance(given_array, np.ndarray):
                assert not np.shares_memory(out, given_array), f"{name} shares memory with {given_name}"


@pytest.mark.parametrize("path", LORA_PATHS)
@given(data=st.data())
def test_a_fresh_adapter_gives_the_base_output_bit_for_bit(path, data):
    case = data.draw(lora_path_cases(path=path, zero_B=True))
    y, _ = run(case, base_trainable=False)
    x, W, b = case["x"], case["weight"], case["bias"]
    base = x.reshape(-1, W.shape[1]) @ W.T  # (N, out): the same product as a plain linear layer
    if b is not None:
        base += b
    assert y.tobytes() == base.reshape(y.shape).tobytes()


@pytest.mark.parametrize(
    ("n_rows", "with_mask", "folds_forward", "folds_backward"),
    [(7, False, True, True), (7, True, False, False), (3, False, False, False), (5, False, True, False)],
)
def test_the_fold_runs_exactly_when_it_pays(monkeypatch, n_rows, with_mask, folds_forward, folds_backward):
    # in = 4, out = 6: 7 rows fold both passes, 5 rows only the forward (N > in), 3 rows neither;
    # a dropout mask never folds (the LoRA path sees x * mask, the base path x)
    calls = []
    for name in ("lora_linear_folded", "lora_linear_backward_folded"):
        real = getattr(dense, name)
        monkeypatch.setattr(dense, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    rng = np.random.default_rng(0)
    x, W, A, B = (rng.standard_normal(s) for s in [(n_rows, 4), (6, 4), (2, 4), (6, 2)])
    mask = np.full(x.shape, 2.0) if with_mask else None
    y, cache = F.lora_linear(x, W, None, A, B, 1.5, mask)
    F.lora_linear_backward(np.ones_like(y), cache)
    assert ("lora_linear_folded" in calls) == folds_forward
    assert ("lora_linear_backward_folded" in calls) == folds_backward
