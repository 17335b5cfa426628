"""LoRA on Conv1D (fan_in_fan_out), on an Embedding, and loralib's MergedLinear (enable_lora).

Each against something independent: float64 central differences
(``check_gradients``), the forward and merge formulas written out by hand
here, and the parameter counts from their formulas.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import lora_embedding_problems, lora_problems, merged_lora_problems

from lowrank import nn
from lowrank.nn import functional as F
from lowrank.reference.gradcheck import check_gradients, check_module_gradients


def _conv1d_lora(n_in, n_out, r=2, alpha=4.0, bias=True, dropout=0.0, seed=0):
    base = nn.Conv1D(n_in, n_out, bias=bias, dtype=np.float64, random_state=seed)
    layer = nn.LoRALinear(base, r=r, alpha=alpha, dropout=dropout, random_state=seed)
    layer.B.data = np.random.default_rng(seed + 1).standard_normal(layer.B.shape)  # B = 0 would make dA = 0
    return layer


def _delta_by_blocks(A, B, scaling, enable, n_out):
    """loralib's merge_AB() * scaling written out: block j of the enabled ones gets B_j @ A_j."""
    k, d = sum(enable), n_out // len(enable)
    r = A.shape[0] // k
    delta = np.zeros((n_out, A.shape[1]))
    j = 0
    for g, on in enumerate(enable):
        if on:
            delta[g * d : (g + 1) * d] = scaling * B[j * d : (j + 1) * d] @ A[j * r : (j + 1) * r]
            j += 1
    return delta


# ---------------------------------------------------------------- LoRA on Conv1D


@given(lora_problems(dtype=np.float64))
def test_conv1d_lora_forward_and_gradients(p):
    """A LoRALinear on a Conv1D holding W.T: y = x @ W_conv + b + s (x*mask) @ A.T @ B.T, and its gradients."""
    n_out, n_in = p["weight"].shape
    r = p["A"].shape[0]
    base = nn.Conv1D(n_in, n_out, bias=p["bias"] is not None, dtype=np.float64)
    base.weight.data = np.ascontiguousarray(p["weight"].T)  # (in, out)
    if p["bias"] is not None:
        base.bias.data = np.array(p["bias"])
    layer = nn.LoRALinear(base, r=r, alpha=p["scaling"] * r)
    layer.A.data, layer.B.data = np.array(p["A"]), np.array(p["B"])
    x = p["x"]
    expected = x @ base.weight.data + layer.scaling * (x @ p["A"].T) @ p["B"].T  # by hand, Conv1D's layout
    if p["bias"] is not None:
        expected = expected + p["bias"]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.clear_cache()
    check_module_gradients(layer, x, p["dy"])


def test_conv1d_lora_trainable_base_and_dropout_gradients():
    """Trainable base: the weight's gradient lands in Conv1D's (in, out) layout; dropout active."""
    layer = _conv1d_lora(5, 4, dropout=0.3)
    layer.weight.trainable = layer.bias.trainable = True
    x = np.random.default_rng(5).standard_normal((2, 3, 5))
    report = check_module_gradients(layer, x)
    assert set(report.arguments) == {"x", "weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert layer.weight.grad.shape == (5, 4)


def test_conv1d_lora_merge_writes_the_transposed_update():
    layer = _conv1d_lora(5, 6, r=3, alpha=6.0).eval()
    W0 = layer.weight.data.copy()  # (in, out)
    x = np.random.default_rng(2).standard_normal((4, 5))
    y = layer(x)
    layer.merge()
    expected = W0 + (2.0 * layer.B.data @ layer.A.data).T  # W + (s B @ A).T in the (in, out) layout
    np.testing.assert_allclose(layer.weight.data, expected, rtol=1e-15, atol=1e-15)
    assert layer.weight.data.flags.c_contiguous and layer.base.weight.data is layer.weight.data
    np.testing.assert_allclose(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data, W0, rtol=0, atol=4 * np.finfo(np.float64).eps * 8)
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A.weight", "lora_B.weight"]


def test_conv1d_lora_pissa_keeps_the_output():
    base = nn.Conv1D(6, 5, dtype=np.float64, random_state=0)
    x = np.random.default_rng(1).standard_normal((3, 6))
    y0 = base(x)
    layer = nn.LoRALinear(base, r=2, alpha=4, init="pissa")
    np.testing.assert_allclose(layer(x), y0, rtol=1e-12, atol=1e-12)
    assert layer.weight.shape == (6, 5)


# ---------------------------------------------------------------- LoRA on an Embedding


@given(lora_embedding_problems())
def test_lora_embedding_forward_and_gradients(p):
    """y = W[idx] + s A.T[idx] @ B.T by hand; dA (scattered, repeats summed), dB and dW against finite differences."""
    idx, dy, s = p["idx"], p["dy"], p["scaling"]
    y, cache = F.lora_embedding(idx, p["weight"], p["A"], p["B"], s)
    expected = np.zeros((*idx.shape, p["weight"].shape[1]))
    for pos in np.ndindex(*idx.shape):
        i = idx[pos]
        expected[pos] = p["weight"][i] + s * p["B"] @ p["A"][:, i]
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    g = F.lora_embedding_backward(dy, cache, base_trainable=True)

    def f(weight, A, B):
        return np.sum(F.lora_embedding(idx, weight, A, B, s)[0] * dy)

    check_gradients(f, {"weight": p["weight"], "A": p["A"], "B": p["B"]}, {"weight": g.weight, "A": g.A, "B": g.B})
    assert F.lora_embedding_backward(dy, cache).weight is None  # a frozen table's gradient is never computed


def test_lora_embedding_repeated_indices_sum():
    """Index 1 read three times: its column of dA is the sum of the three rows of s dy @ B."""
    weight, A, B = np.zeros((3, 2)), np.ones((1, 3)), np.array([[1.0], [2.0]])
    idx = np.array([1, 0, 1, 1])
    dy = np.arange(8.0).reshape(4, 2)
    _, cache = F.lora_embedding(idx, weight, A, B, 0.5)
    g = F.lora_embedding_backward(dy, cache)
    per_row = 0.5 * dy @ B  # (4, 1)
    np.testing.assert_array_equal(g.A, [[per_row[1, 0], per_row[0, 0] + per_row[2, 0] + per_row[3, 0], 0.0]])


def test_lora_embedding_layer_init_merge_and_keys():
    base = nn.Embedding(7, 4, dtype=np.float64, random_state=0)
    layer = nn.LoRAEmbedding(base, r=2, alpha=4, random_state=0)
    assert list(layer.state_dict()) == ["weight", "lora_embedding_A", "lora_embedding_B"]
    assert layer.A.shape == (2, 7) and layer.B.shape == (4, 2)
    assert not layer.A.data.any() and layer.B.data.all()  # PEFT's init: A = 0, B ~ N(0, 1)
    idx = np.array([[0, 3, 3], [6, 1, 0]])
    np.testing.assert_array_equal(layer(idx), base.weight.data[idx])  # a fresh adapter changes nothing
    layer.A.data = np.random.default_rng(1).standard_normal((2, 7))
    y = layer(idx)
    W0 = layer.weight.data.copy()
    layer.merge()
    np.testing.assert_allclose(layer.weight.data, W0 + 2.0 * (layer.B.data @ layer.A.data).T, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(layer(idx), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="while merged"):
        layer.backward(np.ones_like(y))
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data, W0, rtol=0, atol=1e-14)
    layer(idx)
    assert layer.backward(np.ones_like(y)) is None
    assert layer.A.grad.shape == (2, 7) and layer.weight.grad is None


def test_lora_embedding_bad_input():
    layer = nn.LoRAEmbedding(nn.Embedding(5, 3, dtype=np.float64), r=1)
    with pytest.raises(TypeError, match="integers"):
        layer(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        layer(np.array([0, 5]))
    with pytest.raises(ValueError, match="pissa"):
        nn.LoRAEmbedding(nn.Embedding(5, 3), r=1, init="pissa")
    with pytest.raises(TypeError, match="base must be an Embedding"):
        nn.LoRAEmbedding(nn.Linear(2, 2), r=1)


# ---------------------------------------------------------------- loralib's MergedLinear


@given(merged_lora_problems())
def test_merged_linear_forward_and_gradients(p):
    """y = x W.T + b + s (x*mask) ΔW.T with ΔW built block by block; every gradient against finite differences."""
    enable, s, mask, bias = p["enable_lora"], p["scaling"], p["dropout_mask"], p["bias"]
    W, A, B, x, dy = p["weight"], p["A"], p["B"], p["x"], p["dy"]
    delta = _delta_by_blocks(A, B, s, enable, W.shape[0])
    xm = x if mask is None else x * mask
    expected = x @ W.T + xm @ delta.T + (0.0 if bias is None else bias)
    y, cache = F.lora_merged_linear(x, W, bias, A, B, s, enable, mask)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(F.merged_delta_core(A, B, s, F.enabled_rows(W.shape[0], tuple(enable)), W.shape[0]),
                               delta, rtol=1e-15, atol=1e-15)  # fmt: skip
    g = F.lora_merged_linear_backward(dy, cache, base_trainable=True)
    inputs = {"x": x, "weight": W, "A": A, "B": B}
    analytic = {"x": g.x, "weight": g.weight, "A": g.A, "B": g.B}
    if bias is not None:
        inputs["bias"], analytic["bias"] = bias, g.bias

    def f(x, weight, A, B, bias=None):
        return np.sum(F.lora_merged_linear(x, weight, bias, A, B, s, enable, mask)[0] * dy)

    check_gradients(f, inputs, analytic)


def test_merged_linear_layer_on_conv1d_q_v_only():
    """enable_lora=[True, False, True] on a fused (in, 3 d) Conv1D: the k block is untouched, keys as loralib's."""
    base = nn.Conv1D(4, 6, dtype=np.float64, random_state=0)
    layer = nn.LoRAMergedLinear(base, r=2, alpha=4, enable_lora=[True, False, True], random_state=0).eval()
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    assert layer.A.shape == (4, 4) and layer.B.shape == (4, 2)  # (k r, in), (k d, r) with k = 2, d = 2
    layer.B.data = np.random.default_rng(3).standard_normal((4, 2))
    x = np.random.default_rng(4).standard_normal((3, 4))
    y = layer(x)
    np.testing.assert_array_equal(y[:, 2:4], base(x)[:, 2:4])  # W_k: no update
    W0 = layer.weight.data.copy()
    layer.merge()
    np.testing.assert_allclose(
        layer.weight.data, W0 + _delta_by_blocks(layer.A.data, layer.B.data, 2.0, [True, False, True], 6).T,
        rtol=1e-15, atol=1e-15,
    )  # fmt: skip
    np.testing.assert_allclose(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data, W0, rtol=0, atol=1e-14)
    layer.train()
    check_module_gradients(layer, x)


def test_merged_linear_bad_enable_lora():
    with pytest.raises(ValueError, match="must divide out_features = 6"):
        nn.LoRAMergedLinear(nn.Linear(4, 6), r=1, enable_lora=[True, False, True, False])
    with pytest.raises(ValueError, match="at least one block"):
        nn.LoRAMergedLinear(nn.Linear(4, 6), r=1, enable_lora=[False, False])
    with pytest.raises(TypeError, match="list of bools"):
        nn.LoRAMergedLinear(nn.Linear(4, 6), r=1, enable_lora=[1, 0])


# ---------------------------------------------------------------- one injection path for all of them


class _Tiny(nn.Module):
    """An Embedding, a fused Conv1D "c_attn" (3 blocks), a Conv1D "c_proj" and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 6, dtype=np.float64, random_state=0)
        self.c_attn = nn.Conv1D(6, 9, dtype=np.float64, random_state=1)
        self.c_proj = nn.Conv1D(9, 6, dtype=np.float64, random_state=2)
        self.head = nn.Linear(6, 3, dtype=np.float64, random_state=3)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.head(self.c_proj(self.act(self.c_attn(self.wte(x)))))

    def backward(self, dy):
        self.wte.backward(self.c_attn.backward(self.act.backward(self.c_proj.backward(self.head.backward(dy)))))


@pytest.mark.parametrize(
    ("kwargs", "kinds"),
    [
        ({}, {"c_attn": nn.LoRALinear, "c_proj": nn.LoRALinear, "head": nn.LoRALinear}),
        ({"targets": ["wte", "c_attn"]}, {"wte": nn.LoRAEmbedding, "c_attn": nn.LoRALinear}),
        ({"target_modules": ["c_attn"], "enable_lora": [True, False, True]}, {"c_attn": nn.LoRAMergedLinear}),
        ({"target_modules": ["c_proj", "head"], "use_dora": True}, {"c_proj": nn.LoRALinear, "head": nn.LoRALinear}),
    ],
)
def test_inject_lora_dispatch_freeze_count_and_merge(kwargs, kinds):
    model = _Tiny()
    idx = np.array([[1, 4, 4, 10], [0, 2, 7, 7]])
    model = nn.inject_lora(model, r=2, alpha=4, random_state=0, **kwargs)
    layers = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.LORA_LAYERS)}
    assert layers == kinds
    trainable = sorted(name for name, p in model.named_parameters() if p.trainable)
    expected = sorted(
        f"{name}.{key}" for name, m in model.named_modules() if isinstance(m, nn.LORA_LAYERS)
        for key in m.state_dict() if "lora" in key
    )  # fmt: skip
    assert trainable == expected
    sizes = {"wte": 2 * (11 + 6), "c_attn": 2 * (6 + 9), "c_proj": 2 * (9 + 6), "head": 2 * (6 + 3)}
    if "enable_lora" in kwargs:
        sizes["c_attn"] = 2 * 2 * (6 + 3)  # k r (in + d)
    if kwargs.get("use_dora"):
        sizes["c_proj"] += 6  # DoRA's magnitude: one per output
        sizes["head"] += 3
    n_train = sum(sizes[name] for name in kinds)
    assert sum(p.size for p in model.parameters() if p.trainable) == n_train
    for m in model.modules():
        if isinstance(m, nn.LORA_LAYERS):
            m.A.data = np.random.default_rng(8).standard_normal(m.A.shape)
            m.B.data = np.random.default_rng(9).standard_normal(m.B.shape)
    model.eval()
    y = model(idx)
    plain = nn.merge_lora(model)
    assert not any(isinstance(m, nn.LORA_LAYERS) for m in plain.modules())
    assert sorted(plain.state_dict()) == sorted(_Tiny().state_dict())
    np.testing.assert_allclose(plain(idx), y, rtol=1e-12, atol=1e-12)
    model.train()
    dy = np.random.default_rng(1).standard_normal(y.shape)
    model(idx)
    model.backward(dy)
    assert all(p.grad is not None for p in model.parameters() if p.trainable)


def test_inject_lora_refusals_name_the_problem():
    with pytest.raises(ValueError, match=r"targets \['attn'\] are not Linear, Conv1D or Embedding layers"):
        nn.inject_lora(_Tiny(), r=2, alpha=4, targets=["attn"])
    with pytest.raises(ValueError, match=r"target_modules \['q_proj'\] matches no"):
        nn.inject_lora(_Tiny(), r=2, alpha=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="enable_lora is for fused"):
        nn.inject_lora(_Tiny(), r=2, alpha=4, targets=["wte"], enable_lora=[True])
    with pytest.raises(ValueError, match=r"layer 'c_attn': len\(enable_lora\) must divide out_features = 9"):
        nn.inject_lora(_Tiny(), r=2, alpha=4, targets=["c_attn", "c_proj"], enable_lora=[True, True])
    with pytest.raises(ValueError, match="init='pissa' is for Linear and Conv1D"):
        nn.inject_lora(_Tiny(), r=2, alpha=4, targets=["wte"], init="pissa")
    model = _Tiny()
    state = model.state_dict()
    with pytest.raises(ValueError):
        nn.inject_lora(model, r=2, alpha=4, targets=["c_attn", "nope"])
    assert all(isinstance(m, (nn.Embedding, nn.Conv1D, nn.Linear, nn.Tanh, _Tiny)) for m in model.modules())
    assert all(np.array_equal(v, state[k]) for k, v in model.state_dict().items())


@given(st.sampled_from([nn.LoRALinear, nn.LoRAMergedLinear]), st.booleans())
def test_merge_refused_on_overflow_leaves_weights(kind, conv):
    base = nn.Conv1D(3, 6, dtype=np.float32) if conv else nn.Linear(3, 6, dtype=np.float32)
    kwargs = {"enable_lora": [True, False, True]} if kind is nn.LoRAMergedLinear else {}
    layer = kind(base, r=1, alpha=1, **kwargs)
    layer.A.data[:] = 1e30
    layer.B.data[:] = 1e30
    W0 = layer.weight.data.copy()
    with pytest.raises(FloatingPointError, match="unchanged"):
        layer.merge()
    np.testing.assert_array_equal(layer.weight.data, W0)
    assert not layer.merged


@given(st.sampled_from(["conv1d", "embedding", "merged"]), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**32 - 1))  # fmt: skip
def test_merge_unmerge_round_trip_within_two_roundings(kind, dtype, seed):
    """After merge(); unmerge() every entry is within eps (|W| + |ΔW|) of where it was: one rounding each way."""
    if kind == "conv1d":
        layer = nn.LoRALinear(nn.Conv1D(5, 6, dtype=dtype, random_state=seed), r=2, alpha=3, random_state=seed)
    elif kind == "embedding":
        layer = nn.LoRAEmbedding(nn.Embedding(7, 4, dtype=dtype, random_state=seed), r=2, alpha=3, random_state=seed)
    else:
        layer = nn.LoRAMergedLinear(nn.Conv1D(5, 6, dtype=dtype, random_state=seed), r=2, alpha=3,
                                    enable_lora=[True, False, True], random_state=seed)  # fmt: skip
    rng = np.random.default_rng(seed)
    layer.A.data = rng.standard_normal(layer.A.shape).astype(dtype)
    layer.B.data = rng.standard_normal(layer.B.shape).astype(dtype)
    W0 = layer.weight.data.copy()
    delta = layer.delta_weight()
    delta = delta.T if getattr(layer, "fan_in_fan_out", False) else delta  # into the stored layout
    layer.merge()
    np.testing.assert_allclose(layer.weight.data, W0.astype(np.float64) + delta,
                               rtol=np.finfo(dtype).eps, atol=0)  # fmt: skip
    layer.unmerge()
    bound = np.finfo(dtype).eps * (np.abs(W0) + np.abs(delta))
    assert np.all(np.abs(layer.weight.data.astype(np.float64) - W0) <= bound)


# ---------------------------------------------------------------- DoRA on Conv1D


def _conv1d_dora(n_in=5, n_out=4, dropout=0.0, seed=0):
    base = nn.Conv1D(n_in, n_out, dtype=np.float64, random_state=seed)
    rng = np.random.default_rng(seed + 7)
    base.weight.data = rng.standard_normal((n_in, n_out))  # (in, out)
    base.bias.data = rng.standard_normal(n_out)
    layer = nn.LoRALinear(base, r=2, alpha=3.0, dropout=dropout, random_state=seed, use_dora=True)
    return base, layer, rng


def test_conv1d_dora_forward_merge_and_unmerge_use_the_out_in_view():
    base, layer, rng = _conv1d_dora()
    W = base.weight.data.T.copy()  # (out, in)
    np.testing.assert_array_equal(layer.magnitude.data, np.sqrt((W * W).sum(axis=1)))  # ‖W‖ per output row
    layer.B.data = rng.standard_normal(layer.B.shape)
    layer.magnitude.data = rng.uniform(0.5, 2.0, 4)
    x = rng.standard_normal((3, 5))
    V = W + 1.5 * layer.B.data @ layer.A.data  # (out, in), scaling = 3 / 2
    c = layer.magnitude.data / np.sqrt((V * V).sum(axis=1))
    expected = x @ (c[:, None] * V).T + base.bias.data  # DoRA written out
    np.testing.assert_allclose(layer.eval()(x), expected, rtol=1e-12, atol=1e-12)
    W0 = base.weight.data.copy()
    layer.merge()
    np.testing.assert_allclose(base.weight.data, (c[:, None] * V).T, rtol=1e-13, atol=1e-14)  # back in (in, out)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    np.testing.assert_allclose(base.weight.data, W0, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_conv1d_dora_exact_gradients_with_a_trainable_base(dropout):
    _, layer, rng = _conv1d_dora(dropout=dropout)
    layer.B.data = rng.standard_normal(layer.B.shape)
    layer.magnitude.data = rng.uniform(0.5, 2.0, 4)
    layer.detach_norm = False  # the exact gradient, which finite differences measure
    layer.weight.trainable = layer.bias.trainable = True
    report = check_module_gradients(layer.train(), rng.standard_normal((2, 3, 5)))
    assert set(report.arguments) == {"x", "weight", "bias", "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    assert layer.weight.grad.shape == (5, 4)


def test_conv1d_dora_pissa_keeps_the_output_and_inject_finds_a_zero_output_row():
    base = nn.Conv1D(6, 5, dtype=np.float64, random_state=0)
    x = np.random.default_rng(1).standard_normal((3, 6))
    y0 = base(x)
    layer = nn.LoRALinear(base, r=2, alpha=4, init="pissa", use_dora=True)
    np.testing.assert_allclose(layer(x), y0, rtol=1e-12, atol=1e-12)
    V = base.weight.data.T + 2.0 * layer.B.data @ layer.A.data  # residual + update, (out, in)
    np.testing.assert_allclose(layer.magnitude.data, np.sqrt((V * V).sum(axis=1)), rtol=1e-15)
    model = nn.Sequential(nn.Conv1D(3, 4, dtype=np.float64, random_state=0))
    model[0].weight.data[1, :] = 0  # an input row of the (in, out) weight: every output row stays nonzero
    nn.inject_lora(model, r=1, alpha=1, targets=["0"], use_dora=True)
    model = nn.Sequential(nn.Conv1D(3, 4, dtype=np.float64, random_state=0))
    model[0].weight.data[:, 2] = 0  # output 2's row of the (out, in) view
    with pytest.raises(ValueError, match=r"layer '0': .*rows \[2\]"):
        nn.inject_lora(model, r=1, alpha=1, targets=["0"], use_dora=True)
