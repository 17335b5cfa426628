"""Parameter, Module, Linear, LoRALinear, activations and Sequential.

Each property is checked against an independent computation: NumPy formulas
written out here, ``numpy.linalg.svd`` for PiSSA, finite differences through
``lowrank.reference.gradcheck``, or two separately computed gradients for accumulation.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import FLOAT_DTYPES, SEEDS, batch_shapes, elementwise_inputs, lora_layer_configs, rtol_for

from lowrank import nn
from lowrank.nn import functional as F
from lowrank.reference.gradcheck import check_module_gradients

# ---------------------------------------------------------------- helpers


def make_lora(cfg, init="kaiming", dropout=0.0, random_B=True):
    """A LoRA layer from a config drawn by ``lora_layer_configs``, an input, and the rng.

    ``random_B`` fills B with noise so that the adapter actually changes the
    output (a fresh kaiming/gaussian adapter has B = 0).
    """
    rng = np.random.default_rng(cfg["seed"])
    dtype = cfg["dtype"]
    base = nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg["bias"], dtype=dtype, random_state=rng)
    lora = nn.LoRALinear(
        base, r=cfg["r"], alpha=cfg["alpha"], dropout=dropout, use_rslora=cfg["use_rslora"],
        init=init, random_state=rng,
    )  # fmt: skip
    if random_B:
        lora.B.data = rng.standard_normal(lora.B.shape).astype(dtype)
    x = rng.standard_normal((*cfg["batch_shape"], cfg["in_features"])).astype(dtype)
    return lora, x, rng


def linear_by_hand(x, W, b):
    """y = x @ W.T + b in float64, independent of the kernels."""
    y = x.astype(np.float64) @ W.astype(np.float64).T
    return y if b is None else y + b.astype(np.float64)


def base_output_by_hand(x, W, b):
    """x @ W.T + b in the layer's dtype, batch dims flattened to one matrix product as a plain
    linear layer evaluates it: what a fresh adapter or a merged layer must give bit for bit."""
    y = x.reshape(-1, W.shape[1]) @ W.T  # (N, out)
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[0])


def grads_of(module):
    return {name: None if p.grad is None else p.grad.copy() for name, p in module.named_parameters()}


def mlp(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Linear(3, 5, dtype=dtype, random_state=rng), nn.Tanh(), nn.Linear(5, 2, dtype=dtype, random_state=rng)
    )


# ---------------------------------------------------------------- Parameter


def test_parameter_copies_and_follows_the_dtype_rule():
    src = np.arange(6, dtype=np.int64).reshape(2, 3)
    p = nn.Parameter(src)
    assert p.dtype == np.float64 and p.shape == (2, 3) and p.ndim == 2 and p.size == 6
    assert p.grad is None and p.trainable
    src[0, 0] = 99
    assert p.data[0, 0] == 0  # a copy, not a view of the caller's array
    assert nn.Parameter(np.ones(2, np.float32), trainable=False).dtype == np.float32
    assert "shape=(2, 3)" in repr(p)


@pytest.mark.parametrize("bad", [np.ones(2, np.complex128), "abc"])
def test_parameter_refuses_non_real_data(bad):
    with pytest.raises(TypeError, match="data"):
        nn.Parameter(bad)


def test_parameter_refuses_non_bool_trainable():
    with pytest.raises(TypeError, match="trainable must be True or False, got int 1"):
        nn.Parameter(np.ones(2), trainable=1)


# ---------------------------------------------------------------- Module bookkeeping


def test_sequential_names_follow_torch():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    names = [name for name, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(model.state_dict()) == names
    assert [name for name, _ in model.named_modules()] == ["", "0", "1", "2"]
    assert len(model.parameters()) == 4


def test_lora_state_dict_keys_are_exactly_peft_style():
    lora = nn.LoRALinear(nn.Linear(4, 3), r=2)
    assert list(lora.state_dict()) == ["weight", "bias", "lora_A.weight", "lora_B.weight"]
    model = nn.Sequential(nn.LoRALinear(nn.Linear(4, 3, bias=False), r=2), nn.ReLU())
    assert list(model.state_dict()) == ["0.weight", "0.lora_A.weight", "0.lora_B.weight"]


def test_registration_order_reassignment_and_unregistering():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(np.zeros(1))
            self.a = nn.Parameter(np.zeros(2))
            self.child = nn.Linear(2, 2)

    m = Two()
    assert [n for n, _ in m.named_parameters()] == ["b", "a", "child.weight", "child.bias"]
    m.b = nn.Parameter(np.ones(3))  # re-assigned: keeps its place
    assert [n for n, _ in m.named_parameters()][:2] == ["b", "a"]
    m.a = None  # unregistered
    assert [n for n, _ in m.named_parameters()] == ["b", "child.weight", "child.bias"]
    del m.child
    assert [n for n, _ in m.named_parameters()] == ["b"]


def test_assigning_a_non_parameter_to_a_parameter_name_is_a_type_error():
    lin = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="cannot assign ndarray to 'weight', a registered Parameter"):
        lin.weight = np.zeros((2, 2))
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(TypeError, match="registered Module"):
        setattr(model, "0", "relu")


def test_assigning_before_init_is_an_attribute_error():
    class Forgetful(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.ones(1))

    with pytest.raises(AttributeError, match=r"super\(\).__init__\(\)"):
        Forgetful()


def test_shared_parameter_is_listed_once():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight  # tied
    model = nn.Sequential(a, b)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.bias"]


def test_train_and_eval_reach_every_submodule():
    model = nn.Sequential(nn.LoRALinear(nn.Linear(3, 3), r=1, dropout=0.5), nn.ReLU())
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    with pytest.raises(TypeError, match="mode must be True or False"):
        model.train("no")


def test_zero_grad_sets_none():
    model = mlp()
    y = model(np.ones((2, 3)))
    model.backward(np.ones_like(y))
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_base_module_has_no_forward_or_backward():
    with pytest.raises(NotImplementedError, match="Module defines no forward"):
        nn.Module()(np.ones(1))
    with pytest.raises(NotImplementedError, match="Module defines no backward"):
        nn.Module().backward(np.ones(1))


def test_deepcopy_gives_an_independent_model_with_the_same_sharing():
    model = nn.Sequential(nn.LoRALinear(nn.Linear(4, 3, random_state=0), r=2, random_state=0), nn.ReLU())
    twin = copy.deepcopy(model)
    assert twin[0].weight is twin[0].base.weight and twin[0].weight is not model[0].weight
    twin[0].A.data[:] = 0
    assert np.any(model[0].A.data != 0)
    assert list(twin.state_dict()) == list(model.state_dict())


# ---------------------------------------------------------------- state_dict


@given(seed=SEEDS, dtype=FLOAT_DTYPES)
def test_state_dict_round_trip(seed, dtype):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(
        nn.LoRALinear(nn.Linear(4, 6, dtype=dtype, random_state=rng), r=2, random_state=rng),
        nn.GELU(),
        nn.Linear(6, 3, bias=False, dtype=dtype, random_state=rng),
    )
    sd = model.state_dict()
    assert all(v.dtype == dtype for v in sd.values())
    saved = {k: v.copy() for k, v in sd.items()}
    sd["0.weight"][...] = 7  # the state dict holds copies
    assert not np.any(model.state_dict()["0.weight"] == 7)
    for p in model.parameters():  # scramble, then restore
        p.data = rng.standard_normal(p.shape).astype(dtype)
    result = model.load_state_dict(saved)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, saved[k])
        assert v.dtype == dtype
    saved["2.weight"][...] = 0  # loading copied: the model does not alias the dict
    assert np.any(model.state_dict()["2.weight"] != 0)


def _bad_state_dicts():
    good = mlp().state_dict()
    missing = {k: v for k, v in good.items() if k != "0.bias"}
    unexpected = {**good, "0.bias_typo": good["0.bias"]}
    shape = {**good, "2.weight": good["2.weight"].T.copy()}
    dtype = {**good, "0.weight": good["0.weight"].astype(np.float32)}
    nonfinite = {**good, "2.bias": np.array([1.0, np.nan])}
    return [
        (missing, ValueError, r"missing keys \['0.bias'\]"),
        (unexpected, ValueError, r"unexpected keys \['0.bias_typo'\]"),
        (shape, ValueError, r"2.weight: expected \(2, 5\), got \(5, 2\)"),
        (dtype, TypeError, "0.weight: expected float64, got float32"),
        (nonfinite, ValueError, r"non-finite values in \['2.bias'\]"),
        ([("0.weight", 1)], TypeError, "state_dict must be a mapping"),
    ]


@pytest.mark.parametrize(("sd", "error", "match"), _bad_state_dicts())
def test_load_state_dict_errors_modify_nothing(sd, error, match):
    model = mlp(seed=1)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        model.load_state_dict(sd)
    for k, v in model.state_dict().items():
        assert v.tobytes() == before[k].tobytes()


def test_load_state_dict_non_strict_reports_and_loads_the_rest():
    model, source = mlp(seed=1), mlp(seed=2)
    sd = source.state_dict()
    del sd["2.bias"]
    sd["extra"] = np.zeros(1)
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["2.bias"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(model[0].weight.data, source[0].weight.data)
    assert not np.array_equal(model[2].bias.data, source[2].bias.data)
    with pytest.raises(TypeError, match="strict must be True or False"):
        model.load_state_dict(sd, strict=0)


# ---------------------------------------------------------------- Linear


@given(seed=SEEDS, dtype=FLOAT_DTYPES, n_in=st.integers(1, 9), n_out=st.integers(1, 9))
def test_linear_init_is_torch_default_and_seeded(seed, dtype, n_in, n_out):
    lin = nn.Linear(n_in, n_out, dtype=dtype, random_state=seed)
    bound = 1 / math.sqrt(n_in)
    assert lin.weight.shape == (n_out, n_in) and lin.bias.shape == (n_out,)
    assert lin.weight.dtype == dtype and lin.bias.dtype == dtype
    assert np.all(np.abs(lin.weight.data) <= bound) and np.all(np.abs(lin.bias.data) <= bound)
    again = nn.Linear(n_in, n_out, dtype=dtype, random_state=seed)
    assert again.weight.data.tobytes() == lin.weight.data.tobytes()
    as64 = nn.Linear(n_in, n_out, dtype=np.float64, random_state=seed)
    np.testing.assert_array_equal(as64.weight.data.astype(dtype), lin.weight.data)


def test_linear_init_has_the_uniform_variance():
    lin = nn.Linear(256, 128, dtype=np.float64, random_state=0)
    w = lin.weight.data
    # U(-b, b) has variance b^2 / 3; 32768 draws pin it to about 1 %
    assert abs(w.var() / (1 / 256 / 3) - 1) < 0.05
    assert abs(w.mean()) < 0.01 / 16


def test_linear_repr_matches_torch():
    assert repr(nn.Linear(4, 8)) == "Linear(in_features=4, out_features=8, bias=True)"
    assert repr(nn.Linear(4, 8, bias=False)) == "Linear(in_features=4, out_features=8, bias=False)"
    assert repr(nn.GELU(approximate="tanh")) == "GELU(approximate='tanh')"
    assert repr(nn.Sequential(nn.ReLU())) == "Sequential(\n  (0): ReLU()\n)"


@given(seed=SEEDS, dtype=FLOAT_DTYPES, batch=batch_shapes(), bias=st.booleans())
def test_linear_forward_backward_against_numpy(seed, dtype, batch, bias):
    rng = np.random.default_rng(seed)
    lin = nn.Linear(4, 3, bias=bias, dtype=dtype, random_state=rng)
    x = rng.standard_normal((*batch, 4)).astype(dtype)
    dy = rng.standard_normal((*batch, 3)).astype(dtype)
    b = lin.bias.data if bias else None
    y = lin(x)
    dx = lin.backward(dy)
    assert y.dtype == dtype and dx.dtype == dtype and lin.weight.grad.dtype == dtype
    tol = rtol_for(dtype)
    np.testing.assert_allclose(y, linear_by_hand(x, lin.weight.data, b), rtol=tol, atol=tol)
    x2, dy2 = x.reshape(-1, 4).astype(np.float64), dy.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(dx.reshape(-1, 4), dy2 @ lin.weight.data, rtol=tol, atol=tol)
    np.testing.assert_allclose(lin.weight.grad, dy2.T @ x2, rtol=tol, atol=tol)
    if bias:
        np.testing.assert_allclose(lin.bias.grad, dy2.sum(axis=0), rtol=tol, atol=tol)


def test_integer_input_is_converted_to_the_layer_dtype():
    lin = nn.Linear(2, 2, dtype=np.float32, random_state=0)
    y = lin(np.array([[1, 2]]))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, lin(np.array([[1.0, 2.0]], np.float32)))
    assert lin([[1.0, 2.0]]).dtype == np.float32  # a Python list is converted too


# ---------------------------------------------------------------- accumulation and pairing


@given(cfg=lora_layer_configs(dtype=np.float64))
def test_module_used_twice_accumulates_both_gradients(cfg):
    lora, x1, rng = make_lora(cfg)
    lora.weight.trainable = True  # every parameter gets a gradient here
    if lora.bias is not None:
        lora.bias.trainable = True
    model = nn.Sequential(lora, nn.Tanh(), nn.Linear(cfg["out_features"], 2, dtype=np.float64, random_state=rng))
    x2 = rng.standard_normal(x1.shape)
    dy1, dy2 = rng.standard_normal((*x1.shape[:-1], 2)), rng.standard_normal((*x1.shape[:-1], 2))

    separate = []
    for x, dy in ((x1, dy1), (x2, dy2)):
        model.zero_grad()
        model(x)
        model.backward(dy)
        separate.append(grads_of(model))

    model.zero_grad()
    model(x1)
    model.backward(dy1)
    model(x2)
    model.backward(dy2)
    for name, grad in grads_of(model).items():
        np.testing.assert_allclose(grad, separate[0][name] + separate[1][name], rtol=1e-12, atol=1e-12)


def test_linear_used_twice_matches_the_hand_formula():
    lin = nn.Linear(3, 2, dtype=np.float64, random_state=0)
    rng = np.random.default_rng(1)
    x1, x2, dy1, dy2 = (rng.standard_normal(s) for s in [(4, 3), (5, 3), (4, 2), (5, 2)])
    lin(x1)
    lin.backward(dy1)
    lin(x2)
    lin.backward(dy2)
    np.testing.assert_allclose(lin.weight.grad, dy1.T @ x1 + dy2.T @ x2, rtol=1e-12)
    np.testing.assert_allclose(lin.bias.grad, dy1.sum(0) + dy2.sum(0), rtol=1e-12)


def test_backward_without_forward_and_twice_are_runtime_errors():
    for module in (nn.Linear(2, 2), nn.LoRALinear(nn.Linear(2, 2), r=1), nn.ReLU(), mlp()):
        with pytest.raises(RuntimeError, match="backward called without a forward"):
            module.backward(np.ones((1, 2)))
    lin = nn.Linear(2, 2)
    y = lin(np.ones((1, 2), np.float32))
    lin.backward(np.ones_like(y))
    with pytest.raises(RuntimeError, match="consumes the cache of the most recent forward"):
        lin.backward(np.ones_like(y))


def test_one_instance_twice_in_a_forward_pass_is_refused_at_backward():
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(2, 2, dtype=np.float64), act, nn.Linear(2, 2, dtype=np.float64), act)
    y = model(np.ones((3, 2)))
    with pytest.raises(RuntimeError, match="one instance per use"):
        model.backward(np.ones_like(y))


def test_bad_dy_keeps_the_cache_for_a_retry():
    lin = nn.Linear(3, 2, dtype=np.float64)
    lin(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"dy must have the forward output's shape \(4, 2\), got \(4, 3\)"):
        lin.backward(np.ones((4, 3)))
    with pytest.raises(TypeError, match="dy must have the layer's dtype float64, got float32"):
        lin.backward(np.ones((4, 2), np.float32))
    assert lin.backward(np.ones((4, 2))).shape == (4, 3)


# ---------------------------------------------------------------- frozen parameters


def test_frozen_base_gets_no_gradient_and_the_kernel_is_told(monkeypatch):
    calls = []
    real = F.lora_linear_backward_core

    def spy(dy, cache, base_trainable=False):
        grads = real(dy, cache, base_trainable=base_trainable)
        calls.append((base_trainable, grads.weight, grads.bias))
        return grads

    monkeypatch.setattr(F, "lora_linear_backward_core", spy)
    lora = nn.LoRALinear(nn.Linear(5, 4, dtype=np.float64, random_state=0), r=2, random_state=0)
    y = lora(np.ones((3, 5)))
    lora.backward(np.ones_like(y))
    assert calls == [(False, None, None)]
    assert lora.weight.grad is None and lora.bias.grad is None
    assert lora.base.weight.grad is None
    assert lora.A.grad is not None and lora.B.grad is not None


def test_frozen_linear_computes_only_dx(monkeypatch):
    flags = []
    real = F.linear_backward_core

    def spy(dy, cache, *, trainable=True):
        flags.append(trainable)
        return real(dy, cache, trainable=trainable)

    monkeypatch.setattr(F, "linear_backward_core", spy)
    model = mlp()
    for p in model[0].parameters():
        p.trainable = False
    y = model(np.ones((2, 3)))
    dx = model.backward(np.ones_like(y))
    assert flags == [True, False]  # backward runs the last layer first
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert model[2].weight.grad is not None and dx.shape == (2, 3)


def test_weight_and_bias_must_agree_on_trainability():
    lin = nn.Linear(2, 2)
    lin.bias.trainable = False
    y = lin(np.ones((1, 2), np.float32))
    with pytest.raises(RuntimeError, match=r"weight\.trainable=True, bias\.trainable=False"):
        lin.backward(np.ones_like(y))
    lin.bias.trainable = True  # fixed: the forward's cache is still there
    assert lin.backward(np.ones_like(y)).shape == (1, 2)


# ---------------------------------------------------------------- LoRALinear


@given(cfg=lora_layer_configs(), init=st.sampled_from(["kaiming", "gaussian"]))
def test_fresh_adapter_gives_the_base_output_bit_for_bit(cfg, init):
    lora, x, _ = make_lora(cfg, init=init, random_B=False)
    assert not np.any(lora.B.data)
    b = None if lora.bias is None else lora.bias.data
    assert lora(x).tobytes() == base_output_by_hand(x, lora.weight.data, b).tobytes()
    # a large batch takes the kernel's other evaluation order; still bit for bit
    big = np.tile(x.reshape(-1, cfg["in_features"]), (cfg["in_features"] + 1, 1))
    assert lora(big).tobytes() == base_output_by_hand(big, lora.weight.data, b).tobytes()


@given(cfg=lora_layer_configs())
def test_lora_forward_against_numpy(cfg):
    lora, x, _ = make_lora(cfg)
    W, A, B = (a.astype(np.float64) for a in (lora.weight.data, lora.A.data, lora.B.data))
    b = None if lora.bias is None else lora.bias.data
    expected = linear_by_hand(x, W, b) + lora.scaling * (x.astype(np.float64) @ A.T) @ B.T
    y = lora(x)
    assert y.dtype == cfg["dtype"]
    scale = 1 + np.abs(expected).max()
    np.testing.assert_allclose(y, expected, rtol=0, atol=rtol_for(cfg["dtype"]) * scale * 10)


@given(cfg=lora_layer_configs())
def test_trainable_parameter_count_is_r_in_plus_out(cfg):
    lora, _, _ = make_lora(cfg)
    trainable = sum(p.size for p in lora.parameters() if p.trainable)
    assert trainable == cfg["r"] * (cfg["in_features"] + cfg["out_features"])
    assert lora.A.shape == (cfg["r"], cfg["in_features"]) and lora.B.shape == (cfg["out_features"], cfg["r"])


@given(r=st.integers(1, 64), alpha=st.floats(0.01, 100))
def test_scaling_is_alpha_over_r_or_over_sqrt_r(r, alpha):
    base = nn.Linear(2, 2)
    assert nn.LoRALinear(base, r=r, alpha=alpha).scaling == alpha / r
    assert nn.LoRALinear(nn.Linear(2, 2), r=r, alpha=alpha, use_rslora=True).scaling == alpha / math.sqrt(r)


def test_lora_freezes_and_shares_the_base_parameters():
    base = nn.Linear(4, 3, random_state=0)
    lora = nn.LoRALinear(base, r=2, random_state=0)
    assert lora.weight is base.weight and lora.bias is base.bias and lora.base is base
    assert not base.weight.trainable and not base.bias.trainable
    assert lora.A.trainable and lora.B.trainable
    assert lora.A is lora.lora_A.weight and lora.B is lora.lora_B.weight


def test_kaiming_and_gaussian_inits():
    lora = nn.LoRALinear(nn.Linear(4096, 3, dtype=np.float64, random_state=0), r=4, random_state=0)
    bound = 1 / math.sqrt(4096)
    assert np.all(np.abs(lora.A.data) <= bound) and not np.any(lora.B.data)
    assert abs(lora.A.data.var() / (bound**2 / 3) - 1) < 0.05
    g = nn.LoRALinear(nn.Linear(4096, 3, dtype=np.float64), r=4, init="gaussian", random_state=0)
    assert abs(g.A.data.std() / (1 / 4) - 1) < 0.03 and not np.any(g.B.data)  # N(0, (1/r)^2)
    same = nn.LoRALinear(nn.Linear(4096, 3, dtype=np.float64), r=4, init="gaussian", random_state=0)
    assert same.A.data.tobytes() == g.A.data.tobytes()


@given(cfg=lora_layer_configs())
def test_merged_equals_unmerged_in_eval_mode(cfg):
    lora, x, _ = make_lora(cfg, dropout=0.25)
    lora.eval()
    y = lora(x)
    lora.merge()
    assert lora.merged
    y_merged = lora(x)
    assert y_merged.dtype == cfg["dtype"]
    W, dW = lora.weight.data.astype(np.float64), lora.delta_weight()
    scale = 1 + (np.abs(x).reshape(-1, cfg["in_features"]) @ (np.abs(W) + np.abs(dW)).T).max()
    np.testing.assert_allclose(y_merged, y, rtol=0, atol=rtol_for(cfg["dtype"]) * scale)
    # the merged forward is exactly the plain linear with the merged weight
    b = None if lora.bias is None else lora.bias.data
    assert y_merged.tobytes() == base_output_by_hand(x, lora.weight.data, b).tobytes()


@given(cfg=lora_layer_configs(), log_scale=st.floats(-3, 3))
def test_unmerge_restores_w_within_the_stated_tolerance(cfg, log_scale):
    lora, _, _ = make_lora(cfg)
    lora.B.data = (lora.B.data * 10.0**log_scale).astype(cfg["dtype"])
    W = lora.weight.data.copy()
    delta = lora.delta_weight()
    lora.merge()
    lora.unmerge()
    assert not lora.merged and lora.weight.dtype == cfg["dtype"]
    eps = np.finfo(cfg["dtype"]).eps
    err = np.abs(lora.weight.data.astype(np.float64) - W)
    assert np.all(err <= eps * (np.abs(W) + np.abs(delta)))


@given(cfg=lora_layer_configs())
def test_merge_unmerge_of_a_fresh_adapter_is_bit_identical(cfg):
    lora, _, _ = make_lora(cfg, random_B=False)
    W = lora.weight.data.copy()
    lora.merge()
    assert lora.weight.data.tobytes() == W.tobytes()
    lora.unmerge()
    assert lora.weight.data.tobytes() == W.tobytes()


@pytest.mark.parametrize("poison", ["overflow", "nan"])
def test_merge_refuses_a_non_finite_result_and_changes_nothing(poison):
    lora = nn.LoRALinear(nn.Linear(3, 2, dtype=np.float32, random_state=0), r=1, alpha=1, random_state=0)
    if poison == "overflow":  # each finite in float32, their sum is not
        lora.weight.data[:] = 3e38
        lora.A.data[:] = 1.0
        lora.B.data[:] = 3e38
    else:
        lora.A.data[0, 1] = np.nan
        lora.B.data[:] = 1.0
    before = {k: v.tobytes() for k, v in lora.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"merge refused.*non-finite.*the weights are unchanged"):
        lora.merge()
    assert not lora.merged
    assert {k: v.tobytes() for k, v in lora.state_dict().items()} == before


def test_merge_state_errors():
    lora = nn.LoRALinear(nn.Linear(3, 2), r=1)
    with pytest.raises(RuntimeError, match="not merged"):
        lora.unmerge()
    lora.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        lora.merge()
    y = lora(np.ones((2, 3), np.float32))  # the merged forward runs, in either mode
    with pytest.raises(RuntimeError, match="backward while merged: call unmerge"):
        lora.backward(np.ones_like(y))
    lora.eval()
    with pytest.raises(RuntimeError, match="backward while merged"):
        lora.backward(np.ones_like(y))


def _dropout_probe(p, seed):
    """A LoRA layer whose output is its dropout mask: W = 0, b = 0, A = B = I, scaling = 1."""
    n = 16
    base = nn.Linear(n, n, bias=False, dtype=np.float64)
    base.weight.data[:] = 0
    lora = nn.LoRALinear(base, r=n, alpha=n, dropout=p, random_state=seed)
    lora.A.data = np.eye(n)
    lora.B.data = np.eye(n)
    return lora


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_in_train_mode_and_identity_in_eval(p):
    lora = _dropout_probe(p, seed=3)
    x = np.ones((4096, 16))
    mask = lora(x)  # y = x @ 0 + (x * mask) @ I @ I
    assert set(np.unique(mask)) <= {0.0, 1 / (1 - p)}
    assert abs(mask.mean() - 1) < 0.02  # 65536 draws: about 8 standard errors
    assert abs((mask == 0).mean() - p) < 0.01
    dx = lora.backward(np.ones_like(mask))  # the same mask on the way back
    np.testing.assert_array_equal(dx, mask)
    assert not np.array_equal(lora(x), mask)  # a fresh mask each forward
    lora.eval()
    np.testing.assert_array_equal(lora(x), x)


def test_dropout_masks_follow_the_seed():
    a, b = _dropout_probe(0.5, seed=7), _dropout_probe(0.5, seed=7)
    x = np.ones((8, 16))
    for _ in range(2):
        assert a(x).tobytes() == b(x).tobytes()


@given(cfg=lora_layer_configs())
def test_pissa_is_the_best_rank_r_approximation_plus_residual(cfg):
    dtype, r = cfg["dtype"], cfg["r"]
    rng = np.random.default_rng(cfg["seed"])
    base = nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg["bias"], dtype=dtype, random_state=rng)
    W = base.weight.data.astype(np.float64)
    U, s, Vt = np.linalg.svd(W)
    if r < len(s):
        assume(s[r - 1] - s[r] > 1e-3 * s[0])  # a unique best approximation
    x = rng.standard_normal((*cfg["batch_shape"], cfg["in_features"])).astype(dtype)
    y_before = base(x)

    lora = nn.LoRALinear(base, r=r, alpha=cfg["alpha"], use_rslora=cfg["use_rslora"], init="pissa")
    tol = rtol_for(dtype) * s[0]
    best = (U[:, :r] * s[:r]) @ Vt[:r]  # Eckart–Young
    np.testing.assert_allclose(lora.delta_weight(), best, rtol=0, atol=tol)
    residual = lora.weight.data.astype(np.float64)
    eps = np.finfo(dtype).eps
    assert np.all(np.abs(residual + lora.delta_weight() - W) <= eps * np.abs(residual) + 1e-12 * s[0])
    assert lora.weight.dtype == lora.A.dtype == lora.B.dtype == dtype
    assert base.weight.data is lora.weight.data  # the base shows the residual too
    np.testing.assert_allclose(lora(x), y_before, rtol=0, atol=10 * tol * (1 + np.abs(x).max()))


# ---------------------------------------------------------------- finite differences


@given(cfg=lora_layer_configs(dtype=np.float64), train_base=st.booleans(), p=st.sampled_from([0.0, 0.5]))
def test_lora_layer_gradients_against_finite_differences(cfg, train_base, p):
    lora, x, rng = make_lora(cfg, dropout=p)
    for param in (lora.weight, lora.bias):
        if param is not None:
            param.trainable = train_base
    # rng is also the layer's own Generator: the checker rewinds it, so every forward draws the same mask
    report = check_module_gradients(lora, x, random_state=rng)
    want = {"x", "lora_A.weight", "lora_B.weight"}
    if train_base:
        want |= {"weight"} | ({"bias"} if cfg["bias"] else set())
    assert set(report.arguments) == want


@given(seed=SEEDS, batch=batch_shapes())
def test_sequential_gradients_against_finite_differences(seed, batch):
    rng = np.random.default_rng(seed)
    lora = nn.LoRALinear(nn.Linear(6, 4, dtype=np.float64, random_state=rng), r=2, alpha=4, random_state=rng)
    lora.B.data = rng.standard_normal(lora.B.shape)
    model = nn.Sequential(
        nn.Linear(5, 6, dtype=np.float64, random_state=rng), nn.Tanh(), lora, nn.GELU(),
        nn.Linear(4, 4, dtype=np.float64, random_state=rng), nn.Sigmoid(),
        nn.Linear(4, 3, bias=False, dtype=np.float64, random_state=rng),
    )  # fmt: skip
    model[4].weight.trainable = model[4].bias.trainable = False  # a frozen layer still passes dx through
    x = rng.standard_normal((*batch, 5))
    report = check_module_gradients(model, x, random_state=rng)
    assert set(report.arguments) == {"x", "0.weight", "0.bias", "2.lora_A.weight", "2.lora_B.weight", "6.weight"}
    assert model[4].weight.grad is None


# ---------------------------------------------------------------- dtypes and activations


@given(dtype=FLOAT_DTYPES, batch=batch_shapes(), seed=SEEDS)
def test_dtype_is_kept_through_a_whole_model(dtype, batch, seed):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(
        nn.LoRALinear(nn.Linear(3, 4, dtype=dtype, random_state=rng), r=2, dropout=0.2, random_state=rng),
        nn.ReLU(), nn.Linear(4, 4, dtype=dtype, random_state=rng), nn.Sigmoid(),
        nn.Linear(4, 4, dtype=dtype, random_state=rng), nn.GELU(), nn.Tanh(),
    )  # fmt: skip
    x = rng.standard_normal((*batch, 3)).astype(dtype)
    y = model(x)
    dx = model.backward(np.ones_like(y))
    assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    assert all(p.grad.dtype == dtype for p in model.parameters() if p.trainable)


_SQRT2 = math.sqrt(2.0)
_C = math.sqrt(2.0 / math.pi)
# each activation written out by hand in float64: (y(x), dy/dx(x)), independent of lowrank's kernels
BY_HAND = {
    "relu": (lambda x: np.where(x > 0, x, 0.0), lambda x: (x > 0).astype(float)),
    "tanh": (np.tanh, lambda x: 1.0 / np.cosh(x) ** 2),
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), lambda x: np.exp(-x) / (1 + np.exp(-x)) ** 2),
    "gelu": (
        lambda x: x * 0.5 * (1 + np.vectorize(math.erf)(x / _SQRT2)),
        lambda x: 0.5 * (1 + np.vectorize(math.erf)(x / _SQRT2)) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi),
    ),
    "gelu_tanh": (
        lambda x: 0.5 * x * (1 + np.tanh(_C * (x + 0.044715 * x**3))),
        lambda x: (
            0.5 * (1 + np.tanh(_C * (x + 0.044715 * x**3)))
            + 0.5 * x * (1 - np.tanh(_C * (x + 0.044715 * x**3)) ** 2) * _C * (1 + 3 * 0.044715 * x**2)
        ),
    ),
}
MODULES = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BY_HAND))
# entries at least 1e-3 from 0: ReLU's derivative at its kink is a convention, not a formula;
# x in every layout, strided and reversed views too
@given(x=elementwise_inputs(np.float64, scale=6.0, away_from_zero=1e-3, views=True))
def test_activation_modules_match_the_formula_by_hand(name, x):
    forward, derivative = BY_HAND[name]
    module = MODULES[name]()
    dy = np.cos(3 * x)  # any upstream gradient, of x's shape
    y = module(x)
    dx = module.backward(dy)
    np.testing.assert_allclose(y, forward(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, dy * derivative(x), rtol=1e-10, atol=1e-13)
    x32 = x.astype(np.float32)
    y32 = module(x32)
    assert y32.dtype == np.float32 and module.backward(dy.astype(np.float32)).dtype == np.float32
    np.testing.assert_allclose(y32, forward(x32.astype(np.float64)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- Sequential


def test_sequential_indexing_and_len():
    a, b, c = nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)
    model = nn.Sequential(a, b, c)
    assert len(model) == 3 and model[0] is a and model[-1] is c and list(model) == [a, b, c]
    tail = model[1:]
    assert isinstance(tail, nn.Sequential) and list(tail) == [b, c]
    model[0] = nn.LoRALinear(a, r=1)
    assert model[0].base is a and "0.lora_A.weight" in model.state_dict()
    with pytest.raises(IndexError, match="index 3 is out of range for a Sequential of length 3"):
        model[3]
    with pytest.raises(IndexError, match="index -4 is out of range"):
        model[-4] = nn.ReLU()
    with pytest.raises(TypeError, match="index must be an integer"):
        model["0"]
    with pytest.raises(TypeError, match="a Sequential holds Modules, got str"):
        model[0] = "relu"
    with pytest.raises(TypeError, match="Sequential takes Modules, got int at position 1"):
        nn.Sequential(nn.ReLU(), 3)


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 0}, ValueError, r"r must be in \[1, inf\], got 0"),
        ({"r": -2}, ValueError, "got -2"),
        ({"r": 1.5}, TypeError, "r must be an integer, got float 1.5"),
        ({"r": True}, TypeError, "r must be an integer, got bool"),
        ({"alpha": 0}, ValueError, r"alpha must be in \(0, inf\), got 0.0"),
        ({"alpha": -1.0}, ValueError, "alpha must be in"),
        ({"alpha": float("nan")}, ValueError, "alpha must be in"),
        ({"alpha": "8"}, TypeError, "alpha must be a real number"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\), got -0.1"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        ({"init": "xavier"}, ValueError, "init must be one of 'kaiming', 'gaussian', 'pissa', got 'xavier'"),
        ({"use_rslora": "yes"}, TypeError, "use_rslora must be True or False"),
        ({"r": 4, "init": "pissa"}, ValueError, r"r must be in \[1, min\(in_features, out_features\)\] = \[1, 3\] "
         r"for init='pissa' \(weight shape \(3, 5\)\), got 4"),
        ({"random_state": "seed"}, TypeError, "random_state must be None, an int"),
    ],
)  # fmt: skip
def test_lora_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        nn.LoRALinear(nn.Linear(5, 3), **kwargs)


@pytest.mark.parametrize("base", [nn.ReLU(), np.ones((2, 2)), None])
def test_lora_base_must_be_a_linear(base):
    with pytest.raises(TypeError, match="base must be a Linear or a Conv1D, got"):
        nn.LoRALinear(base)


def test_lora_cannot_wrap_a_lora():
    with pytest.raises(TypeError, match="base must be a Linear or a Conv1D, got LoRALinear"):
        nn.LoRALinear(nn.LoRALinear(nn.Linear(2, 2), r=1))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0, 2), {}, ValueError, r"in_features must be in \[1, inf\], got 0"),
        ((2, 0), {}, ValueError, "out_features must be in"),
        ((2.0, 2), {}, TypeError, "in_features must be an integer"),
        ((2, 2), {"bias": 1}, TypeError, "bias must be True or False"),
        ((2, 2), {"dtype": np.float16}, TypeError, "dtype must be float32 or float64"),
        ((2, 2), {"dtype": None}, TypeError, "dtype must be float32 or float64, got None"),
        ((2, 2), {"dtype": np.int64}, TypeError, "dtype must be float32 or float64"),
        ((2, 2), {"random_state": -1}, ValueError, "random_state must be a non-negative int"),
    ],
)
def test_linear_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        nn.Linear(*args, **kwargs)


def test_gelu_bad_approximate():
    with pytest.raises(ValueError, match="approximate must be one of 'none', 'tanh', got 'erf'"):
        nn.GELU(approximate="erf")


@pytest.mark.parametrize("layer", [nn.Linear(3, 2), nn.LoRALinear(nn.Linear(3, 2), r=1)])
def test_layer_input_errors(layer):
    with pytest.raises(ValueError, match=r"x must have shape \(..., in_features\) = \(..., 3\), got \(4, 2\)"):
        layer(np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"got \(\)"):
        layer(np.float32(1.0))
    with pytest.raises(TypeError, match="x must have the layer's dtype float32, got float64"):
        layer(np.ones((4, 3)))
    with pytest.raises(TypeError, match="x must hold real numbers"):
        layer(np.ones((4, 3), np.complex64))
