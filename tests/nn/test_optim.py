"""Optimizers, schedules and clipping against the published formulas, by hand and against PyTorch.

The references here are written from PyTorch's documented pseudo-code
(torch.optim.SGD / Adam / AdamW), step by step and without in-place tricks,
independently of lowrank/nn/optim.py; a few cases are worked out to literal
numbers; and when torch is installed the same three steps run through
torch.optim in float64.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import FLOAT_DTYPES, adam_hyper, optimizer_problems, sgd_hyper

from lowrank.nn.optim import (
    SGD,
    Adam,
    AdamW,
    ConstantLR,
    CosineAnnealing,
    LinearWarmup,
    NonFiniteNormError,
    WarmupCosine,
    clip_grad_norm_,
    clip_grads_,
)


class Param:
    """The duck-typed Parameter the optimizers are written against."""

    def __init__(self, data, trainable=True, grad=None):
        self.data = np.array(data)
        self.grad = grad
        self.trainable = trainable


def run(optimizer_cls, theta0, grads, **hyper):
    """Take len(grads) steps on one parameter; return its value after each step."""
    p = Param(theta0.copy())
    opt = optimizer_cls([p], **hyper)
    values = []
    for g in grads:
        p.grad = g.copy()
        opt.step()
        values.append(p.data.copy())
    return values


# ---------------------------------------------------------------- references from the pseudo-code


def sgd_reference(theta, grads, lr, momentum, dampening, nesterov, weight_decay):
    """torch.optim.SGD's documented algorithm, in float64."""
    theta = np.asarray(theta, dtype=np.float64)
    b, out = None, []
    for g in grads:
        g = np.asarray(g, dtype=np.float64)
        if weight_decay != 0:
            g = g + weight_decay * theta
        if momentum != 0:
            b = g if b is None else momentum * b + (1 - dampening) * g
            g = g + momentum * b if nesterov else b
        theta = theta - lr * g
        out.append(theta)
    return out


def adam_reference(theta, grads, lr, betas, eps, weight_decay, decoupled):
    """torch.optim.Adam (decoupled=False) / AdamW (True) as documented, in float64."""
    beta1, beta2 = betas
    theta = np.asarray(theta, dtype=np.float64)
    m = v = np.zeros_like(theta)
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        if decoupled:
            theta = theta - lr * weight_decay * theta
        elif weight_decay != 0:
            g = g + weight_decay * theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(theta)
    return out


def assert_steps_match(got, want, dtype):
    for step, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        assert a.dtype == dtype, f"step {step}: dtype {a.dtype}"
        if dtype == np.float64:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=f"step {step}")
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"step {step}")


@given(optimizer_problems(), sgd_hyper())
def test_sgd_matches_the_published_rule(problem, hyper):
    theta0, grads = problem
    want = sgd_reference(theta0, grads, **hyper)
    assert_steps_match(run(SGD, theta0, grads, **hyper), want, theta0.dtype)


@given(optimizer_problems(), adam_hyper())
def test_adam_matches_the_published_rule(problem, hyper):
    theta0, grads = problem
    want = adam_reference(theta0, grads, decoupled=False, **hyper)
    assert_steps_match(run(Adam, theta0, grads, **hyper), want, theta0.dtype)


@given(optimizer_problems(), adam_hyper())
def test_adamw_matches_the_published_rule(problem, hyper):
    theta0, grads = problem
    want = adam_reference(theta0, grads, decoupled=True, **hyper)
    assert_steps_match(run(AdamW, theta0, grads, **hyper), want, theta0.dtype)


# ---------------------------------------------------------------- literal numbers, worked by hand


def test_sgd_momentum_by_hand():
    # θ0 = 1, g = 0.5 every step, γ = 0.1, μ = 0.9:
    # b1 = 0.5            θ1 = 1 − 0.05      = 0.95
    # b2 = 0.45 + 0.5     θ2 = 0.95 − 0.095  = 0.855
    # b3 = 0.855 + 0.5    θ3 = 0.855 − 0.1355 = 0.7195
    got = run(SGD, np.array(1.0), [np.array(0.5)] * 3, lr=0.1, momentum=0.9)
    np.testing.assert_allclose(got, [0.95, 0.855, 0.7195], rtol=1e-14)


def test_sgd_nesterov_and_weight_decay_by_hand():
    # θ0 = 1, g = 0.5, γ = 0.1, μ = 0.5, λ = 0.1, Nesterov (update = g + μ b):
    # g1 = 0.5 + 0.1      = 0.6       b1 = 0.6                        update 0.6 + 0.3 = 0.9
    #                                                                  θ1 = 1 − 0.09 = 0.91
    # g2 = 0.5 + 0.091    = 0.591     b2 = 0.3 + 0.591 = 0.891        update 0.591 + 0.4455 = 1.0365
    #                                                                  θ2 = 0.91 − 0.10365 = 0.80635
    # g3 = 0.5 + 0.080635 = 0.580635  b3 = 0.4455 + 0.580635 = 1.026135
    #                                 update 0.580635 + 0.5130675 = 1.0937025
    #                                                                  θ3 = 0.80635 − 0.10937025 = 0.69697975
    got = run(SGD, np.array(1.0), [np.array(0.5)] * 3, lr=0.1, momentum=0.5, nesterov=True,
              weight_decay=0.1)
    np.testing.assert_allclose(got, [0.91, 0.80635, 0.69697975], rtol=1e-14)


def test_sgd_dampening_by_hand():
    # θ0 = 0, g = 1, γ = 1, μ = 0.5, τ = 0.5: b1 = 1 (undamped), b2 = 0.5 + 0.5 = 1, b3 = 1
    got = run(SGD, np.array(0.0), [np.array(1.0)] * 3, lr=1.0, momentum=0.5, dampening=0.5)
    np.testing.assert_allclose(got, [-1.0, -2.0, -3.0], rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_constant_gradient_by_hand(dtype):
    # A constant gradient g makes the bias corrections exact: m̂_t = g and v̂_t = g², so
    # every step moves θ by γ g / (|g| + ε).
    g, lr, eps = np.array([0.5, -2.0], dtype=dtype), 0.1, 1e-8
    got = run(Adam, np.zeros(2, dtype=dtype), [g] * 3, lr=lr, eps=eps)
    step = lr * g.astype(np.float64) / (np.abs(g) + eps)
    want = [-t * step for t in (1, 2, 3)]
    assert_steps_match(got, want, np.dtype(dtype))


def test_adamw_constant_gradient_by_hand():
    # Decoupled decay, then the Adam step (γ g/(|g|+ε) for a constant g):
    # θ_t = θ_{t−1} (1 − γλ) − γ g / (|g| + ε); θ0 = 1, g = 0.5, γ = 0.1, λ = 0.5:
    # θ1 = 0.95 − 0.1·s, θ2 = θ1·0.95 − 0.1·s, θ3 = θ2·0.95 − 0.1·s with s = 0.5/(0.5 + 1e-8)
    s = 0.5 / (0.5 + 1e-8)
    t1 = 0.95 - 0.1 * s
    t2 = t1 * 0.95 - 0.1 * s
    t3 = t2 * 0.95 - 0.1 * s
    got = run(AdamW, np.array(1.0), [np.array(0.5)] * 3, lr=0.1, weight_decay=0.5)
    np.testing.assert_allclose(got, [t1, t2, t3], rtol=1e-14)


def test_adam_weight_decay_is_l2_and_adamw_is_not():
    # Same λ: Adam feeds λθ through the moments, AdamW decays θ outside them.
    theta0, grads = np.array([1.0, -1.0]), [np.array([0.3, 0.3])] * 3
    adam = run(Adam, theta0, grads, lr=0.1, weight_decay=0.5)
    adamw = run(AdamW, theta0, grads, lr=0.1, weight_decay=0.5)
    assert not np.allclose(adam[-1], adamw[-1])
    np.testing.assert_allclose(
        adam[-1], adam_reference(theta0, grads, 0.1, (0.9, 0.999), 1e-8, 0.5, False)[-1], rtol=1e-12
    )


# ---------------------------------------------------------------- against torch.optim


def _torch_cases():
    return [
        (SGD, "SGD", {"lr": 0.1}),
        (SGD, "SGD", {"lr": 0.1, "momentum": 0.9}),
        (SGD, "SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}),
        (SGD, "SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
        (Adam, "Adam", {"lr": 0.1}),
        (Adam, "Adam", {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
        (AdamW, "AdamW", {"lr": 0.1}),
        (AdamW, "AdamW", {"lr": 0.05, "betas": (0.5, 0.9), "weight_decay": 0.3}),
    ]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("cls", "torch_name", "hyper"), _torch_cases())
def test_against_torch_optim(cls, torch_name, hyper, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    theta0 = [rng.standard_normal((3, 4)).astype(dtype), rng.standard_normal(4).astype(dtype)]
    grads = [[rng.standard_normal(t.shape).astype(dtype) for t in theta0] for _ in range(3)]
    grads[0][1] = None  # the second parameter has no gradient at step 1: skipped by both

    ours = [Param(t.copy()) for t in theta0]
    theirs = [torch.tensor(t.copy(), requires_grad=True) for t in theta0]
    opt = cls(ours, **hyper)
    topt = getattr(torch.optim, torch_name)(theirs, **hyper)
    for step_grads in grads:
        for p, tp, g in zip(ours, theirs, step_grads, strict=True):
            p.grad = None if g is None else g.copy()
            tp.grad = None if g is None else torch.tensor(g.copy())
        opt.step()
        topt.step()
        tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == np.float64 else {"rtol": 1e-6, "atol": 1e-6}
        for p, tp in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(p.data, tp.detach().numpy(), **tol)
    # the buffers agree too, so a state dict means the same thing in both
    tstate = topt.state_dict()["state"]
    sd = opt.state_dict()
    for i in range(2):
        for buf, value in tstate.get(i, {}).items():
            if value is None:  # torch's SGD without momentum keeps momentum_buffer = None
                assert f"state.{i}.{buf}" not in sd
            elif buf == "step":
                assert int(sd[f"state.{i}.step"]) == int(value)
            else:
                np.testing.assert_allclose(sd[f"state.{i}.{buf}"], value.numpy(), **tol)


def test_clip_grad_norm_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal((4, 5)), rng.standard_normal(5)]
    ours = [Param(np.zeros_like(g), grad=g.copy()) for g in grads]
    theirs = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for t, g in zip(theirs, grads, strict=True):
        t.grad = torch.tensor(g.copy())
    total = clip_grad_norm_(ours, 1.5)
    ttotal = torch.nn.utils.clip_grad_norm_(theirs, 1.5)
    assert total == pytest.approx(float(ttotal), rel=1e-14)
    for p, t in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-14)


def test_schedules_against_torch():
    torch = pytest.importorskip("torch")

    def torch_lrs(make_scheduler, n):
        tparam = torch.zeros(1, requires_grad=True)
        topt = torch.optim.SGD([tparam], lr=0.4)
        sched = make_scheduler(topt)
        lrs = [topt.param_groups[0]["lr"]]
        for _ in range(n):
            topt.step()
            sched.step()
            lrs.append(topt.param_groups[0]["lr"])
        return lrs

    cos = CosineAnnealing(SGD([Param(0.0)], lr=0.4), total_steps=10, eta_min=0.01)
    want = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10, eta_min=0.01), 10)
    np.testing.assert_allclose([cos.lr_at(t) for t in range(11)], want, rtol=1e-12)
    # LinearLR from 1/W to 1 over W − 1 updates is our warm-up: factor (t + 1)/W
    warm = LinearWarmup(SGD([Param(0.0)], lr=0.4), warmup_steps=5)
    want = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1 / 5, 1.0, total_iters=4), 8)
    np.testing.assert_allclose([warm.lr_at(t) for t in range(9)], want, rtol=1e-12)


# ---------------------------------------------------------------- what is and is not updated


@pytest.mark.parametrize(
    ("cls", "hyper"),
    [(SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
     (Adam, {"weight_decay": 0.1}), (AdamW, {"weight_decay": 0.1})],
)
def test_frozen_parameters_are_untouched_bit_for_bit(cls, hyper):
    rng = np.random.default_rng(0)
    frozen = Param(rng.standard_normal((3, 3)).astype(np.float32), trainable=False)
    live = Param(rng.standard_normal(3).astype(np.float32))
    before, live_before = frozen.data.copy(), live.data.copy()
    data_object = frozen.data
    opt = cls([("base.weight", frozen), ("lora_A.weight", live)], **hyper)
    for _ in range(3):
        frozen.grad = np.ones((3, 3), np.float32)  # even a stray gradient is ignored
        live.grad = np.ones(3, np.float32)
        opt.step()
    assert frozen.data is data_object
    assert frozen.data.tobytes() == before.tobytes()
    assert opt.state["base.weight"] == {}
    assert not np.array_equal(live.data, live_before)


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_parameters_without_a_gradient_are_skipped(cls):
    a, b = Param(np.ones(2)), Param(np.ones(2))
    hyper = {"lr": 0.1, "momentum": 0.9} if cls is SGD else {"lr": 0.1}
    opt = cls([a, b], **hyper)
    a.grad = np.array([1.0, -1.0])
    opt.step()
    opt.step()
    assert np.array_equal(b.data, np.ones(2)) and opt.state["1"] == {}
    # b's first update, two optimizer steps late, is a first step: fresh buffers, its own t = 1
    g = np.array([0.5, 2.0])
    b.grad = g.copy()
    opt.step()
    if cls is SGD:  # a first momentum step: the buffer is the gradient itself
        want = sgd_reference(np.ones(2), [g], lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)
    else:
        want = adam_reference(np.ones(2), [g], lr=0.1, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=1e-2 if cls is AdamW else 0.0, decoupled=cls is AdamW)  # fmt: skip
    np.testing.assert_allclose(b.data, want[0], rtol=1e-14)
    assert opt.step_count == 3
    steps = {name: state.get("step") for name, state in opt.state.items()}
    assert steps == ({"0": None, "1": None} if cls is SGD else {"0": 3, "1": 1})


def test_gradient_is_not_modified_and_data_is_updated_in_place():
    p = Param(np.ones(3, np.float32))
    g = np.full(3, 0.5, np.float32)
    p.grad = g
    data_object = p.data
    for opt in (SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1), Adam([p], weight_decay=0.1),
                AdamW([p])):
        opt.step()
        opt.step()
    assert np.array_equal(g, np.full(3, 0.5, np.float32))
    assert p.data is data_object and p.data.dtype == np.float32


@given(FLOAT_DTYPES)
def test_state_buffers_have_the_parameters_dtype(dtype):
    p = Param(np.ones((2, 2), dtype))
    sgd, adam = SGD([p], lr=0.1, momentum=0.9), Adam([p])
    p.grad = np.ones((2, 2), np.float64)  # a float64 gradient is cast to the parameter's dtype
    sgd.step()
    adam.step()
    assert p.data.dtype == dtype
    assert sgd.state["0"]["momentum_buffer"].dtype == dtype
    assert adam.state["0"]["exp_avg"].dtype == dtype and adam.state["0"]["exp_avg_sq"].dtype == dtype


def test_zero_grad_and_settable_lr():
    p, q = Param(np.zeros(2), grad=np.ones(2)), Param(np.zeros(2), grad=np.ones(2))
    opt = SGD([p, q], lr=0.1)
    opt.lr = 0.5  # what a schedule does
    opt.step()
    np.testing.assert_array_equal(p.data, [-0.5, -0.5])
    opt.zero_grad()
    assert p.grad is None and q.grad is None
    opt.step()  # nothing to do
    np.testing.assert_array_equal(p.data, [-0.5, -0.5])


def test_accepts_named_parameters_of_a_real_model():
    from lowrank import nn  # the package itself: an import error must fail here, not skip
    lin = nn.Linear(3, 2, random_state=0)
    model = nn.LoRALinear(lin, r=1, alpha=1, random_state=0)
    base = {name: p.data.copy() for name, p in model.named_parameters()}
    opt = AdamW(model.named_parameters(), lr=0.1)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    for _ in range(2):
        opt.zero_grad()
        model(x)
        model.backward(np.ones((4, 2), np.float32))
        opt.step()
    after = dict(model.named_parameters())
    for name in base:
        changed = not np.array_equal(after[name].data, base[name])
        assert changed == after[name].trainable, name
    assert "state.lora_A.weight.exp_avg" in opt.state_dict()
    assert "state.weight.exp_avg" not in opt.state_dict()


# ---------------------------------------------------------------- checkpoints


def _two_params():
    rng = np.random.default_rng(1)
    return [("0.weight", Param(rng.standard_normal((3, 2)).astype(np.float32))),
            ("0.bias", Param(rng.standard_normal(3)))]


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(3)]


@pytest.mark.parametrize(
    ("cls", "hyper"),
    [(SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
     (Adam, {"lr": 0.01, "weight_decay": 0.01}), (AdamW, {"lr": 0.01})],
)
def test_state_dict_round_trip_through_npz_gives_identical_steps(cls, hyper, tmp_path):
    params = _two_params()
    opt = cls(params, **hyper)
    for step in range(2):
        for (_, p), g in zip(params, _grads(step), strict=True):
            p.grad = g
        opt.step()
    sd = opt.state_dict()
    for key, value in sd.items():
        assert isinstance(value, np.ndarray) and value.dtype.kind in "biuf", key
    np.savez(tmp_path / "opt.npz", **sd)
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as f:
        loaded = dict(f)

    # a fresh optimizer, built with other hyper-parameters, over copies of the parameters
    copies = [(name, Param(p.data.copy())) for name, p in params]
    resumed = cls(copies, lr=123.0)
    resumed.load_state_dict(loaded)
    assert resumed.hyper == opt.hyper and resumed.step_count == 2
    for step in (2, 3):
        for (_, p), (_, q), g in zip(params, copies, _grads(step), strict=True):
            p.grad, q.grad = g, g.copy()
        opt.step()
        resumed.step()
    for (_, p), (_, q) in zip(params, copies, strict=True):
        assert p.data.tobytes() == q.data.tobytes()


def test_state_dict_is_a_snapshot():
    params = _two_params()
    opt = Adam(params)
    for (_, p), g in zip(params, _grads(0), strict=True):
        p.grad = g
    opt.step()
    sd = opt.state_dict()
    m = sd["state.0.weight.exp_avg"].copy()
    opt.step()
    assert np.array_equal(sd["state.0.weight.exp_avg"], m)
    assert int(sd["step"]) == 1 and int(sd["state.0.weight.step"]) == 1
    assert sd["state.0.weight.exp_avg"].dtype == np.float32
    assert sd["state.0.bias.exp_avg"].dtype == np.float64


def _adam_state_dict():
    params = _two_params()
    opt = Adam(params)
    for (_, p), g in zip(params, _grads(0), strict=True):
        p.grad = g
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda sd: sd.pop("beta1"), r"missing the keys \['beta1'\]"),
        (lambda sd: sd.pop("step"), r"missing the keys \['step'\]"),
        (lambda sd: sd.update(momentum=np.asarray(0.9)), "unknown key 'momentum'"),
        (lambda sd: sd.update({"state.1.weight.exp_avg": np.zeros((3, 2), np.float32)}),
         "'1.weight', which is not one of the parameters"),
        (lambda sd: sd.update({"state.0.bias.momentum_buffer": np.zeros(3)}),
         "unknown buffer 'momentum_buffer'"),
        (lambda sd: sd.update({"state.0.weight.exp_avg": np.zeros((2, 3), np.float32)}),
         r"state_dict\['state.0.weight.exp_avg'\] must have its parameter's shape \(3, 2\), got shape \(2, 3\)"),
        (lambda sd: sd.update(lr=np.array([0.1, 0.2])), r"state_dict\['lr'\] must be a single number"),
        (lambda sd: sd.update(lr=np.asarray(-1.0)), r"lr must be in \[0, inf\), got -1.0"),
        (lambda sd: sd.update(beta2=np.asarray(1.0)), r"betas\[1\] must be in \[0, 1\), got 1.0"),
        (lambda sd: sd.update(step=np.asarray(-1)), r"state_dict\['step'\] must be in"),
        (lambda sd: sd.update({"state.0.bias.step": np.asarray(0)}), r"state_dict\['state.0.bias.step'\]"),
    ],
)
def test_load_state_dict_refuses_bad_snapshots_and_changes_nothing(edit, match):
    params = _two_params()
    opt = Adam(params)
    before = opt.state_dict()
    sd = _adam_state_dict()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_load_state_dict_refuses_a_buffer_of_another_dtype_with_type_error(dtype):
    """A dtype mismatch is a TypeError, as in Module.load_state_dict: never a silent cast."""
    params = _two_params()
    opt = Adam(params)
    before = opt.state_dict()
    sd = _adam_state_dict()
    sd["state.0.weight.exp_avg"] = sd["state.0.weight.exp_avg"].astype(dtype)
    with pytest.raises(TypeError, match=r"state_dict\['state.0.weight.exp_avg'\] must have its parameter's "
                                        rf"dtype float32, got dtype {np.dtype(dtype)}$"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_load_state_dict_of_another_optimizer_is_refused():
    with pytest.raises(ValueError, match="missing the keys"):
        SGD(_two_params(), lr=0.1).load_state_dict(_adam_state_dict())


# ---------------------------------------------------------------- schedules


def _lrs(schedule, n):
    """The rate of each of n updates, as the optimizer sees it."""
    lrs = []
    for _ in range(n):
        lrs.append(schedule.optimizer.lr)
        schedule.step()
    return lrs


def test_constant_schedule():
    opt = SGD([Param(0.0)], lr=0.3)
    assert _lrs(ConstantLR(opt), 4) == [0.3] * 4


def test_linear_warmup_closed_form():
    opt = SGD([Param(0.0)], lr=0.8)
    # update u = 1, 2, 3, 4 uses 0.8·u/4, then 0.8
    np.testing.assert_allclose(_lrs(LinearWarmup(opt, warmup_steps=4), 6),
                               [0.2, 0.4, 0.6, 0.8, 0.8, 0.8], rtol=1e-15)


@given(st.integers(1, 30), st.floats(0.0, 0.05), st.floats(0.1, 1.0))
def test_cosine_closed_form(total, eta_min, base):
    sched = CosineAnnealing(SGD([Param(0.0)], lr=base), total_steps=total, eta_min=eta_min)
    lrs = _lrs(sched, total + 3)
    want = [eta_min + (base - eta_min) * (1 + math.cos(math.pi * min(t, total) / total)) / 2
            for t in range(total + 3)]
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=1e-15)
    assert lrs[0] == pytest.approx(base) and lrs[-1] == pytest.approx(eta_min)
    assert all(a >= b - 1e-15 for a, b in itertools.pairwise(lrs))  # never increases


def test_warmup_cosine_closed_form():
    sched = WarmupCosine(SGD([Param(0.0)], lr=1.0), warmup_steps=2, total_steps=6)
    # warm-up 1/2, 2/2; then cos over 4 updates: (1 + cos(π k/4))/2 for k = 0..4, then flat
    c = [(1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    np.testing.assert_allclose(_lrs(sched, 8), [0.5, 1.0, *c, 0.0], rtol=1e-12, atol=1e-15)


def test_lr_at_is_pure_and_construction_sets_the_first_rate():
    opt = SGD([Param(0.0)], lr=1.0)
    sched = LinearWarmup(opt, warmup_steps=10)
    assert opt.lr == pytest.approx(0.1)
    assert sched.lr_at(4) == pytest.approx(0.5) and sched.lr_at(4) == sched.lr_at(4)
    assert sched.last_step == 0 and opt.lr == pytest.approx(0.1) and sched.base_lr == 1.0


@pytest.mark.parametrize(
    "make",
    [lambda o: ConstantLR(o), lambda o: LinearWarmup(o, 3),
     lambda o: CosineAnnealing(o, 7, eta_min=0.01), lambda o: WarmupCosine(o, 2, 7, eta_min=0.01)],
)
def test_schedule_state_dict_resumes_the_same_rates(make, tmp_path):
    full = make(SGD([Param(0.0)], lr=0.5))
    want = _lrs(full, 9)
    first = make(SGD([Param(0.0)], lr=0.5))
    head = _lrs(first, 4)
    np.savez(tmp_path / "s.npz", **first.state_dict())
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        sd = dict(f)
    # resume in an optimizer whose lr is whatever the new run starts with
    second = make(SGD([Param(0.0)], lr=0.5))
    second.load_state_dict(sd)
    assert head + _lrs(second, 5) == want


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda o: LinearWarmup(o, 0), ValueError, r"warmup_steps must be in \[1, inf\], got 0"),
        (lambda o: LinearWarmup(o, 2.5), TypeError, "warmup_steps must be an integer"),
        (lambda o: CosineAnnealing(o, 0), ValueError, r"total_steps must be in \[1, inf\], got 0"),
        (lambda o: CosineAnnealing(o, 5, eta_min=-0.1), ValueError, r"eta_min must be in \[0, inf\)"),
        (lambda o: WarmupCosine(o, 5, 5), ValueError,
         r"total_steps must be in \[warmup_steps \+ 1, inf\) = \[6, inf\], got 5"),
        (lambda o: ConstantLR(object()), TypeError, "optimizer must have a settable .lr"),
        (lambda o: ConstantLR(o).lr_at(-1), ValueError, r"step must be in \[0, inf\], got -1"),
        (lambda o: ConstantLR(o).load_state_dict({"base_lr": 1.0}), ValueError,
         r"must have exactly the keys \['base_lr', 'last_step'\]"),
        (lambda o: LinearWarmup(o, 2).load_state_dict(
            {"base_lr": 1.0, "last_step": 0, "warmup_steps": 0}), ValueError, "warmup_steps must be"),
    ],
)
def test_schedule_validation(make, error, match):
    with pytest.raises(error, match=match):
        make(SGD([Param(0.0)], lr=0.1))


def test_failed_schedule_load_changes_nothing():
    sched = LinearWarmup(SGD([Param(0.0)], lr=0.1), 4)
    sched.step()
    with pytest.raises(ValueError):
        sched.load_state_dict({"base_lr": 9.0, "last_step": 3, "warmup_steps": 0})
    assert (sched.base_lr, sched.last_step, sched.warmup_steps) == (0.1, 1, 4)


# ---------------------------------------------------------------- clipping


@given(optimizer_problems(n_steps=3), st.floats(0.05, 5.0))
def test_clip_grad_norm_against_numpy(problem, max_norm):
    _, grads = problem
    params = [Param(np.zeros_like(g), grad=g.copy()) for g in grads]
    total = np.linalg.norm(np.concatenate([g.astype(np.float64).ravel() for g in grads]))
    got = clip_grad_norm_(params, max_norm)
    dtype = np.result_type(*grads)
    assert got.dtype == dtype  # PyTorch returns the norm in the gradients' dtype
    assert got == pytest.approx(total, rel=1e-6 if dtype == np.float32 else 1e-12)
    scale = max_norm / (total + 1e-6)
    for p, g in zip(params, grads, strict=True):
        assert p.grad.dtype == g.dtype
        if scale < 1:
            np.testing.assert_allclose(p.grad, g * scale, rtol=1e-6 if g.dtype == np.float32 else 1e-14)
        else:
            assert p.grad.tobytes() == g.tobytes()  # untouched, not multiplied by 1
    if scale < 1:
        clipped = np.linalg.norm(np.concatenate([p.grad.astype(np.float64).ravel() for p in params]))
        assert clipped == pytest.approx(max_norm, rel=1e-4)  # 1e-6 / total off, total > 0.05


def test_clip_grad_norm_skips_frozen_and_gradless_parameters():
    frozen = Param(np.zeros(2), trainable=False, grad=np.array([100.0, 100.0]))
    gradless = Param(np.zeros(2))
    live = Param(np.zeros(2), grad=np.array([3.0, 4.0]))
    assert clip_grad_norm_([("a", frozen), ("b", gradless), ("c", live)], 1.0) == 5.0
    np.testing.assert_array_equal(frozen.grad, [100.0, 100.0])
    assert gradless.grad is None
    np.testing.assert_allclose(live.grad, np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-15)


def test_clip_grad_norm_of_a_module_clips_its_trainable_parameters():
    from lowrank import nn

    model = nn.Sequential(nn.Linear(3, 2, dtype=np.float64, random_state=0), nn.ReLU(),
                          nn.Linear(2, 2, dtype=np.float64, random_state=1))
    model[0].bias.trainable = False
    grads = {name: np.full(p.shape, 2.0) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = grads[name].copy()
    live = [name for name, p in model.named_parameters() if p.trainable]
    total = math.sqrt(sum(4.0 * grads[name].size for name in live))  # by hand: every entry is 2
    assert clip_grad_norm_(model, 1.0) == pytest.approx(total, rel=1e-15)
    params = dict(model.named_parameters())
    for name in live:
        np.testing.assert_allclose(params[name].grad, grads[name] / (total + 1e-6), rtol=1e-15)
    np.testing.assert_array_equal(params["0.bias"].grad, grads["0.bias"])  # frozen: untouched


@given(optimizer_problems(n_steps=3), st.floats(0.05, 5.0))
def test_clip_grads_core_matches_the_numpy_norm_without_the_checks(problem, max_norm):
    """The unchecked core: a plain list of Parameters; same rule as clip_grad_norm_."""
    _, grads = problem
    params = [Param(np.zeros_like(g), grad=g.copy()) for g in grads]
    total = np.linalg.norm(np.concatenate([g.astype(np.float64).ravel() for g in grads]))
    rel = 1e-6 if np.result_type(*grads) == np.float32 else 1e-12
    assert clip_grads_(params, max_norm) == pytest.approx(total, rel=rel)
    scale = min(1.0, max_norm / (total + 1e-6))
    for p, g in zip(params, grads, strict=True):
        # the reference is computed in float64; a clipped float32 entry may land among the subnormals
        np.testing.assert_allclose(p.grad, g.astype(np.float64) * scale, rtol=1e-6 if g.dtype == np.float32 else 1e-14,
                                   atol=np.finfo(g.dtype).smallest_normal)


def test_clip_grad_norm_scales_by_a_non_finite_norm_as_pytorch_does():
    """An inf total gives coef = 0 (finite entries 0, inf ones NaN); a NaN total, NaN everywhere."""
    p = Param(np.zeros(2), grad=np.array([np.inf, 1.0]))
    assert clip_grad_norm_([p], 1.0) == np.inf
    np.testing.assert_array_equal(p.grad, [np.nan, 0.0])
    q = Param(np.zeros(2), grad=np.array([np.nan, 1.0]))
    assert np.isnan(clip_grad_norm_([q], 1.0))
    assert np.isnan(q.grad).all()


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_clip_grad_norm_error_if_nonfinite_raises_before_anything_changes(bad):
    g = np.array([bad, 1.0])
    p = Param(np.zeros(2), grad=g.copy())
    with pytest.raises(NonFiniteNormError, match=r"total norm of order 2\.0 of the gradients must be finite"):
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    np.testing.assert_array_equal(p.grad, g)
    assert issubclass(NonFiniteNormError, RuntimeError) and issubclass(NonFiniteNormError, FloatingPointError)


@pytest.mark.parametrize(("norm_type", "total"), [
    (1.0, 3 + 4 + 12.0), (2.0, 13.0), (math.inf, 12.0), ("inf", 12.0),
    (3.0, (27 + 64 + 1728) ** (1 / 3)),
])
def test_clip_grad_norm_norm_types_by_hand(norm_type, total):
    a, b = Param(np.zeros(2), grad=np.array([3.0, -4.0])), Param(np.zeros(1), grad=np.array([12.0]))
    assert clip_grad_norm_([a, b], 1.0, norm_type=norm_type) == pytest.approx(total, rel=1e-15)
    np.testing.assert_allclose(a.grad, np.array([3.0, -4.0]) / (total + 1e-6), rtol=1e-15)


def test_clip_grad_norm_returns_the_gradients_dtype_and_float32_zero_without_gradients():
    p = Param(np.zeros(2, dtype=np.float32), grad=np.array([3.0, 4.0], dtype=np.float32))
    got = clip_grad_norm_([p], 10.0)
    assert got.dtype == np.float32 and got == np.float32(5.0)
    empty = clip_grad_norm_([Param(np.zeros(2))], 1.0)
    assert empty.dtype == np.float32 and empty == 0.0  # torch.tensor(0.0)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda ps: SGD(ps, lr=-0.1), ValueError, r"lr must be in \[0, inf\), got -0.1"),
        (lambda ps: SGD(ps, lr="0.1"), TypeError, "lr must be a real number"),
        (lambda ps: SGD(ps, lr=float("nan")), ValueError, r"lr must be in \[0, inf\), got nan"),
        (lambda ps: SGD(ps, lr=0.1, momentum=-0.5), ValueError, r"momentum must be in \[0, inf\), got -0.5"),
        (lambda ps: SGD(ps, lr=0.1, dampening=1.5), ValueError, r"dampening must be in \[0, 1\], got 1.5"),
        (lambda ps: SGD(ps, lr=0.1, weight_decay=-1), ValueError, r"weight_decay must be in \[0, inf\)"),
        (lambda ps: SGD(ps, lr=0.1, nesterov=True), ValueError,
         "nesterov=True requires momentum > 0 and dampening == 0, got momentum=0.0"),
        (lambda ps: SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
         "dampening=0.1"),
        (lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=1), TypeError, "nesterov must be True or False"),
        (lambda ps: Adam(ps, lr=-1e-3), ValueError, r"lr must be in \[0, inf\), got -0.001"),
        (lambda ps: Adam(ps, betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
        (lambda ps: Adam(ps, betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be in \[0, 1\), got -0.1"),
        (lambda ps: AdamW(ps, betas=(0.9, 1.5)), ValueError, r"betas\[1\] must be in \[0, 1\), got 1.5"),
        (lambda ps: Adam(ps, betas=(0.9,)), ValueError, r"betas must be a pair \(beta1, beta2\), got 1 values"),
        (lambda ps: Adam(ps, betas=0.9), TypeError, "betas must be a pair"),
        (lambda ps: Adam(ps, eps=0.0), ValueError, r"eps must be in \(0, inf\), got 0.0"),
        (lambda ps: AdamW(ps, eps=-1e-8), ValueError, r"eps must be in \(0, inf\), got -1e-08"),
        (lambda ps: Adam(ps, weight_decay=-0.1), ValueError, r"weight_decay must be in \[0, inf\), got -0.1"),
        (lambda ps: AdamW(ps, weight_decay=-0.1), ValueError, r"weight_decay must be in \[0, inf\), got -0.1"),
    ],
)
def test_bad_hyper_parameters(make, error, match):
    with pytest.raises(error, match=match):
        make([Param(np.zeros(2))])


def test_lr_setter_validates():
    opt = Adam([Param(np.zeros(2))])
    with pytest.raises(ValueError, match=r"lr must be in \[0, inf\), got -1.0"):
        opt.lr = -1.0
    assert opt.lr == 1e-3


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ([], ValueError, "params must hold at least one parameter, got an empty params"),
        (iter([]), ValueError, "params must hold at least one parameter"),
        (Param(np.zeros(2)), TypeError, "got a single Param"),
        (np.zeros(3), TypeError, "got a single ndarray"),
        (3, TypeError, r"params must be an iterable of Parameters or of \(name, Parameter\) pairs, got int"),
        ([np.zeros(2)], TypeError, "params must hold Parameters .* got ndarray for '0'"),
        ([("a", Param(0.0)), Param(0.0)], TypeError, "not a mix"),
        ([("a", Param(0.0)), ("a", Param(0.0))], ValueError, "unique names, got 'a' twice"),
        ("abc", TypeError, "got a single str"),
    ],
)
def test_bad_params(params, error, match):
    with pytest.raises(error, match=match):
        SGD(params, lr=0.1)
    with pytest.raises(error, match=match):
        clip_grad_norm_(params, 1.0)


def test_the_same_parameter_twice_is_refused():
    p = Param(np.zeros(2))
    with pytest.raises(ValueError, match="same Parameter twice, got it again as 'b'"):
        Adam([("a", p), ("b", p)])


def test_a_mapping_of_parameters_is_accepted():
    p = Param(np.zeros(2), grad=np.ones(2))
    opt = SGD({"w": p}, lr=0.5)
    opt.step()
    np.testing.assert_array_equal(p.data, [-0.5, -0.5])
    assert [name for name, _ in opt.named_params] == ["w"]


def test_gradient_of_the_wrong_shape_is_refused_before_anything_changes():
    first = Param(np.zeros(2), grad=np.ones(2))
    p = Param(np.zeros((2, 3)), grad=np.ones(3))
    with pytest.raises(ValueError, match=r"gradient of '1' must have its parameter's shape \(2, 3\), got \(3,\)"):
        SGD([first, p], lr=0.1).step()
    assert np.array_equal(p.data, np.zeros((2, 3))) and np.array_equal(first.data, np.zeros(2))


@pytest.mark.parametrize(
    ("max_norm", "error", "match"),
    [(0.0, ValueError, r"max_norm must be in \(0, inf\), got 0.0"),
     (-1.0, ValueError, r"max_norm must be in \(0, inf\), got -1.0"),
     (float("inf"), ValueError, r"max_norm must be in \(0, inf\), got inf"),
     (None, TypeError, "max_norm must be a real number")],
)
def test_clip_grad_norm_validation(max_norm, error, match):
    p = Param(np.zeros(2), grad=np.ones(2))
    with pytest.raises(error, match=match):
        clip_grad_norm_([p], max_norm)
    np.testing.assert_array_equal(p.grad, np.ones(2))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"norm_type": 0.0}, ValueError, r"norm_type must be in \(0, inf\], got 0.0"),
     ({"norm_type": -np.inf}, ValueError, r"norm_type must be in \(0, inf\], got -inf"),
     ({"norm_type": np.nan}, ValueError, r"norm_type must be in \(0, inf\], got nan"),
     ({"norm_type": "fro"}, TypeError, "norm_type must be a real number or 'inf'"),
     ({"error_if_nonfinite": 1}, TypeError, "error_if_nonfinite must be")],
)
def test_clip_grad_norm_validation_of_norm_type_and_error_flag(kwargs, error, match):
    p = Param(np.zeros(2), grad=np.ones(2))
    with pytest.raises(error, match=match):
        clip_grad_norm_([p], 1.0, **kwargs)
    np.testing.assert_array_equal(p.grad, np.ones(2))
