"""The attention kernels and layers against PyTorch autograd and transformers, in float64.

layer_norm, softmax, scaled_dot_product_attention (boolean, additive and causal masks),
embedding, gelu_tanh (transformers' ``NewGELUActivation``, GPT-2's ``gelu_new``),
cross_entropy with ignore_index, and ``nn.Conv1D`` against ``transformers.pytorch_utils.Conv1D``:
outputs and every gradient to 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from strategies import (  # noqa: E402
    attention_problems,
    elementwise_inputs,
    embedding_problems,
    float_arrays,
    ignored_target_problems,
    layer_norm_problems,
    linear_problems,
)

from lowrank import nn  # noqa: E402
from lowrank.nn import functional as F  # noqa: E402

TOL = {"rtol": 1e-12, "atol": 1e-12}


def leaf(a: np.ndarray):
    """A float64 torch leaf holding a C-contiguous copy of ``a`` (torch refuses negative strides, and
    transformers' Conv1D views its input, which needs a contiguous tensor)."""
    return torch.tensor(np.array(a, dtype=np.float64, order="C", copy=True), requires_grad=True)


@given(layer_norm_problems(views=True))
def test_layer_norm_matches_torch(p):
    d = p["x"].shape[-1]
    x = leaf(p["x"])
    w = None if p["weight"] is None else leaf(p["weight"])
    b = None if p["bias"] is None else leaf(p["bias"])
    ty = torch.nn.functional.layer_norm(x, (d,), w, b, eps=1e-5)
    ty.backward(torch.tensor(p["dy"]))
    y, cache = F.layer_norm(p["x"], p["weight"], p["bias"], eps=1e-5)
    g = F.layer_norm_backward(p["dy"], cache)
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL)
    np.testing.assert_allclose(g.x, x.grad.numpy(), **TOL)
    if w is not None:
        np.testing.assert_allclose(g.weight, w.grad.numpy(), **TOL)
        np.testing.assert_allclose(g.bias, b.grad.numpy(), **TOL)


@given(x=elementwise_inputs(scale=20.0, views=True), axis=st.sampled_from([-1, 0]), data=st.data())
def test_softmax_matches_torch(x, axis, data):
    dy = data.draw(float_arrays(np.float64, x.shape))
    tx = leaf(x)
    ty = torch.softmax(tx, dim=axis)
    ty.backward(torch.tensor(dy))
    y, cache = F.softmax(x, axis)
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL)
    np.testing.assert_allclose(F.softmax_backward(dy, cache), tx.grad.numpy(), **TOL)


@given(attention_problems(views=True))
def test_scaled_dot_product_attention_matches_torch(p):
    q, k, v = leaf(p["q"]), leaf(p["k"]), leaf(p["v"])
    t, s = p["q"].shape[-2], p["k"].shape[-2]
    mask = None if p["attn_mask"] is None else torch.tensor(p["attn_mask"])
    if p["is_causal"] and mask is not None:  # torch's autograd path refuses both: give it their meet
        causal = torch.ones(t, s, dtype=torch.bool).tril()
        mask = mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, -torch.inf)
    is_causal = p["is_causal"] and mask is None
    if p["dropout_mask"] is None:
        ty = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                              scale=p["scale"])  # fmt: skip
    else:  # torch draws its own dropout: write its math path out with our mask
        scale = p["scale"] if p["scale"] is not None else 1 / np.sqrt(p["q"].shape[-1])
        scores = (q @ k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
        if is_causal:
            scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool).tril(), -torch.inf)
        blind = (scores == -torch.inf).all(dim=-1, keepdim=True)  # a row masked everywhere: weights 0, as SDPA
        weights = torch.softmax(scores.masked_fill(blind, 0.0), dim=-1).masked_fill(blind, 0.0)
        ty = (weights * torch.tensor(p["dropout_mask"])) @ v
    ty.backward(torch.tensor(p["dy"]))
    y, cache = F.scaled_dot_product_attention(p["q"], p["k"], p["v"], p["attn_mask"], p["is_causal"],
                                              p["dropout_mask"], p["scale"])  # fmt: skip
    g = F.scaled_dot_product_attention_backward(p["dy"], cache)
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL)
    for name, ours, theirs in (("q", g.q, q), ("k", g.k, k), ("v", g.v, v)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), **TOL, err_msg=name)


@given(embedding_problems())
def test_embedding_matches_torch(p):
    w = leaf(p["weight"])
    ty = torch.nn.functional.embedding(torch.tensor(p["indices"]), w)
    ty.backward(torch.tensor(p["dy"]))
    y, cache = F.embedding(p["indices"], p["weight"])
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_allclose(F.embedding_backward(p["dy"], cache), w.grad.numpy(), **TOL)


@given(x=elementwise_inputs(scale=8.0, views=True), data=st.data())
def test_gelu_tanh_matches_transformers_gelu_new(x, data):
    activations = pytest.importorskip("transformers.activations")
    dy = data.draw(float_arrays(np.float64, x.shape))
    tx = leaf(x)
    ty = activations.ACT2FN["gelu_new"](tx)
    ty.backward(torch.tensor(dy))
    y, cache = F.gelu_tanh(x)
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL)
    np.testing.assert_allclose(F.gelu_tanh_backward(dy, cache), tx.grad.numpy(), **TOL)


@given(ignored_target_problems())
def test_cross_entropy_with_ignore_index_matches_torch(p):
    c = p["logits"].shape[-1]
    logits = leaf(p["logits"])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, c), torch.tensor(p["target"]).reshape(-1),
                                             ignore_index=p["ignore_index"])  # fmt: skip
    loss.backward()
    ours, grad = F.cross_entropy(p["logits"], p["target"], p["ignore_index"])
    assert ours == pytest.approx(loss.item(), rel=1e-13, abs=1e-15)
    np.testing.assert_allclose(grad, logits.grad.numpy(), **TOL)


@given(problem=linear_problems(bias=True, views=True), frozen=st.booleans())
def test_conv1d_layer_matches_transformers_conv1d(problem, frozen):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    n_out, n_in = problem["weight"].shape
    ours = nn.Conv1D(n_in, n_out, dtype=np.float64)
    ours.load_state_dict({"weight": np.ascontiguousarray(problem["weight"].T), "bias": problem["bias"]})
    ours.weight.trainable = not frozen
    theirs = pytorch_utils.Conv1D(n_out, n_in).double()  # transformers' argument order: (nf=out, nx=in)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})  # same keys, same layout
    theirs.weight.requires_grad_(not frozen)
    x = leaf(problem["x"])
    ty = theirs(x)
    ty.backward(torch.tensor(problem["dy"].copy()))
    y = ours(problem["x"])
    dx = ours.backward(problem["dy"])
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL)
    np.testing.assert_allclose(dx, x.grad.numpy(), **TOL)
    np.testing.assert_allclose(ours.bias.grad, theirs.bias.grad.numpy(), **TOL)
    if frozen:
        assert ours.weight.grad is None and theirs.weight.grad is None
    else:
        np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), **TOL)


def test_layer_norm_and_embedding_layers_match_torch_modules():
    rng = np.random.default_rng(0)
    ln, tln = nn.LayerNorm(6, eps=1e-5, dtype=np.float64), torch.nn.LayerNorm(6, eps=1e-5).double()
    emb, temb = nn.Embedding(7, 6, dtype=np.float64, random_state=0), torch.nn.Embedding(7, 6).double()
    ln.load_state_dict({"weight": rng.standard_normal(6), "bias": rng.standard_normal(6)})
    for ours, theirs in ((ln, tln), (emb, temb)):  # the same state-dict keys and shapes as torch's
        assert list(ours.state_dict()) == list(theirs.state_dict())
        theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    idx = np.array([[0, 6, 6, 2], [1, 0, 6, 3]])
    dy = rng.standard_normal((2, 4, 6))
    ty = tln(temb(torch.tensor(idx)))
    ty.backward(torch.tensor(dy))
    y = ln(emb(idx))
    emb.backward(ln.backward(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL)
    for ours, theirs in ((ln.weight, tln.weight), (ln.bias, tln.bias), (emb.weight, temb.weight)):
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), **TOL)
