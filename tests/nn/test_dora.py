"""DoRA: the kernels of lowrank.nn.functional.dora and LoRALinear(use_dora=True).

Gradients are compared with central differences (``lowrank.reference.gradcheck``,
float64): the exact gradient with those of the forward, the detached one (PEFT's)
with those of the forward written out here with the row norm held fixed. Where
the two modes differ is checked against the projection written out by hand
(``docs/dora.md``). Forwards are compared with the formula written out in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import dora_problems

from lowrank import nn
from lowrank.nn import functional as F
from lowrank.reference.gradcheck import check_gradients

RTOL = 1e-6  # the kernels' bar for gradients against finite differences, in float64


def dora_inputs(problem: dict) -> dict:
    return {k: problem[k] for k in ("x", "weight", "bias", "A", "B", "magnitude")}


def by_hand(x, weight, bias, A, B, magnitude, scaling, mask=None, norm=None):
    """PEFT's DoRA forward in float64, as PEFT writes it: the base output plus
    ``(m/n - 1) * (xm @ W.T) + (m/n) * scaling * (xm @ A.T) @ B.T``; ``norm`` held fixed if given."""
    x, W, A, B, m = (np.asarray(a, np.float64) for a in (x, weight, A, B, magnitude))
    V = W + scaling * (B @ A)
    n = np.sqrt((V**2).sum(axis=1)) if norm is None else norm
    xm = x if mask is None else x * mask
    c = m / n
    y = x @ W.T + (c - 1) * (xm @ W.T) + c * (scaling * ((xm @ A.T) @ B.T))
    return y if bias is None else y + bias


def row_norms(weight, A, B, scaling):
    V = np.asarray(weight, np.float64) + scaling * (np.asarray(B, np.float64) @ np.asarray(A, np.float64))
    return np.sqrt((V**2).sum(axis=1))


# ---------------------------------------------------------------- forward


@given(problem=dora_problems(views=True))
def test_forward_matches_peft_formula(problem):
    s, mask = problem["scaling"], problem["dropout_mask"]
    y, _ = F.dora_linear(**dora_inputs(problem), scaling=s, dropout_mask=mask)
    expected = by_hand(**dora_inputs(problem), scaling=s, mask=mask)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(expected).max()))


@given(problem=dora_problems())
def test_weight_norm_is_the_row_norm(problem):
    W, A, B, s = problem["weight"], problem["A"], problem["B"], problem["scaling"]
    np.testing.assert_allclose(F.weight_norm(W, A, B, s), row_norms(W, A, B, s), rtol=1e-13)


@given(problem=dora_problems(dtype=np.float32, views=True) | dora_problems(views=True))
def test_fresh_adapter_gives_the_base_output_bit_for_bit(problem):
    x, W, b, A, s = problem["x"], problem["weight"], problem["bias"], problem["A"], problem["scaling"]
    zero_B = np.zeros_like(problem["B"])
    assume(row_norms(W, A, zero_B, s).min() > 1e-10)  # the base's rows need a direction too
    m = F.weight_norm(W, A, zero_B, s)  # what LoRALinear initialises the magnitude to
    y, _ = F.dora_linear(x, W, b, A, zero_B, m, s)
    y_base, _ = F.linear(x, W, b)
    assert y.dtype == y_base.dtype == x.dtype
    assert y.tobytes() == y_base.tobytes()


# ---------------------------------------------------------------- gradients


@given(problem=dora_problems(), base_trainable=st.booleans())
def test_exact_gradient_matches_finite_differences(problem, base_trainable):
    s, mask, dy, b = problem["scaling"], problem["dropout_mask"], problem["dy"], problem["bias"]
    _, cache = F.dora_linear(**dora_inputs(problem), scaling=s, dropout_mask=mask, detach_norm=False)
    g = F.dora_linear_backward(dy, cache, base_trainable=base_trainable)
    analytic = {"x": g.x, "A": g.A, "B": g.B, "magnitude": g.magnitude}
    if base_trainable:
        analytic["weight"] = g.weight
        if b is not None:
            analytic["bias"] = g.bias
    else:
        assert g.weight is None and g.bias is None

    def f(x, weight, bias, A, B, magnitude):
        return np.sum(F.dora_linear(x, weight, bias, A, B, magnitude, s, mask)[0] * dy)

    report = check_gradients(f, dora_inputs(problem), analytic, rtol=RTOL)
    assert set(report.arguments) == set(analytic)


@given(problem=dora_problems(), base_trainable=st.booleans())
def test_detached_gradient_matches_finite_differences_with_the_norm_frozen(problem, base_trainable):
    s, mask, dy, b = problem["scaling"], problem["dropout_mask"], problem["dy"], problem["bias"]
    _, cache = F.dora_linear(**dora_inputs(problem), scaling=s, dropout_mask=mask)  # detach_norm=True
    g = F.dora_linear_backward(dy, cache, base_trainable=base_trainable)
    analytic = {"x": g.x, "A": g.A, "B": g.B, "magnitude": g.magnitude}
    if base_trainable:
        analytic["weight"] = g.weight
        if b is not None:
            analytic["bias"] = g.bias
    frozen = row_norms(problem["weight"], problem["A"], problem["B"], s)

    def f(x, weight, bias, A, B, magnitude):
        return np.sum(by_hand(x, weight, bias, A, B, magnitude, s, mask, norm=frozen) * dy)

    check_gradients(f, dora_inputs(problem), analytic, rtol=RTOL)


@given(problem=dora_problems(), base_trainable=st.booleans())
def test_modes_differ_by_the_projection_onto_each_rows_direction(problem, base_trainable):
    x, W, A, B, m = (np.asarray(problem[k], np.float64) for k in ("x", "weight", "A", "B", "magnitude"))
    s, mask, dy = problem["scaling"], problem["dropout_mask"], problem["dy"]
    grads = {}
    for detach in (True, False):
        _, cache = F.dora_linear(**dora_inputs(problem), scaling=s, dropout_mask=mask, detach_norm=detach)
        grads[detach] = F.dora_linear_backward(dy, cache, base_trainable=base_trainable)
    det, exact = grads[True], grads[False]
    # the norm depends on neither x nor m: their gradients are the same in both modes
    np.testing.assert_array_equal(det.x, exact.x)
    np.testing.assert_array_equal(det.magnitude, exact.magnitude)
    # by hand: the detached gradient reaching V is c * (dy.T @ xm); the exact one removes its
    # component along each row's direction u = V / n
    V = W + s * (B @ A)
    n = np.sqrt((V**2).sum(axis=1))
    u = V / n[:, None]
    xm = x if mask is None else x * mask
    G = dy.reshape(-1, W.shape[0]).T @ xm.reshape(-1, W.shape[1])  # (out, in)
    dV = (m / n)[:, None] * G
    along = (u * dV).sum(axis=1)[:, None] * u  # (out, in): projection of each row of dV onto u
    scale = max(1.0, np.abs(dV).max() * (1 + s * np.abs(B).max() + s * np.abs(A).max()))
    np.testing.assert_allclose(det.A - exact.A, s * B.T @ along, rtol=1e-9, atol=1e-11 * scale)
    np.testing.assert_allclose(det.B - exact.B, s * along @ A.T, rtol=1e-9, atol=1e-11 * scale)
    if base_trainable:
        np.testing.assert_allclose(det.weight - exact.weight, along, rtol=1e-9, atol=1e-11 * scale)


def test_backward_recomputes_rows_with_small_or_zero_magnitude():
    # m / n below 1/2 (zero included): S is recomputed, not recovered from y; a large bias on top
    rng = np.random.default_rng(0)
    x, W, b, A, B = rng.standard_normal((7, 5)), rng.standard_normal((4, 5)), 50 * rng.standard_normal(4), \
        rng.standard_normal((2, 5)), rng.standard_normal((4, 2))  # fmt: skip
    m = row_norms(W, A, B, 1.5) * np.array([0.0, 1e-9, -0.4, 1.0])
    dy = rng.standard_normal((7, 4))
    _, cache = F.dora_linear(x, W, b, A, B, m, 1.5)
    g = F.dora_linear_backward(dy, cache)
    V = W + 1.5 * B @ A
    expected = (dy * (x @ V.T)).sum(axis=0) / np.sqrt((V**2).sum(axis=1))  # dm = Σ dy * z / n, by hand
    np.testing.assert_allclose(g.magnitude, expected, rtol=1e-13)


# ---------------------------------------------------------------- bad input


def _dora_args(**overrides):
    args = dict(
        x=np.ones((3, 5)), weight=np.eye(4, 5), bias=None, A=np.ones((2, 5)), B=np.zeros((4, 2)),
        magnitude=np.ones(4), scaling=2.0, dropout_mask=None, detach_norm=True,
    )  # fmt: skip
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(magnitude=np.ones(3)), ValueError, r"magnitude must have shape \(out_features,\) = \(4,\) .* got shape"),
        (dict(magnitude=np.ones((4, 1))), ValueError, r"magnitude must have shape"),
        (dict(magnitude=np.ones(4, np.float32)), TypeError, r"magnitude must have the same dtype as x"),
        (dict(magnitude=np.array([1.0, np.nan, 1.0, 1.0])), ValueError, r"magnitude must be finite, got nan"),
        (dict(magnitude=np.array([1.0, 1.0, np.inf, 1.0])), ValueError, r"magnitude must be finite"),
        (dict(weight=np.zeros((4, 5))), ValueError, r"nonzero norm .* got ‖V‖ = 0 at rows \[0, 1, 2, 3\]"),
        (dict(weight=np.eye(4, 5) * 1e30), None, None),
        (dict(weight=np.eye(4, 5) * 1e200), FloatingPointError, r"not finite in float64 at rows"),
        (dict(detach_norm=1), TypeError, r"detach_norm must be True or False"),
        (dict(A=np.ones((2, 4))), ValueError, r"A must have shape"),
        (dict(dropout_mask=np.ones((2, 5))), ValueError, r"dropout_mask must broadcast"),
    ],
)
def test_dora_linear_refuses_bad_input(overrides, error, match):
    if error is None:  # large but finite: accepted
        F.dora_linear(**_dora_args(**overrides))
        return
    with pytest.raises(error, match=match):
        F.dora_linear(**_dora_args(**overrides))


def test_zero_norm_row_is_refused_by_row():
    W = np.eye(4, 5)
    W[2] = 0.0  # a pruned output feature: with B = 0 its row of V is 0
    with pytest.raises(ValueError, match=r"got ‖V‖ = 0 at rows \[2\] of 4"):
        F.dora_linear(**_dora_args(weight=W))
    base = nn.Linear(5, 4, dtype=np.float64, random_state=0)
    base.weight.data = W
    with pytest.raises(ValueError, match=r"at rows \[2\]"):
        nn.LoRALinear(base, init="gaussian", random_state=0, use_dora=True)


def test_backward_refuses_bad_input():
    _, cache = F.dora_linear(**_dora_args())
    with pytest.raises(ValueError, match=r"dy must have the shape of the output y, \(3, 4\)"):
        F.dora_linear_backward(np.ones((3, 5)), cache)
    with pytest.raises(TypeError, match=r"cache must be the DoRACache returned by dora_linear\(\)"):
        F.dora_linear_backward(np.ones((3, 4)), F.linear(np.ones((3, 5)), np.ones((4, 5)))[1])
    with pytest.raises(TypeError, match=r"base_trainable must be True or False"):
        F.dora_linear_backward(np.ones((3, 4)), cache, base_trainable="yes")


# ---------------------------------------------------------------- the layer


def dora_layer(dtype, n_in=5, n_out=4, r=2, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    layer = nn.LoRALinear(nn.Linear(n_in, n_out, dtype=dtype, random_state=seed), r=r, alpha=3,
                          random_state=seed, use_dora=True, **kwargs)  # fmt: skip
    return layer, rng


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_fresh_layer_is_the_base_layer_bit_for_bit(dtype, init):
    base = nn.Linear(6, 3, dtype=dtype, random_state=1)
    x = np.random.default_rng(2).standard_normal((2, 4, 6)).astype(dtype)
    y_base = base(x)
    layer = nn.LoRALinear(base, r=2, alpha=4, init=init, random_state=0, use_dora=True).eval()
    assert layer(x).tobytes() == y_base.tobytes()
    np.testing.assert_allclose(layer.magnitude.data, row_norms(base.weight.data, layer.A.data, 0 * layer.B.data, 1),
                               rtol=1e-6 if dtype == np.float32 else 1e-14)  # fmt: skip


def test_layer_keys_counts_and_flags():
    model = nn.MLP([6, 5, 3], random_state=0)
    model = nn.inject_lora(model, r=2, alpha=4, use_dora=True, random_state=0)
    keys = set(model.state_dict())
    assert {"0.lora_magnitude_vector", "2.lora_magnitude_vector"} <= keys
    # r * (in + out) + out per adapted layer, by hand
    trainable = 2 * (6 + 5) + 5 + 2 * (5 + 3) + 3
    total = trainable + (6 * 5 + 5) + (5 * 3 + 3)
    assert nn.trainable_summary(model, quiet=True) == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )
    layer = model[0]
    assert layer.magnitude is layer.lora_magnitude_vector and layer.magnitude.trainable
    assert layer.detach_norm is True
    layer.detach_norm = False
    assert "use_dora=True, detach_norm=False" in repr(layer)
    with pytest.raises(TypeError, match="detach_norm must be True or False"):
        layer.detach_norm = "no"
    with pytest.raises(AttributeError, match="use_dora=False"):
        _ = nn.LoRALinear(nn.Linear(3, 2, random_state=0)).magnitude
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        nn.inject_lora(nn.MLP([3, 2], random_state=0), r=1, alpha=1, use_dora="yes")


def test_layer_backward_fills_the_magnitude_gradient_in_both_modes():
    layer, rng = dora_layer(np.float64)
    layer.B.data = rng.standard_normal(layer.B.shape)
    x, dy = rng.standard_normal((3, 5)), rng.standard_normal((3, 4))
    grads = {}
    for detach in (True, False):
        layer.zero_grad()
        layer.detach_norm = detach
        y = layer(x)
        layer.backward(dy)
        grads[detach] = (layer.magnitude.grad.copy(), layer.A.grad.copy())
        np.testing.assert_allclose(y, by_hand(x, layer.weight.data, layer.bias.data, layer.A.data, layer.B.data,
                                              layer.magnitude.data, layer.scaling), rtol=1e-12)  # fmt: skip
    V = layer.weight.data + layer.scaling * layer.B.data @ layer.A.data
    dm = (dy * (x @ V.T)).sum(axis=0) / np.sqrt((V**2).sum(axis=1))  # by hand
    np.testing.assert_allclose(grads[True][0], dm, rtol=1e-12)
    np.testing.assert_allclose(grads[False][0], dm, rtol=1e-12)
    assert not np.allclose(grads[True][1], grads[False][1])  # A's gradient: the modes differ


@given(dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16), big_B=st.booleans())
def test_merge_unmerge_within_the_documented_bound(dtype, seed, big_B):
    layer, rng = dora_layer(dtype, seed=seed)
    layer.B.data = ((3.0 if big_B else 0.1) * rng.standard_normal(layer.B.shape)).astype(dtype)
    layer.magnitude.data = (layer.magnitude.data * rng.uniform(0.3, 2.0, 4)).astype(dtype)
    layer.eval()
    x = rng.standard_normal((3, 5)).astype(dtype)
    W0 = layer.weight.data.copy()
    y0 = layer(x)
    layer.merge()
    V = W0.astype(np.float64) + layer.scaling * (layer.B.data.astype(np.float64) @ layer.A.data.astype(np.float64))
    merged = (layer.magnitude.data / np.sqrt((V**2).sum(axis=1)))[:, None] * V  # by hand, float64
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(layer.weight.data, merged, rtol=4 * eps, atol=4 * eps * np.abs(merged).max())
    np.testing.assert_allclose(layer(x), y0, rtol=0, atol=64 * eps * (1 + np.abs(x).sum(axis=-1).max()) *
                               max(1.0, np.abs(merged).max()))  # fmt: skip
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert np.all(np.abs(layer.weight.data - W0) <= eps * (np.abs(W0) + 2 * np.abs(V)))  # docs/dora.md's bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fresh_layer_merges_and_unmerges_bit_for_bit(dtype):
    layer, _ = dora_layer(dtype)
    W0 = layer.weight.data.copy()
    layer.merge()
    assert layer.weight.data.tobytes() == W0.tobytes()
    layer.unmerge()
    assert layer.weight.data.tobytes() == W0.tobytes()


def test_merge_refuses_a_zero_magnitude_and_merge_lora_folds_dora():
    layer, rng = dora_layer(np.float64)
    layer.B.data = rng.standard_normal(layer.B.shape)
    layer.magnitude.data[1] = 0.0
    with pytest.raises(ValueError, match=r"magnitude is 0 at rows \[1\]"):
        layer.merge()
    assert not layer.merged
    layer.magnitude.data[1] = 0.7
    model = nn.Sequential(layer, nn.Tanh()).eval()
    x = rng.standard_normal((3, 5))
    plain = nn.merge_lora(model)
    assert "0.lora_magnitude_vector" not in plain.state_dict()
    np.testing.assert_allclose(plain(x), model(x), rtol=1e-13)


def test_pissa_with_dora_initialises_the_magnitude_after_the_residual():
    base = nn.Linear(6, 5, dtype=np.float64, random_state=3)
    W = base.weight.data.copy()
    layer = nn.LoRALinear(base, r=2, alpha=4, init="pissa", random_state=0, use_dora=True).eval()
    # m is the row norm of residual + scaling * B @ A, which is W up to one rounding
    np.testing.assert_allclose(layer.magnitude.data, row_norms(W, 0 * layer.A.data, layer.B.data, 1), rtol=1e-13)
    x = np.random.default_rng(0).standard_normal((3, 6))
    np.testing.assert_allclose(layer(x), x @ W.T + base.bias.data, rtol=1e-12, atol=1e-13)


def test_inject_lora_refuses_a_zero_row_before_changing_the_model():
    model = nn.MLP([4, 3, 2], random_state=0)
    model[2].weight.data[1] = 0.0
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer '2': DoRA needs every row .* at rows \[1\]"):
        nn.inject_lora(model, r=1, alpha=1, init="pissa", use_dora=True, random_state=0)
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2))
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())
