"""Whole models: the MLP builder, inject_lora, trainable_summary, merge_lora, and the
building blocks they share (check_lora_config, check_pissa_rank, replace_modules,
mark_only_lora_as_trainable, match_target_modules).

Checked against independent computations: forward passes and merged weights
written out here in float64 NumPy (``W + alpha / r * B @ A``), parameter counts
from the formula ``r * (in + out)``, finite differences through
``lowrank.reference.gradcheck`` for the whole model's gradient, and PEFT's own
``print_trainable_parameters`` when torch and peft are installed. Inputs and
factors are drawn by hypothesis (``hypothesis.extra.numpy``), as contiguous
arrays, strided views and reversed views.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import ACTIVATION_NAMES, FLOAT_DTYPES, SEEDS, adapted_mlp_configs, float_views, mlp_sizes

from lowrank import nn
from lowrank.nn import functional as F
from lowrank.reference.gradcheck import check_module_gradients

# ---------------------------------------------------------------- helpers

_erf = np.vectorize(math.erf)

ACTIVATION_BY_HAND = {
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3))),
}


def mlp_by_hand(x, weights, activation):
    """The MLP's forward in float64 from a list of (W, b, delta) triples: W + delta is the layer's weight."""
    h = x.astype(np.float64)
    for i, (W, b, delta) in enumerate(weights):
        if i > 0:
            h = ACTIVATION_BY_HAND[activation](h)
        h = h @ (W.astype(np.float64) + delta).T
        if b is not None:
            h = h + b.astype(np.float64)
    return h


def scaling_by_hand(alpha, r, use_rslora):
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def delta_by_hand(lora):
    """alpha / r * B @ A (alpha / sqrt(r) with rsLoRA), in float64, from the layer's settings and factors."""
    s = scaling_by_hand(lora.alpha, lora.r, lora.use_rslora)
    return s * (lora.B.data.astype(np.float64) @ lora.A.data.astype(np.float64))  # (out, in)


def layer_weights(model):
    """(W, b, the LoRA update by hand) for each Linear or LoRALinear of a Sequential, in order."""
    out = []
    for m in model:
        if isinstance(m, nn.LoRALinear):
            out.append((m.weight.data, None if m.bias is None else m.bias.data, delta_by_hand(m)))
        elif isinstance(m, nn.Linear):
            out.append((m.weight.data, None if m.bias is None else m.bias.data, 0.0))
    return out


def adapted(cfg, data, init="kaiming", dropout=0.0):
    """An MLP with LoRA on cfg's targets, every B drawn (nonzero in general) so the adapters matter."""
    rng = np.random.default_rng(cfg["seed"])
    model = nn.MLP(cfg["sizes"], cfg["activation"], dtype=cfg["dtype"], random_state=rng)
    nn.inject_lora(model, r=cfg["r"], alpha=cfg["alpha"], targets=cfg["targets"], dropout=dropout,
                   use_rslora=cfg["use_rslora"], init=init, random_state=rng)
    for m in model:
        if isinstance(m, nn.LoRALinear):
            m.B.data = data.draw(float_views(cfg["dtype"], m.B.shape, bound=2.0))
    x = data.draw(float_views(cfg["dtype"], (4, cfg["sizes"][0]), bound=2.0))
    return model, x


def snapshot(model):
    """Bits, flags and gradients of every parameter, and the module types."""
    return (
        {
            k: (p.data.copy(), p.trainable, None if p.grad is None else p.grad.copy())
            for k, p in model.named_parameters()
        },
        [type(m) for m in model.modules()],
    )


def assert_same_snapshot(a, b):
    params_a, types_a = a
    params_b, types_b = b
    assert types_a == types_b and params_a.keys() == params_b.keys()
    for k in params_a:
        (da, ta, ga), (db, tb, gb) = params_a[k], params_b[k]
        assert np.array_equal(da, db) and da.dtype == db.dtype and ta == tb, k
        assert (ga is None) == (gb is None) and (ga is None or np.array_equal(ga, gb)), k


def tol(dtype, depth=3):
    return 1e-12 if np.dtype(dtype) == np.float64 else 1e-5 * depth


# ---------------------------------------------------------------- MLP


@given(sizes=mlp_sizes(), activation=ACTIVATION_NAMES, dtype=FLOAT_DTYPES, seed=SEEDS, data=st.data())
def test_mlp_is_linear_activation_linear_and_computes_it(sizes, activation, dtype, seed, data):
    model = nn.MLP(sizes, activation, dtype=dtype, random_state=seed)
    assert len(model) == 2 * (len(sizes) - 1) - 1  # Linear, activation, ..., Linear
    expected_keys = [f"{2 * i}.{k}" for i in range(len(sizes) - 1) for k in ("weight", "bias")]
    assert [k for k, _ in model.named_parameters()] == expected_keys
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layer = model[2 * i]
        assert isinstance(layer, nn.Linear) and layer.weight.shape == (n_out, n_in) and layer.weight.dtype == dtype
    activations = [m for m in model if not isinstance(m, nn.Linear)]
    assert len({id(m) for m in activations}) == len(activations)  # one instance per use
    x = data.draw(float_views(dtype, (3, sizes[0]), bound=2.0))
    y = model(x)
    assert y.dtype == dtype and y.shape == (3, sizes[-1])
    np.testing.assert_allclose(y, mlp_by_hand(x, layer_weights(model), activation), rtol=tol(dtype), atol=tol(dtype))


def test_mlp_activation_classes_and_reproducibility():
    kinds = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "gelu_tanh": nn.GELU}
    for name, cls in kinds.items():
        assert isinstance(nn.MLP([2, 3, 2], name)[1], cls)
    assert nn.MLP([2, 3, 2], "gelu")[1].approximate == "none"
    assert nn.MLP([2, 3, 2], "gelu_tanh")[1].approximate == "tanh"
    a, b = nn.MLP([3, 4, 2], random_state=7), nn.MLP([3, 4, 2], random_state=7)
    assert all(np.array_equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert nn.MLP([3, 2], bias=False).named_parameters()[0][0] == "0.weight" and len(nn.MLP([3, 2], bias=False)
                                                                                       .parameters()) == 1
    assert "sizes=[3, 4, 2]" in repr(a)
    assert nn.MLP(np.array([3, 4]), dtype="float64")[0].weight.dtype == np.float64


@pytest.mark.parametrize(
    ("sizes", "kwargs", "error", "match"),
    [
        ([4], {}, ValueError, r"sizes must have at least 2 entries.*\[4\]"),
        ([], {}, ValueError, "at least 2 entries"),
        ([4, 0, 2], {}, ValueError, r"sizes\[1\] must be in \[1, inf\], got 0"),
        ([4, -3], {}, ValueError, r"sizes\[1\].*got -3"),
        ([4, 2.5], {}, TypeError, r"sizes\[1\] must be an integer, got float 2.5"),
        ([4, True], {}, TypeError, r"sizes\[1\] must be an integer"),
        ("42", {}, TypeError, "sizes must be a sequence"),
        (4, {}, TypeError, "sizes must be a sequence of layer widths, got int 4"),
        ([4, 2], {"activation": "swish"}, ValueError, "activation must be one of .*got 'swish'"),
        ([4, 2], {"dtype": np.float16}, TypeError, "dtype must be float32 or float64"),
        ([4, 2], {"bias": 1}, TypeError, "bias must be True or False"),
        ([4, 2], {"random_state": -1}, ValueError, "random_state"),
    ],
)
def test_mlp_refuses_bad_arguments(sizes, kwargs, error, match):
    with pytest.raises(error, match=match):
        nn.MLP(sizes, **kwargs)


# ---------------------------------------------------------------- the whole model's gradient


@pytest.mark.parametrize("activation", ["tanh", "gelu", "sigmoid"])
@pytest.mark.parametrize("base_trainable", [False, True])
def test_whole_model_gradient_matches_finite_differences(activation, base_trainable):
    """MLP with LoRA on every layer, softmax cross-entropy, float64: every trainable gradient and dx."""
    rng = np.random.default_rng(3)
    model = nn.MLP([5, 6, 4, 3], activation, dtype=np.float64, random_state=rng)
    nn.inject_lora(model, r=2, alpha=3.0, random_state=rng)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = rng.standard_normal(p.shape)  # B = 0 would hide A's gradient
        elif base_trainable:
            p.trainable = True
    x = rng.standard_normal((7, 5))
    target = rng.integers(0, 3, size=7)
    names = [k for k, p in model.named_parameters() if p.trainable]
    assert len(names) == (12 if base_trainable else 6)
    report = check_module_gradients(model, x, loss=lambda y: F.cross_entropy(y, target))
    assert set(report.arguments) == {"x", *names}


# ---------------------------------------------------------------- inject_lora


@given(cfg=adapted_mlp_configs(), data=st.data())
def test_inject_lora_wraps_the_targets_and_freezes_everything_else(cfg, data):
    model = nn.MLP(cfg["sizes"], cfg["activation"], dtype=cfg["dtype"], random_state=cfg["seed"])
    before = model.state_dict()
    x = data.draw(float_views(cfg["dtype"], (3, cfg["sizes"][0]), bound=2.0))
    y_before = model(x)
    linear_names = [str(2 * i) for i in range(len(cfg["sizes"]) - 1)]
    targets = linear_names if cfg["targets"] is None else cfg["targets"]
    out = nn.inject_lora(model, r=cfg["r"], alpha=cfg["alpha"], targets=cfg["targets"],
                         use_rslora=cfg["use_rslora"], random_state=cfg["seed"])
    assert out is model
    for name in linear_names:
        layer = getattr(model, name)
        assert isinstance(layer, nn.LoRALinear) == (name in targets)
    expected_trainable = {f"{t}.lora_{f}.weight" for t in targets for f in "AB"}
    params = dict(model.named_parameters())
    assert {k for k, p in params.items() if p.trainable} == expected_trainable
    assert set(params) == set(before) | expected_trainable  # base keys unchanged
    for k, v in before.items():
        assert np.array_equal(params[k].data, v)
    for t in targets:
        lora = getattr(model, t)
        scaling = scaling_by_hand(cfg["alpha"], cfg["r"], cfg["use_rslora"])
        assert lora.r == cfg["r"] and lora.scaling == pytest.approx(scaling, rel=1e-15)
        assert not lora.B.data.any()  # B = 0: a fresh adapter changes nothing
    np.testing.assert_array_equal(model(x), y_before)


def test_inject_lora_same_seed_same_adapters_and_one_generator():
    def build(seed):
        return nn.inject_lora(nn.MLP([6, 5, 4], random_state=0), r=2, alpha=2, random_state=seed)

    a, b, c = build(11), build(11), build(12)
    for k, v in a.state_dict().items():
        assert np.array_equal(v, b.state_dict()[k])
    assert not np.array_equal(a.state_dict()["0.lora_A.weight"], c.state_dict()["0.lora_A.weight"])
    # one Generator resolved once and drawn in model order: layer 2's A follows layer 0's
    gen = np.random.default_rng(11)
    bound0, bound2 = 1 / math.sqrt(6), 1 / math.sqrt(5)
    A0 = gen.uniform(-bound0, bound0, (2, 6)).astype(np.float32)
    A2 = gen.uniform(-bound2, bound2, (2, 5)).astype(np.float32)
    assert np.array_equal(a[0].A.data, A0) and np.array_equal(a[2].A.data, A2)
    assert a[0].generator is a[2].generator


def test_inject_lora_nested_and_shared_layers():
    inner = nn.Sequential(nn.Linear(3, 4, random_state=0), nn.ReLU())
    shared = nn.Linear(4, 4, random_state=1)
    model = nn.Sequential(inner, shared, nn.Tanh(), nn.Linear(4, 2, random_state=2))
    model.alias = shared  # the same layer under a second name
    with pytest.raises(ValueError, match=r"the layers LoRA can adapt are \['0.0', '1', '3'\]"):
        nn.inject_lora(model, r=1, alpha=1, targets=["0"])
    nn.inject_lora(model, r=1, alpha=1, targets=["0.0", "1"], random_state=0)
    assert isinstance(model[0][0], nn.LoRALinear) and isinstance(model[1], nn.LoRALinear)
    assert model.alias is model[1]  # replaced under both names, by the same layer
    assert isinstance(model[3], nn.Linear) and not model[3].weight.trainable
    keys = [k for k, p in model.named_parameters() if p.trainable]
    assert keys == ["0.0.lora_A.weight", "0.0.lora_B.weight", "1.lora_A.weight", "1.lora_B.weight"]
    # the remaining Linear can be adapted later; earlier adapters stay trainable
    nn.inject_lora(model, r=1, alpha=1, targets=["3"], random_state=0)
    assert sum(p.trainable for p in model.parameters()) == 6


def test_inject_lora_on_a_bare_linear_returns_the_new_layer():
    lin = nn.Linear(3, 2, random_state=0)
    lora = nn.inject_lora(lin, r=1, alpha=1, random_state=0)
    assert isinstance(lora, nn.LoRALinear) and lora.base is lin and not lin.weight.trainable


def test_inject_lora_pissa_keeps_the_output():
    model = nn.MLP([5, 4, 3], "tanh", dtype=np.float64, random_state=0)
    x = np.random.default_rng(1).standard_normal((6, 5))
    y = model(x)
    nn.inject_lora(model, r=2, alpha=2, init="pissa")
    np.testing.assert_allclose(model(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": ["1"]}, ValueError, r"targets \['1'\] are not Linear, Conv1D or Embedding layers.*\['0', '2'\]"),
        ({"targets": ["0", "7", "x"]}, ValueError, r"targets \['7', 'x'\] are not Linear, Conv1D or Embedding layers"),
        ({"targets": "0"}, TypeError, "targets must be a list of layer names"),
        ({"targets": [0]}, TypeError, r"targets must hold layer names \(str\), got \[0\]"),
        ({"targets": []}, ValueError, "targets must name at least one"),
        ({"init": "pissa", "r": 4}, ValueError, r"for init='pissa' \(layer '2', weight shape \(3, 4\)\), got 4"),
        ({"random_state": "seed"}, TypeError, "random_state"),
    ],
)  # fmt: skip  (r, alpha, dropout, use_rslora, init: BAD_SETTINGS below, for the layer and the model alike)
def test_inject_lora_refuses_bad_arguments_before_changing_anything(kwargs, error, match):
    model = nn.MLP([5, 4, 3], random_state=0)
    before = snapshot(model)
    args = {"r": 1, "alpha": 1, **kwargs}
    with pytest.raises(error, match=match):
        nn.inject_lora(model, **args)
    assert_same_snapshot(snapshot(model), before)


def test_inject_lora_refuses_to_adapt_twice_and_models_without_linears():
    model = nn.inject_lora(nn.MLP([4, 3, 2], random_state=0), r=1, alpha=1, targets=["0"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model already has LoRA layers at \['0'\].*\['2'\]"):
        nn.inject_lora(model, r=1, alpha=1)
    with pytest.raises(ValueError, match=r"targets \['0'\] are already LoRA layers"):
        nn.inject_lora(model, r=1, alpha=1, targets=["0", "2"])
    assert_same_snapshot(snapshot(model), before)
    with pytest.raises(ValueError, match="no Linear or Conv1D layer"):
        nn.inject_lora(nn.Sequential(nn.ReLU()), r=1, alpha=1)
    with pytest.raises(TypeError, match=r"model must be a lowrank\.nn\.Module, got list"):
        nn.inject_lora([nn.Linear(2, 2)], r=1, alpha=1)


# ---------------------------------------------------------------- trainable_summary


@pytest.mark.parametrize(("sizes", "r", "targets"), [([32, 64, 10], 4, None), ([100, 300, 7], 1, ["2"]),
                                                      ([1000, 2000, 1000], 8, ["0"])])
def test_trainable_summary_text_from_the_formula(sizes, r, targets, capsys):
    model = nn.MLP(sizes, random_state=0)
    nn.inject_lora(model, r=r, alpha=16, targets=targets, random_state=0)
    layers = list(itertools.pairwise(sizes))
    chosen = range(len(layers)) if targets is None else [int(t) // 2 for t in targets]
    lora = sum(r * (layers[i][0] + layers[i][1]) for i in chosen)  # r (in + out) per adapted matrix
    total = sum(n_in * n_out + n_out for n_in, n_out in layers) + lora
    expected = f"trainable params: {lora:,} || all params: {total:,} || trainable%: {100 * lora / total:.4f}"
    assert nn.trainable_summary(model) == expected
    assert capsys.readouterr().out == expected + "\n"
    assert nn.trainable_summary(model, quiet=True) == expected
    assert capsys.readouterr().out == ""


def test_trainable_summary_known_values():
    # MLP [32, 64, 10], r = 4 on both layers: 4 (32 + 64) + 4 (64 + 10) = 680 trainable;
    # all: 32*64 + 64 + 64*10 + 10 + 680 = 3,442; 680 / 3,442 = 19.7559...%
    model = nn.inject_lora(nn.MLP([32, 64, 10], random_state=0), r=4, alpha=4, random_state=0)
    text = nn.trainable_summary(model, quiet=True)
    assert text == "trainable params: 680 || all params: 3,442 || trainable%: 19.7560"
    plain = nn.MLP([3, 2])
    assert nn.trainable_summary(plain, quiet=True) == "trainable params: 8 || all params: 8 || trainable%: 100.0000"
    with pytest.raises(ValueError, match="no parameters"):
        nn.trainable_summary(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="model must be"):
        nn.trainable_summary("model")
    with pytest.raises(TypeError, match="quiet"):
        nn.trainable_summary(plain, quiet=None)


def test_trainable_summary_matches_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    sizes, r = [20, 30, 5], 3
    tmodel = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    pmodel = peft.get_peft_model(tmodel, peft.LoraConfig(r=r, lora_alpha=6, target_modules=["0", "2"]))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        pmodel.print_trainable_parameters()
    ours = nn.trainable_summary(nn.inject_lora(nn.MLP(sizes), r=r, alpha=6), quiet=True)
    assert buffer.getvalue().strip() == ours


# ---------------------------------------------------------------- merge_lora


@given(cfg=adapted_mlp_configs(), data=st.data())
def test_merge_lora_equals_the_adapted_model_and_leaves_it_untouched(cfg, data):
    model, x = adapted(cfg, data, dropout=0.25)
    model.zero_grad()
    model(x)
    model.backward(np.ones((x.shape[0], cfg["sizes"][-1]), cfg["dtype"]))  # gradients to leave alone
    model.train()
    before = snapshot(model)
    plain = nn.merge_lora(model)
    assert_same_snapshot(snapshot(model), before)
    assert model.training and all(m.training for m in model.modules())
    assert type(plain) is type(model) and not any(isinstance(m, nn.LoRALinear) for m in plain.modules())
    base_keys = [k for k in before[0] if "lora_" not in k]
    assert [k for k, _ in plain.named_parameters()] == base_keys
    assert all(p.trainable and p.grad is None for p in plain.parameters())
    assert all(p.data is not q.data for p, q in zip(plain.parameters(), model.parameters(), strict=False))
    # independent: each merged weight is W + alpha / r * B @ A by hand, in float64, rounded once
    params = dict(plain.named_parameters())
    for name, m in model.named_modules():
        if isinstance(m, nn.LoRALinear):
            W = m.weight.data.astype(np.float64) + delta_by_hand(m)  # (out, in)
            eps = np.finfo(cfg["dtype"]).eps  # one rounding to W's dtype, nothing more
            got = params[f"{name}.weight"].data
            assert got.dtype == cfg["dtype"]
            np.testing.assert_allclose(got, W, rtol=eps, atol=eps * np.abs(W).max())
    plain.eval()
    expected = mlp_by_hand(x, layer_weights(model), cfg["activation"])
    np.testing.assert_allclose(plain(x), expected, rtol=tol(cfg["dtype"]), atol=tol(cfg["dtype"]))


def test_merge_lora_merged_layers_and_bare_layers():
    rng = np.random.default_rng(0)
    lora = nn.LoRALinear(nn.Linear(4, 3, dtype=np.float64, random_state=rng), r=2, alpha=2, random_state=rng)
    lora.B.data = rng.standard_normal(lora.B.shape)
    x = rng.standard_normal((5, 4))
    plain = nn.merge_lora(lora)
    assert type(plain) is nn.Linear
    W = lora.weight.data + 1.0 * lora.B.data @ lora.A.data  # alpha / r = 2 / 2, by hand
    np.testing.assert_allclose(plain(x), x @ W.T + lora.bias.data, rtol=1e-13)
    lora.merge()  # already merged: its weight is W + scaling * B @ A, taken as it is
    np.testing.assert_array_equal(nn.merge_lora(lora).weight.data, lora.weight.data)
    assert lora.merged


def test_merge_lora_refuses_overflow_and_non_modules():
    lora = nn.LoRALinear(nn.Linear(2, 2, random_state=0), r=1, alpha=1, random_state=0)
    lora.B.data = np.full((2, 1), 3e38, np.float32)
    lora.A.data = np.full((1, 2), 10.0, np.float32)
    before = snapshot(lora)
    with pytest.raises(FloatingPointError, match=r"merge_lora: layer '0': LoRALinear.merge refused: .* "
                                                 r"non-finite entries in float32"):
        nn.merge_lora(nn.Sequential(lora))
    assert_same_snapshot(snapshot(lora), before)
    with pytest.raises(TypeError, match="model must be"):
        nn.merge_lora(None)


def test_merge_lora_has_the_layers_own_overflow_message():
    """One fold, one wording: merge_lora's error is LoRALinear.merge's, after the layer's name."""
    def poisoned():
        lora = nn.LoRALinear(nn.Linear(2, 2, random_state=0), r=1, alpha=1, random_state=0)
        lora.B.data = np.full((2, 1), 3e38, np.float32)
        lora.A.data = np.full((1, 2), 10.0, np.float32)
        return lora

    with pytest.raises(FloatingPointError) as own:
        poisoned().merge()
    with pytest.raises(FloatingPointError) as whole:
        nn.merge_lora(nn.Sequential(nn.ReLU(), poisoned()))
    assert str(whole.value) == f"merge_lora: layer '1': {own.value}"
    with pytest.raises(FloatingPointError, match=r"^merge_lora: layer '<the model itself>': LoRALinear.merge"):
        nn.merge_lora(poisoned())


def test_merge_lora_keeps_each_layers_mode_and_shared_layers():
    model = nn.inject_lora(nn.MLP([3, 4, 2], random_state=0), r=1, alpha=1, random_state=0)
    model.alias = model[0]  # one LoRA layer under two names
    model[0].eval()
    plain = nn.merge_lora(model)
    assert type(plain[0]) is nn.Linear and plain.alias is plain[0]
    assert not plain[0].training and plain[2].training  # the base takes its layer's mode
    assert model[0].training is False and isinstance(model[0], nn.LoRALinear)  # the original is untouched


# ---------------------------------------------------------------- check_lora_config, check_pissa_rank


def test_check_lora_config_returns_python_scalars():
    got = nn.check_lora_config(np.int64(4), 8, np.float32(0.25), np.bool_(True), "pissa")
    assert got == (4, 8.0, 0.25, True, "pissa")
    assert [type(v) for v in got] == [int, float, float, bool, str]
    assert nn.check_lora_config(1) == (1, 8.0, 0.0, False, "kaiming")  # LoRALinear's defaults


BAD_SETTINGS = [
    ({"r": 0}, ValueError, r"^r must be in \[1, inf\], got 0$"),
    ({"r": 2.0}, TypeError, r"^r must be an integer, got float 2.0$"),
    ({"r": True}, TypeError, r"^r must be an integer, got bool True$"),
    ({"alpha": 0}, ValueError, r"^alpha must be in \(0, inf\), got 0.0$"),
    ({"alpha": float("inf")}, ValueError, r"^alpha must be in \(0, inf\), got inf$"),
    ({"alpha": "8"}, TypeError, r"^alpha must be a real number, got str '8'$"),
    ({"dropout": 1.0}, ValueError, r"^dropout must be in \[0, 1\), got 1.0$"),
    ({"dropout": -0.5}, ValueError, r"^dropout must be in \[0, 1\), got -0.5$"),
    ({"use_rslora": 1}, TypeError, r"^use_rslora must be True or False, got int 1$"),
    ({"init": "zeros"}, ValueError, r"^init must be one of 'kaiming', 'gaussian', 'pissa', got 'zeros'$"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_SETTINGS)
def test_check_lora_config_refuses_with_one_wording_everywhere(kwargs, error, match):
    args = {"r": 1, "alpha": 1.0, "dropout": 0.0, "use_rslora": False, "init": "kaiming", **kwargs}
    with pytest.raises(error, match=match):
        nn.check_lora_config(**args)
    with pytest.raises(error, match=match):  # the layer: the same words
        nn.LoRALinear(nn.Linear(3, 3), **args)
    model = nn.MLP([3, 3, 2], random_state=0)
    before = snapshot(model)
    with pytest.raises(error, match=match):  # the model: the same words, nothing changed
        nn.inject_lora(model, **args)
    assert_same_snapshot(snapshot(model), before)


def test_check_pissa_rank_one_rule_one_wording():
    assert nn.check_pissa_rank(3, (3, 5)) == 3
    assert nn.check_pissa_rank(1, (1, 1)) == 1
    rule = r"r must be in \[1, min\(in_features, out_features\)\] = \[1, 3\] for init='pissa' "
    with pytest.raises(ValueError, match=rule + r"\(weight shape \(3, 5\)\), got 4$"):
        nn.check_pissa_rank(4, (3, 5))
    with pytest.raises(ValueError, match=rule + r"\(weight shape \(3, 5\)\), got 4$"):
        nn.LoRALinear(nn.Linear(5, 3), r=4, init="pissa")
    with pytest.raises(ValueError, match=rule + r"\(layer 'block.fc', weight shape \(5, 3\)\), got 4$"):
        nn.check_pissa_rank(4, (5, 3), layer="block.fc")
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 5)))
    with pytest.raises(ValueError, match=rule + r"\(layer '0.0', weight shape \(5, 3\)\), got 4$"):
        nn.inject_lora(model, r=4, alpha=1, init="pissa")
    assert isinstance(model[0][0], nn.Linear)


# ---------------------------------------------------------------- replace_modules


def test_replace_modules_by_name_nested_and_shared():
    inner = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    shared = nn.Linear(4, 4)
    model = nn.Sequential(inner, shared, nn.Tanh())
    model.alias = shared
    keys = list(model.state_dict())
    new_shared, new_act = nn.Linear(4, 4), nn.GELU()
    assert nn.replace_modules(model, {"alias": new_shared, "0.1": new_act}) is model
    assert model[1] is new_shared and model.alias is new_shared  # every name of the shared layer
    assert model[0][1] is new_act and model[0][0] is inner[0]
    assert list(model.state_dict()) == keys  # names and positions kept
    assert [type(model[i]).__name__ for i in range(3)] == ["Sequential", "Linear", "Tanh"]
    assert nn.replace_modules(model, {}) is model


def test_replace_modules_the_model_itself():
    lin = nn.Linear(2, 2)
    lora = nn.LoRALinear(lin, r=1)
    assert nn.replace_modules(lin, {"": lora}) is lora
    assert nn.replace_modules(lora, {"": lin}) is lin


@pytest.mark.parametrize(
    ("model", "replacements", "error", "match"),
    [
        ("model", {}, TypeError, r"^model must be a lowrank\.nn\.Module, got str$"),
        (None, [("0", nn.ReLU())], TypeError, r"^replacements must be a mapping of module name to Module, got list$"),
        (None, {0: nn.ReLU()}, TypeError, r"^replacements keys must be module names \(str\), got int 0$"),
        (None, {"0": "relu"}, TypeError, r"^replacements\['0'\] must be a lowrank\.nn\.Module, got str$"),
        (None, {"3": nn.ReLU()}, ValueError,
         r"^replacements names '3', which is not a module of model; its modules are \['0', '1', '2'\]$"),
        (None, {"0.weight": nn.ReLU()}, ValueError, r"replacements names '0.weight', which is not a module"),
        (None, {"": nn.ReLU(), "1": nn.Tanh()}, ValueError,
         r"^replacements names the model itself \(''\) beside \['1'\]: .* '' must be the only name$"),
        (None, {"0": nn.ReLU(), "alias": nn.Tanh()}, ValueError,
         r"^replacements gives '0' and 'alias', two names of one shared module, different replacements"),
    ],
)  # fmt: skip
def test_replace_modules_refuses_and_changes_nothing(model, replacements, error, match):
    target = nn.MLP([2, 3, 2], random_state=0)
    target.alias = target[0]
    before = [id(m) for m in target.modules()]
    with pytest.raises(error, match=match):
        nn.replace_modules(target if model is None else model, replacements)
    assert [id(m) for m in target.modules()] == before


# ---------------------------------------------------------------- mark_only_lora_as_trainable


def test_mark_only_lora_as_trainable_freezes_the_rest_and_keeps_factor_flags():
    model = nn.MLP([3, 4, 4, 2], random_state=0)
    model[0] = nn.LoRALinear(model[0], r=1)
    model[2] = nn.LoRALinear(model[2], r=1)
    model[2].B.trainable = False  # a factor the user froze stays frozen
    model[4].weight.trainable = True
    assert nn.mark_only_lora_as_trainable(model) is model
    trainable = [k for k, p in model.named_parameters() if p.trainable]
    assert trainable == ["0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight"]


def test_mark_only_lora_as_trainable_refuses():
    with pytest.raises(TypeError, match=r"^model must be a lowrank\.nn\.Module, got dict$"):
        nn.mark_only_lora_as_trainable({})
    model = nn.MLP([3, 2], random_state=0)
    with pytest.raises(ValueError, match=r"^model has no LoRA layer \(MLP; LoRALinear, .*\): .* freeze every"):
        nn.mark_only_lora_as_trainable(model)
    assert all(p.trainable for p in model.parameters())


# ---------------------------------------------------------------- match_target_modules


@pytest.mark.parametrize(
    ("target_modules", "name", "expected"),
    [
        (["q", "v"], "q", True),
        (["q", "v"], "layers.0.attn.q", True),  # ends in "." + entry
        (["q", "v"], "layers.0.attn.k", False),
        (["fc"], "block.fc2", False),  # a suffix must start at a dot
        (["fc"], "blockfc", False),
        (["0"], "1.0", True),
        (("0",), "0", True),  # any iterable of names
        (["attn.q"], "layers.0.attn.q", True),
        ([], "q", False),
        ([""], "", True),
        (r"layers\.\d+\.attn\.(q|v)", "layers.12.attn.v", True),
        (r"layers\.\d+\.attn\.(q|v)", "layers.12.attn.v.extra", False),  # the whole name must match
        (r"attn\.q", "layers.0.attn.q", False),
        ("q", "q", True),
        ("all-linear", "anything.at.all", True),
        (None, "anything", True),
    ],
)
def test_match_target_modules_is_peft_rule(target_modules, name, expected):
    assert nn.match_target_modules(target_modules, name) is expected


@pytest.mark.parametrize(
    ("target_modules", "name", "error", "match"),
    [
        (3, "q", TypeError, r"^target_modules must be None, a str or a list of str, got int 3$"),
        (b"q", "q", TypeError, r"^target_modules must be None, a str or a list of str, got bytes b'q'$"),
        (["q", 1], "q", TypeError, r"^target_modules must hold module names \(str\), got \[1\]$"),
        (["q"], 0, TypeError, r"^name must be a module name \(str\), got int 0$"),
        ("(q", "q", ValueError, r"^target_modules must be a valid regular expression, got '\(q': missing \)"),
    ],
)
def test_match_target_modules_refuses(target_modules, name, error, match):
    with pytest.raises(error, match=match):
        nn.match_target_modules(target_modules, name)


# ---------------------------------------------------------------- inject_lora's modes


def test_inject_lora_new_layers_take_the_mode_of_the_linear_they_wrap():
    model = nn.MLP([3, 4, 2], random_state=0).eval()
    model[2].train()
    nn.inject_lora(model, r=1, alpha=1, dropout=0.5, random_state=0)
    assert not model[0].training and not model[0].lora_A.training
    assert model[2].training
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(model[0](x), model[0](x))  # eval: no dropout mask drawn


# ---------------------------------------------------------------- PEFT's settings: per-layer r and alpha,
# target_modules, bias, modules_to_save


def deep_mlp(dtype=np.float64):
    return nn.MLP([4, 6, 5, 3], activation="tanh", dtype=dtype, random_state=0)  # Linear at "0", "2", "4"


@pytest.mark.parametrize("per_layer", ["mapping", "function"])
def test_inject_lora_per_layer_r_and_alpha_give_each_layer_its_own_scaling(per_layer):
    ranks, alphas = {"0": 1, "2": 3, "4": 2}, {"0": 5.0, "2": 6.0, "4": 1.0}
    r = ranks if per_layer == "mapping" else ranks.__getitem__
    alpha = alphas if per_layer == "mapping" else alphas.__getitem__
    model = nn.inject_lora(deep_mlp(), r=r, alpha=alpha, random_state=0)
    rng = np.random.default_rng(0)
    for name in ranks:
        layer = model[int(name)]
        assert layer.A.shape == (ranks[name], layer.in_features) and layer.B.shape == (layer.out_features, ranks[name])
        assert layer.scaling == alphas[name] / ranks[name]
        layer.B.data = rng.standard_normal(layer.B.shape)
    x = rng.standard_normal((3, 4))
    by_hand = [(m.weight.data, m.bias.data, alphas[n] / ranks[n] * (m.B.data @ m.A.data)) for n, m in
               ((str(i), model[i]) for i in (0, 2, 4))]
    np.testing.assert_allclose(model(x), mlp_by_hand(x, by_hand, "tanh"), rtol=1e-12, atol=1e-12)


def test_inject_lora_per_layer_values_are_checked_with_the_layers_name():
    model = deep_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"r maps layer names to values but has no entry for the adapted layer '4'"):
        nn.inject_lora(model, r={"0": 1, "2": 1}, alpha=1)
    with pytest.raises(ValueError, match=r"layer '2': alpha must be"):
        nn.inject_lora(model, r=1, alpha={"0": 1, "2": -1.0, "4": 1})
    with pytest.raises(TypeError, match=r"layer '0': r must be"):
        nn.inject_lora(model, r=lambda name: 1.5, alpha=1)
    with pytest.raises(ValueError, match=r"for init='pissa' \(layer '4', weight shape \(3, 5\)\), got 4"):
        nn.inject_lora(model, r={"0": 1, "2": 1, "4": 4}, alpha=1, init="pissa")
    assert_same_snapshot(snapshot(model), before)


def two_blocks():
    block = nn.Sequential
    return block(block(nn.Linear(2, 3), nn.Linear(3, 3)), block(nn.Linear(3, 3), nn.Linear(3, 2)))


def test_inject_lora_target_modules_is_peft_rule_and_targets_stays_exact():
    model = two_blocks()
    nn.inject_lora(model, r=1, alpha=1, target_modules=["1"], random_state=0)  # a dotted suffix: "0.1" and "1.1"
    assert [n for n, m in model.named_modules() if isinstance(m, nn.LoRALinear)] == ["0.1", "1.1"]
    model = two_blocks()
    nn.inject_lora(model, r=1, alpha=1, target_modules=r"\d\.0", random_state=0)  # a full-match regex
    assert [n for n, m in model.named_modules() if isinstance(m, nn.LoRALinear)] == ["0.0", "1.0"]
    # targets: exact names only
    with pytest.raises(ValueError, match=r"targets \['1'\] are not Linear, Conv1D or Embedding layers"):
        nn.inject_lora(model, r=1, alpha=1, targets=["1"])
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] matches no Linear, Conv1D or Embedding layer"):
        nn.inject_lora(model, r=1, alpha=1, target_modules=["nope"])
    with pytest.raises(TypeError, match="not both"):
        nn.inject_lora(model, r=1, alpha=1, targets=["0.1"], target_modules=["1"])


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_inject_lora_bias_trains_the_biases_peft_names_with_their_own_gradient(bias):
    model = nn.inject_lora(deep_mlp(), r=2, alpha=3, targets=["0", "4"], bias=bias, random_state=0)
    trainable = sorted(n for n, p in model.named_parameters() if p.trainable)
    factors = [f"{i}.lora_{f}.weight" for i in (0, 4) for f in "AB"]
    expected = {"none": factors, "lora_only": [*factors, "0.bias", "4.bias"],
                "all": [*factors, "0.bias", "2.bias", "4.bias"]}[bias]
    assert trainable == sorted(expected)
    rng = np.random.default_rng(1)
    for i in (0, 4):
        model[i].B.data = rng.standard_normal(model[i].B.shape)
    x, dy = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 3))
    report = check_module_gradients(model, x, dy=dy)  # every trainable gradient against finite differences
    assert set(report.arguments) == {"x", *trainable}
    frozen = [p for p in model.parameters() if not p.trainable]
    assert frozen and all(p.grad is None for p in frozen)


def test_inject_lora_modules_to_save_train_in_full():
    model = nn.inject_lora(deep_mlp(), r=1, alpha=1, targets=["0"], modules_to_save=["4"], random_state=0)
    assert sorted(n for n, p in model.named_parameters() if p.trainable) == [
        "0.lora_A.weight", "0.lora_B.weight", "4.bias", "4.weight"]
    report = check_module_gradients(model, np.ones((2, 4)), dy=np.ones((2, 3)))
    assert set(report.arguments) == {"x", "0.lora_A.weight", "0.lora_B.weight", "4.bias", "4.weight"}
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"modules_to_save entry 'head' matches no module"):
        nn.inject_lora(model, r=1, alpha=1, targets=["2"], modules_to_save=["head"])
    with pytest.raises(ValueError, match=r"modules_to_save entry '2' matches \['2'\], which are adapted"):
        nn.inject_lora(model, r=1, alpha=1, targets=["2"], modules_to_save=["2"])
    with pytest.raises(TypeError, match="modules_to_save must be a list"):
        nn.inject_lora(model, r=1, alpha=1, targets=["2"], modules_to_save="4")
    with pytest.raises(ValueError, match="bias must be one of"):
        nn.inject_lora(model, r=1, alpha=1, targets=["2"], bias="some")
    assert_same_snapshot(snapshot(model), before)


def test_mark_only_lora_as_trainable_also_trainable_and_bias():
    model = nn.inject_lora(deep_mlp(), r=1, alpha=1, targets=["2"], random_state=0)
    nn.mark_only_lora_as_trainable(model, bias="lora_only", also_trainable=["0"])
    assert sorted(n for n, p in model.named_parameters() if p.trainable) == [
        "0.bias", "0.weight", "2.bias", "2.lora_A.weight", "2.lora_B.weight"]
    nn.mark_only_lora_as_trainable(model)  # back to the factors alone
    assert sorted(n for n, p in model.named_parameters() if p.trainable) == ["2.lora_A.weight", "2.lora_B.weight"]
    with pytest.raises(ValueError, match=r"also_trainable \['9'\] are not modules of the model"):
        nn.mark_only_lora_as_trainable(model, also_trainable=["9"])
    with pytest.raises(ValueError, match=r"also_trainable \['2'\] are LoRA layers"):
        nn.mark_only_lora_as_trainable(model, also_trainable=["2"])
    with pytest.raises(TypeError, match="also_trainable must be a list"):
        nn.mark_only_lora_as_trainable(model, also_trainable="0")
