"""The attention kernels and layers: layer_norm, softmax, scaled_dot_product_attention,
embedding, conv1d, gelu_tanh, cross_entropy with ignore_index; Conv1D, LayerNorm, Embedding.

Every gradient is compared with float64 central differences
(``lowrank.reference.gradcheck``); forwards with formulas written out here in NumPy
and ``scipy.special``; the embedding scatter with a loop by hand; causality and the
layer-norm shift invariance as properties. PyTorch and transformers are in
``tests/crosscheck/test_attention_torch.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    FLOAT_DTYPES,
    attention_problems,
    elementwise_inputs,
    embedding_problems,
    float_arrays,
    ignored_target_problems,
    layer_norm_problems,
    linear_problems,
)

from lowrank import nn
from lowrank.nn import functional as F
from lowrank.reference.gradcheck import check_gradients, check_module_gradients

RTOL = 1e-6  # the bar for every kernel's gradient, in float64


def assert_close(actual, expected, dtype, f32: float = 1e-5, f64: float = 1e-12) -> None:
    """``actual`` equals ``expected`` to ``f32`` or ``f64`` (relative and absolute), by ``dtype``."""
    tol = f32 if np.dtype(dtype) == np.float32 else f64
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


def attention_args(p: dict) -> tuple:
    return p["q"], p["k"], p["v"], p["attn_mask"], p["is_causal"], p["dropout_mask"], p["scale"]


def attention_reference(q, k, v, attn_mask=None, is_causal=False, dropout_mask=None, scale=None):
    """Attention written out one query at a time in float64, fully masked rows giving 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t, s, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    batch = q.shape[:-2]
    bias = np.zeros((*batch, t, s))
    if attn_mask is not None:
        m = np.broadcast_to(attn_mask, bias.shape)
        bias = np.where(m, 0.0, -np.inf) if m.dtype == bool else bias + m
    if is_causal:
        bias = bias + np.where(np.arange(s)[None, :] <= np.arange(t)[:, None], 0.0, -np.inf)
    drop = np.ones((*batch, t, s)) if dropout_mask is None else np.broadcast_to(dropout_mask, (*batch, t, s))
    y = np.zeros((*batch, t, v.shape[-1]))
    for b in np.ndindex(*batch):
        for i in range(t):
            scores = scale * (k[b] @ q[b][i]) + bias[b][i]  # (S,)
            if np.all(scores == -np.inf):
                continue
            w = np.exp(scores - scores.max())
            w /= w.sum()
            y[b][i] = (w * drop[b][i]) @ v[b]
    return y


# ---------------------------------------------------------------- gradients vs finite differences


@given(problem=layer_norm_problems(), trainable=st.booleans())
def test_layer_norm_gradients_match_finite_differences(problem, trainable):
    x, w, b, dy = problem["x"], problem["weight"], problem["bias"], problem["dy"]
    g = F.layer_norm_backward(dy, F.layer_norm(x, w, b)[1], trainable=trainable)
    inputs = {"x": x}
    analytic = {"x": g.x}
    if w is not None:
        inputs |= {"weight": w, "bias": b}
        if trainable:
            analytic |= {"weight": g.weight, "bias": g.bias}
        else:
            assert g.weight is None and g.bias is None

    def f(x, weight=w, bias=b):
        return np.sum(F.layer_norm(x, weight, bias)[0] * dy)

    check_gradients(f, inputs, analytic, rtol=RTOL)


@given(x=elementwise_inputs(scale=5.0), axis=st.sampled_from([-1, 0]), data=st.data())
def test_softmax_gradients_match_finite_differences(x, axis, data):
    dy = data.draw(float_arrays(np.float64, x.shape))
    dx = F.softmax_backward(dy, F.softmax(x, axis)[1])
    check_gradients(lambda x: np.sum(F.softmax(x, axis)[0] * dy), {"x": x}, {"x": dx}, rtol=RTOL)


@given(attention_problems())
def test_attention_gradients_match_finite_differences(p):
    g = F.scaled_dot_product_attention_backward(p["dy"], F.scaled_dot_product_attention(*attention_args(p))[1])

    def f(q, k, v):
        return np.sum(F.scaled_dot_product_attention(q, k, v, *attention_args(p)[3:])[0] * p["dy"])

    check_gradients(f, {"q": p["q"], "k": p["k"], "v": p["v"]}, {"q": g.q, "k": g.k, "v": g.v}, rtol=RTOL)


@given(embedding_problems())
def test_embedding_gradient_matches_finite_differences(p):
    dweight = F.embedding_backward(p["dy"], F.embedding(p["indices"], p["weight"])[1])

    def f(weight):
        return np.sum(F.embedding(p["indices"], weight)[0] * p["dy"])

    check_gradients(f, {"weight": p["weight"]}, {"weight": dweight}, rtol=RTOL)


@given(problem=linear_problems(), trainable=st.booleans())
def test_conv1d_gradients_match_finite_differences(problem, trainable):
    x, b, dy = problem["x"], problem["bias"], problem["dy"]
    W = np.ascontiguousarray(problem["weight"].T)  # (in, out)
    g = F.conv1d_backward(dy, F.conv1d(x, W, b)[1], trainable=trainable)
    inputs = {"x": x, "weight": W, "bias": b}
    analytic = {"x": g.x}
    if trainable:
        analytic["weight"] = g.weight
        if b is not None:
            analytic["bias"] = g.bias

    def f(x, weight, bias):
        return np.sum(F.conv1d(x, weight, bias)[0] * dy)

    check_gradients(f, inputs, analytic, rtol=RTOL)


@given(x=elementwise_inputs(scale=4.0), data=st.data())
def test_gelu_tanh_gradient_matches_finite_differences(x, data):
    dy = data.draw(float_arrays(np.float64, x.shape))
    dx = F.gelu_tanh_backward(dy, F.gelu_tanh(x)[1])
    check_gradients(lambda x: np.sum(F.gelu_tanh(x)[0] * dy), {"x": x}, {"x": dx}, rtol=RTOL)


@given(ignored_target_problems())
def test_cross_entropy_with_ignored_targets_gradient_matches_finite_differences(p):
    _, grad = F.cross_entropy(p["logits"], p["target"], p["ignore_index"])
    check_gradients(
        lambda logits: F.cross_entropy(logits, p["target"], p["ignore_index"])[0],
        {"logits": p["logits"]}, {"logits": grad}, rtol=RTOL,
    )  # fmt: skip


# ---------------------------------------------------------------- forwards vs formulas written out


@given(problem=layer_norm_problems(views=True), dtype=FLOAT_DTYPES)
def test_layer_norm_matches_the_formula(problem, dtype):
    x = problem["x"].astype(dtype)
    w, b = (None if a is None else a.astype(dtype) for a in (problem["weight"], problem["bias"]))
    y, _ = F.layer_norm(x, w, b, eps=1e-5)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)  # np.var: biased
    if w is not None:
        ref = ref * w + b
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref, dtype)


@given(problem=layer_norm_problems(), shift=st.floats(-50.0, 50.0), data=st.data())
def test_layer_norm_ignores_a_constant_added_to_each_row(problem, shift, data):
    x, w, b = problem["x"], problem["weight"], problem["bias"]
    shifts = shift + data.draw(float_arrays(np.float64, (*x.shape[:-1], 1), bound=10.0))  # one constant per row
    y, c = F.layer_norm(x, w, b)
    y_shifted, c_shifted = F.layer_norm(x + shifts, w, b)
    np.testing.assert_allclose(y_shifted, y, rtol=1e-9, atol=1e-9)
    dy = problem["dy"]
    dx, dx_shifted = F.layer_norm_backward(dy, c).x, F.layer_norm_backward(dy, c_shifted).x
    np.testing.assert_allclose(dx_shifted, dx, rtol=1e-8, atol=1e-8)


@given(x=elementwise_inputs(scale=30.0), dtype=FLOAT_DTYPES)
def test_softmax_matches_scipy_and_sums_to_one(x, dtype):
    x = x.astype(dtype)
    y, _ = F.softmax(x)
    assert y.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(y, scipy.special.softmax(x.astype(np.float64), axis=-1), rtol=tol * 10, atol=tol)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=tol * 10)


def test_softmax_is_finite_for_huge_inputs_and_zero_on_all_masked_rows():
    x = np.array([[1e300, -1e300, 0.0], [-np.inf, -np.inf, -np.inf], [-np.inf, 2.0, 2.0]])
    y, cache = F.softmax(x)
    np.testing.assert_array_equal(y, [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    np.testing.assert_array_equal(F.softmax_backward(np.ones((3, 3)), cache)[1], 0.0)


@given(attention_problems(views=True), FLOAT_DTYPES)
def test_attention_matches_the_formula_written_out(p, dtype):
    cast = {k: (p[k].astype(dtype) if isinstance(p[k], np.ndarray) and p[k].dtype != bool else p[k])
            for k in ("q", "k", "v", "attn_mask", "dropout_mask")}  # fmt: skip
    y, _ = F.scaled_dot_product_attention(cast["q"], cast["k"], cast["v"], cast["attn_mask"], p["is_causal"],
                                          cast["dropout_mask"], p["scale"])  # fmt: skip
    ref = attention_reference(cast["q"], cast["k"], cast["v"], cast["attn_mask"], p["is_causal"],
                              cast["dropout_mask"], p["scale"])  # fmt: skip
    assert y.dtype == dtype and y.shape == ref.shape
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, ref, rtol=tol, atol=tol)


@given(p=attention_problems(causal=True, dropout=False, mask_kind="none"), data=st.data())
def test_causal_attention_never_looks_ahead(p, data):
    """Changing the tokens at positions >= i never changes the output at positions < i,
    and an upstream gradient at positions < i gives zero gradient to the keys and values at >= i."""
    q, k, v = p["q"], p["k"], p["v"]
    t = q.shape[-2]
    i = data.draw(st.integers(0, t - 1))
    later = (..., slice(i, None), slice(None))
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[later] = data.draw(float_arrays(np.float64, a[later].shape))
    y, cache = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y2, _ = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    np.testing.assert_array_equal(y2[..., :i, :], y[..., :i, :])
    dy = p["dy"].copy()
    dy[later] = 0.0
    g = F.scaled_dot_product_attention_backward(dy, cache)
    np.testing.assert_array_equal(g.k[later], 0.0)
    np.testing.assert_array_equal(g.v[later], 0.0)


@given(embedding_problems(), FLOAT_DTYPES)
def test_embedding_scatter_sums_repeated_indices_like_a_loop(p, dtype):
    indices, weight, dy = p["indices"], p["weight"].astype(dtype), p["dy"].astype(dtype)
    y, cache = F.embedding(indices, weight)
    dweight = F.embedding_backward(dy, cache)
    expected_y = np.zeros((*indices.shape, weight.shape[1]), dtype)
    expected_dw = np.zeros(weight.shape)
    for pos in np.ndindex(*indices.shape):
        expected_y[pos] = weight[indices[pos]]
        expected_dw[indices[pos]] += dy[pos]
    assert y.dtype == dtype and dweight.dtype == dtype and dweight.shape == weight.shape
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_allclose(dweight, expected_dw, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6)


def test_embedding_gradient_of_one_index_used_many_times_is_the_sum():
    weight = np.arange(12.0).reshape(4, 3)
    _, cache = F.embedding(np.array([[2, 2], [2, 0]]), weight)
    dy = np.arange(12.0).reshape(2, 2, 3)
    np.testing.assert_array_equal(F.embedding_backward(dy, cache),
                                  [[9, 10, 11], [0, 0, 0], [0 + 3 + 6, 1 + 4 + 7, 2 + 5 + 8], [0, 0, 0]])  # fmt: skip


@given(x=elementwise_inputs(scale=6.0), dtype=FLOAT_DTYPES)
def test_gelu_tanh_is_gpt2s_gelu_new(x, dtype):
    x = x.astype(dtype)
    y, _ = F.gelu_tanh(x)
    x64 = x.astype(np.float64)
    ref = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))  # transformers' NewGELU
    assert y.dtype == dtype
    assert_close(y, ref, dtype, f64=1e-14)


@given(ignored_target_problems(), FLOAT_DTYPES)
def test_cross_entropy_skips_ignored_targets_and_averages_over_the_rest(p, dtype):
    logits, target = p["logits"].astype(dtype), p["target"]
    loss, grad = F.cross_entropy(logits, target)
    kept = target != -100
    logp = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)[kept]  # (n_kept, C)
    t = target[kept]
    assert loss == pytest.approx(-logp[np.arange(t.size), t].mean(), rel=1e-6 if dtype == np.float32 else 1e-13)
    expected = np.zeros(logits.shape)
    expected[kept] = (np.exp(logp) - np.eye(logits.shape[-1])[t]) / t.size
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close(grad, expected, dtype, f32=1e-6, f64=1e-15)


def test_cross_entropy_ignore_index_may_be_a_class():
    logits = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    loss, grad = F.cross_entropy(logits, np.array([1, 0, 1]), ignore_index=1)  # only row 1 counts
    assert loss == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-15)
    np.testing.assert_array_equal(grad[[0, 2]], 0.0)


@given(problem=linear_problems(views=True), dtype=FLOAT_DTYPES)
def test_conv1d_is_x_at_weight_plus_bias(problem, dtype):
    x, W = problem["x"].astype(dtype), problem["weight"].T.astype(dtype)  # (in, out)
    b = None if problem["bias"] is None else problem["bias"].astype(dtype)
    y, _ = F.conv1d(x, W, b)
    ref = x.astype(np.float64) @ W.astype(np.float64) + (0.0 if b is None else b)
    assert y.dtype == dtype
    assert_close(y, ref, dtype, f64=1e-13)


# ---------------------------------------------------------------- layers


@given(problem=linear_problems(bias=True), frozen=st.booleans())
def test_conv1d_layer_gradients_frozen_or_not(problem, frozen):
    n_out, n_in = problem["weight"].shape
    layer = nn.Conv1D(n_in, n_out, dtype=np.float64)
    layer.load_state_dict({"weight": problem["weight"].T, "bias": problem["bias"]})
    layer.weight.trainable = not frozen  # frozen weight beside a trainable bias: PEFT's bias="all"
    report = check_module_gradients(layer, problem["x"], dy=problem["dy"])
    assert report.passed
    assert sorted(report.arguments) == (["bias", "x"] if frozen else ["bias", "weight", "x"])
    assert (layer.weight.grad is None) == frozen


def test_conv1d_layer_has_transformers_layout_and_init():
    layer = nn.Conv1D(300, 200, random_state=0)
    assert layer.weight.shape == (300, 200) and layer.bias.shape == (200,)
    assert (layer.in_features, layer.out_features) == (300, 200)
    assert layer.weight.dtype == np.float32 and list(layer.state_dict()) == ["weight", "bias"]
    assert abs(layer.weight.data.std() - 0.02) < 0.001 and abs(layer.weight.data.mean()) < 0.001
    np.testing.assert_array_equal(layer.bias.data, 0.0)
    assert nn.Conv1D(3, 2, bias=False).bias is None
    x = np.ones((2, 300), np.float32)
    np.testing.assert_allclose(layer(x), x @ layer.weight.data, rtol=1e-6)


@given(problem=layer_norm_problems())
def test_layer_norm_layer_gradients(problem):
    x = problem["x"]
    layer = nn.LayerNorm(x.shape[-1], dtype=np.float64)
    if problem["weight"] is not None:
        layer.load_state_dict({"weight": problem["weight"], "bias": problem["bias"]})
    assert check_module_gradients(layer, x, dy=problem["dy"]).passed


def test_layer_norm_layer_init_options_and_frozen_parameters():
    layer = nn.LayerNorm(4)
    np.testing.assert_array_equal(layer.weight.data, 1.0)
    np.testing.assert_array_equal(layer.bias.data, 0.0)
    assert layer.weight.dtype == np.float32 and layer.eps == 1e-5
    bare = nn.LayerNorm(4, elementwise_affine=False, dtype=np.float64)
    assert bare.weight is None and bare.parameters() == []
    x = np.array([[1.0, 2.0, 3.0, 6.0]])
    y = bare(x)
    np.testing.assert_allclose(y, (x - 3.0) / np.sqrt(3.5 + 1e-5), rtol=1e-15)
    assert bare.backward(np.ones_like(y)).shape == x.shape
    layer.weight.trainable = False
    layer(np.ones((2, 4), np.float32) * np.arange(4, dtype=np.float32))
    layer.backward(np.ones((2, 4), np.float32))
    assert layer.weight.grad is None and layer.bias.grad is not None
    np.testing.assert_array_equal(layer.bias.grad, 2.0)


def test_embedding_layer_init_forward_backward_and_accumulation():
    layer = nn.Embedding(1000, 8, random_state=0)
    assert layer.weight.shape == (1000, 8) and layer.weight.dtype == np.float32
    assert abs(layer.weight.data.std() - 1.0) < 0.03  # N(0, 1), as torch
    idx = np.array([[3, 3, 999]])
    y = layer(idx)
    assert y.shape == (1, 3, 8)
    np.testing.assert_array_equal(y[0, 2], layer.weight.data[999])
    assert layer.backward(np.ones((1, 3, 8), np.float32)) is None  # no gradient for integer input
    layer(idx)
    layer.backward(np.ones((1, 3, 8), np.float32))  # a second backward adds into .grad
    np.testing.assert_array_equal(layer.weight.grad[3], 4.0)
    np.testing.assert_array_equal(layer.weight.grad[999], 2.0)
    assert not layer.weight.grad[:3].any()
    layer.weight.trainable = False
    layer.zero_grad()
    layer(idx)
    layer.backward(np.ones((1, 3, 8), np.float32))
    assert layer.weight.grad is None


# ---------------------------------------------------------------- bad input


Z = np.zeros


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: F.embedding(np.array([0.0, 1.0]), Z((3, 2))), TypeError, r"indices must hold integers .* float64"),
        (lambda: F.embedding(np.array([True]), Z((3, 2))), TypeError, r"indices must hold integers .* bool"),
        (lambda: F.embedding(np.array([[0, 3]]), Z((3, 2))), ValueError,
         r"indices must be in \[0, num_embeddings\) = \[0, 3\), got 3 at index \(0, 1\)"),
        (lambda: F.embedding(np.array([-1]), Z((3, 2))), ValueError, r"got -1 at index \(0,\)"),
        (lambda: F.embedding(np.array([0]), Z(3)), ValueError, r"weight must be a 2-D array"),
        (lambda: F.embedding_backward(Z((2, 3)), F.embedding(np.array([0]), Z((3, 2)))[1]), ValueError,
         r"dy must have the shape of the output y"),
        (lambda: F.layer_norm(Z((2, 3)), Z(4)), ValueError, r"weight must have shape \(D,\) = \(3,\)"),
        (lambda: F.layer_norm(Z((2, 3)), Z(3, np.float32)), TypeError, r"weight must have the same dtype as x"),
        (lambda: F.layer_norm(Z((2, 3)), eps=0.0), ValueError, r"eps must be in \(0, inf\)"),
        (lambda: F.layer_norm(Z((2, 0))), ValueError, r"non-empty last axis"),
        (lambda: F.softmax(np.array([np.nan, 0.0])), ValueError, r"x must be finite.*only -inf"),
        (lambda: F.softmax(np.array([np.inf, 0.0])), ValueError, r"x must be finite"),
        (lambda: F.softmax(Z((2, 3)), axis=2), ValueError, r"axis must be in \[-2, 1\]"),
        (lambda: F.scaled_dot_product_attention(Z((2, 3)), Z((2, 4)), Z((2, 3))), ValueError,
         r"q, k and v must have shapes \(\.\.\., T, d\), \(\.\.\., S, d\)"),
        (lambda: F.scaled_dot_product_attention(Z((1, 2, 3)), Z((2, 2, 3)), Z((2, 2, 3))), ValueError,
         r"the same leading dimensions"),
        (lambda: F.scaled_dot_product_attention(Z(3), Z(3), Z(3)), ValueError, r"at least 2"),
        (lambda: F.scaled_dot_product_attention(Z((2, 3)), Z((2, 3), np.float32), Z((2, 3))), TypeError,
         r"k must have the same dtype as q"),
        (lambda: F.scaled_dot_product_attention(Z((2, 3)), Z((4, 3)), Z((4, 3)), attn_mask=Z((2, 3), bool)),
         ValueError, r"attn_mask must broadcast to the scores' shape \(\.\.\., T, S\) = \(2, 4\), got shape \(2, 3\)"),
        (lambda: F.scaled_dot_product_attention(Z((2, 3)), Z((4, 3)), Z((4, 3)), attn_mask=np.full((2, 4), np.nan)),
         ValueError, r"attn_mask must be finite"),
        (lambda: F.scaled_dot_product_attention(Z((2, 3)), Z((4, 3)), Z((4, 3)), dropout_mask=Z((3, 4))),
         ValueError, r"dropout_mask must broadcast"),
        (lambda: F.scaled_dot_product_attention(Z((2, 3)), Z((2, 3)), Z((2, 3)), is_causal=1), TypeError,
         r"is_causal must be True or False"),
        (lambda: F.scaled_dot_product_attention(Z((2, 3)), Z((2, 3)), Z((2, 3)), scale=np.nan), ValueError,
         r"scale must be in"),
        (lambda: F.conv1d(Z((2, 3)), Z((4, 5))), ValueError, r"in_features = weight.shape\[0\] = 4"),
        (lambda: F.conv1d(Z((2, 4)), Z((4, 5)), Z(4)), ValueError, r"bias must have shape \(out_features,\) = \(5,\)"),
        (lambda: F.cross_entropy(Z((2, 3)), np.array([-100, -100])), ValueError,
         r"at least one position .* ignore_index = -100"),
        (lambda: F.cross_entropy(Z((2, 3)), np.array([0, -1])), ValueError,
         r"got -1 at index \(1,\) \(a target equal to ignore_index = -100 is skipped\)"),
        (lambda: F.cross_entropy(Z((2, 3)), np.array([0, 1]), ignore_index=1.5), TypeError,
         r"ignore_index must be an integer"),
        (lambda: nn.Embedding(3, 2)(np.array([[0, 3]])), ValueError, r"indices must be in .* got 3 at index \(0, 1\)"),
        (lambda: nn.Embedding(3, 2)(np.array([0.0])), TypeError, r"indices must hold integers"),
        (lambda: nn.Embedding(0, 2), ValueError, r"num_embeddings must be in \[1, inf\]"),
        (lambda: nn.LayerNorm(3)(np.ones((2, 4), np.float32)), ValueError,
         r"\(\.\.\., normalized_shape\) = \(\.\.\., 3\)"),
        (lambda: nn.LayerNorm(3)(np.ones((2, 3))), TypeError, r"x must have the layer's dtype float32"),
        (lambda: nn.LayerNorm(3, eps=-1.0), ValueError, r"eps must be in \(0, inf\)"),
        (lambda: nn.Conv1D(3, 2)(np.ones((2, 2), np.float32)), ValueError,
         r"x must have shape \(\.\.\., in_features\)"),
        (lambda: nn.Conv1D(3, 2, dtype=np.float16), TypeError, r"dtype must be float32 or float64"),
    ],
)
def test_bad_input_is_refused_with_a_named_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_backward_without_forward_is_a_runtime_error():
    for layer in (nn.Conv1D(3, 2), nn.LayerNorm(3), nn.Embedding(3, 2)):
        with pytest.raises(RuntimeError, match=r"backward called without a forward"):
            layer.backward(np.zeros((1, 2), np.float32))


def test_attention_with_no_keys_is_zero_as_torch_and_softmax_of_an_empty_axis_is_empty():
    # S = 0: every query sees no key, the all-masked rule gives weights and output 0
    # (torch.nn.functional.scaled_dot_product_attention returns zeros of shape (..., T, dv))
    q = np.arange(24.0).reshape(2, 3, 4)
    y, cache = F.scaled_dot_product_attention(q, np.zeros((2, 0, 4)), np.zeros((2, 0, 5)))
    assert y.shape == (2, 3, 5) and not y.any()
    g = F.scaled_dot_product_attention_backward(np.ones((2, 3, 5)), cache)
    assert g.q.shape == (2, 3, 4) and not g.q.any()
    assert g.k.shape == (2, 0, 4) and g.v.shape == (2, 0, 5)
    p, sm = F.softmax(np.zeros((3, 0)))  # torch.softmax(torch.zeros(3, 0), -1): shape (3, 0)
    assert p.shape == (3, 0)
    assert F.softmax_backward(np.zeros((3, 0)), sm).shape == (3, 0)


def test_an_integer_attention_mask_is_refused_as_torch_does():
    # transformers' attention_mask is int64 with 1 = attend: read as an additive mask it would add
    # 1 to the kept scores and leave the padding unmasked, silently. torch's SDPA raises a
    # RuntimeError ("Expected attn_mask dtype to be bool or float"); lowrank a TypeError.
    q = np.ones((2, 3))
    with pytest.raises(TypeError, match=r"attn_mask must be boolean .* or float .*, got dtype int64"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=np.ones((2, 2), dtype=np.int64))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: F.scaled_dot_product_attention(np.ones((2, 3)), np.ones((2, 3), np.float32), np.ones((2, 3))),
         r"k must have the same dtype as q, got k float32 and q float64"),
        (lambda: F.scaled_dot_product_attention(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3), np.float32)),
         r"v must have the same dtype as q, got v float32 and q float64"),
        (lambda: F.lora_embedding(np.array([0]), np.ones((3, 2)), np.ones((1, 3), np.float32), np.ones((2, 1)), 1.0),
         r"A must have the same dtype as weight, got A float32 and weight float64"),
        (lambda: F.lora_embedding(np.array([0]), np.ones((3, 2)), np.ones((1, 3)), np.ones((2, 1), np.float32), 1.0),
         r"B must have the same dtype as weight, got B float32 and weight float64"),
    ],
)
def test_a_dtype_mismatch_names_the_argument_it_must_match(call, match):
    # these kernels have no argument x: the message names q (attention) or weight (the embedding table)
    with pytest.raises(TypeError, match=match):
        call()


def test_embedding_backward_refuses_a_dy_whose_last_axis_is_not_embedding_dim():
    # weight (5, 3): a dy of shape (2, 4) is not the output's shape (2, 3); the scatter made a (5, 4)
    # "gradient" of a (5, 3) table without a word (torch raises on the shape mismatch)
    _, cache = F.embedding(np.array([0, 2]), np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"dy must have the shape of the output y, \(2, 3\), got shape \(2, 4\)"):
        F.embedding_backward(np.ones((2, 4)), cache)


def test_gelu_tanh_backward_refuses_the_cache_of_the_erf_gelu():
    # the same cache class carries either form: at x = 1 the erf form's gradient is
    # Φ(1) + φ(1) = 1.0833, gelu_new's 1.0830 (formulas); the tanh backward returned the first
    x = np.array([1.0])
    _, erf_cache = F.gelu(x)
    with pytest.raises(TypeError, match=r"cache must be the GELUCache returned by gelu_tanh\(\), got one of gelu"):
        F.gelu_tanh_backward(np.ones(1), erf_cache)
    t = math.tanh(math.sqrt(2 / math.pi) * (1 + 0.044715))
    expected = 0.5 * (1 + t) + 0.5 * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715)
    np.testing.assert_allclose(F.gelu_tanh_backward(np.ones(1), F.gelu_tanh(x)[1]), [expected], rtol=1e-14)
