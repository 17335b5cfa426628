"""Gradient accumulation: ``fit(..., accumulate=K)`` takes the whole batch's step, to rounding.

The oracle is written out by hand: for a ``Linear`` layer under the mean
squared error, the batch gradient is ``dW = 2/(n·out) · (X Wᵀ + b − Y)ᵀ X``
and ``db = 2/(n·out) · Σ_rows (X Wᵀ + b − Y)``; SGD, Adam and clipping are
their published formulas. Hypothesis draws the data, the weights, the batch
size and K; the run must match the hand-computed full-batch trajectory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import float_arrays

from lowrank import nn
from lowrank.nn.optim import SGD, Adam
from lowrank.train.fit import fit

IN, OUT = 3, 2


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 6))
    n = batch * draw(st.integers(1, 3)) - draw(st.integers(0, batch - 1))  # a short last batch too
    n = max(n, 1)
    X = draw(float_arrays(np.float64, (n, IN), bound=2.0))
    Y = draw(float_arrays(np.float64, (n, OUT), bound=2.0))
    W = draw(float_arrays(np.float64, (OUT, IN), bound=1.0))
    b = draw(float_arrays(np.float64, (OUT,), bound=1.0))
    k = draw(st.integers(1, batch))
    return X, Y, W, b, batch, k


def hand_gradient(X, Y, W, b):
    """The mean squared error's gradient for a whole batch, by hand."""
    r = X @ W.T + b - Y  # (n, out)
    c = 2.0 / r.size
    return c * r.T @ X, c * r.sum(axis=0)


def hand_clip(gW, gb, max_norm):
    total = math.sqrt(np.sum(gW * gW) + np.sum(gb * gb))
    scale = min(max_norm / (total + 1e-6), 1.0)
    return gW * scale, gb * scale


def hand_run(X, Y, W, b, batch, step, clip=None):
    """One epoch in order, one ``step(params, grads)`` per batch of ``batch`` rows."""
    W, b = W.copy(), b.copy()
    for lo in range(0, X.shape[0], batch):
        gW, gb = hand_gradient(X[lo:lo + batch], Y[lo:lo + batch], W, b)
        if clip is not None:
            gW, gb = hand_clip(gW, gb, clip)
        W, b = step(W, gW, "w"), step(b, gb, "b")
    return W, b


def sgd(lr):
    return lambda theta, g, _: theta - lr * g


def adam(lr, beta1=0.9, beta2=0.999, eps=1e-8):
    state = {}

    def step(theta, g, key):
        m, v, t = state.get(key, (0.0, 0.0, 0))
        t += 1
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        state[key] = (m, v, t)
        return theta - lr * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps)

    return step


def run_fit(X, Y, W, b, batch, k, make_opt, clip=None):
    layer = nn.Linear(IN, OUT, dtype=np.float64, random_state=0)
    layer.weight.data[...] = W
    layer.bias.data[...] = b
    fit(layer, X, Y, loss="mse", optimizer=make_opt(layer.named_parameters()), epochs=1, batch_size=batch,
        accumulate=k, clip_grad_norm=clip, shuffle=False, verbose=False)
    return layer.weight.data, layer.bias.data


@pytest.mark.parametrize("clip", [None, 0.05], ids=["plain", "clipped"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@given(problem=problems(), lr=st.floats(1e-3, 0.5))
def test_k_micro_batches_take_the_full_batch_step(problem, lr, optimizer, clip):
    X, Y, W, b, batch, k = problem
    make = (lambda p: SGD(p, lr=lr)) if optimizer == "sgd" else (lambda p: Adam(p, lr=lr))
    got_W, got_b = run_fit(X, Y, W, b, batch, k, make, clip)
    exp_W, exp_b = hand_run(X, Y, W, b, batch, sgd(lr) if optimizer == "sgd" else adam(lr), clip)
    # Adam divides by √v̂ + ε: where a gradient entry is ~0 the step amplifies rounding, so compare
    # against the step size lr as well as relatively
    np.testing.assert_allclose(got_W, exp_W, rtol=1e-9, atol=1e-9 * (1 + lr))
    np.testing.assert_allclose(got_b, exp_b, rtol=1e-9, atol=1e-9 * (1 + lr))


def test_without_the_rule_k_backward_passes_sum_to_k_times_the_gradient():
    """The trap the rule avoids: modules sum backward passes, each loss is a mean."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((6, IN)), rng.standard_normal((6, OUT))
    layer = nn.Linear(IN, OUT, dtype=np.float64, random_state=0)
    full, _ = hand_gradient(X, Y, layer.weight.data, layer.bias.data)
    for half in (slice(0, 3), slice(3, 6)):
        out = layer(X[half])
        _, dout = nn.functional.mse_loss(out, Y[half])
        layer.backward(dout)  # no n_k / n: each half's mean gradient, summed
    np.testing.assert_allclose(layer.weight.grad, 2 * full, rtol=1e-12)


def test_accumulate_reports_the_batch_loss():
    """The history's loss is the weighted sum of the micro-batch means: the batch mean."""
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((7, IN)), rng.standard_normal((7, OUT))
    layer = nn.Linear(IN, OUT, dtype=np.float64, random_state=0)
    W, b = layer.weight.data.copy(), layer.bias.data.copy()
    hist = fit(layer, X, Y, loss="mse", optimizer=SGD(layer.named_parameters(), lr=0.0), epochs=1,
               batch_size=7, accumulate=3, shuffle=False, verbose=False)
    assert hist.train_loss[0] == pytest.approx(np.mean((X @ W.T + b - Y) ** 2), rel=1e-12)


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, r"accumulate must be in \[1, batch_size\] = \[1, 4\], got 0"),
    (5, ValueError, r"accumulate must be in \[1, batch_size\] = \[1, 4\], got 5"),
    (2.0, TypeError, "accumulate must be an integer"),
])
def test_accumulate_validation(value, error, match):
    layer = nn.Linear(IN, OUT, dtype=np.float64, random_state=0)
    with pytest.raises(error, match=match):
        fit(layer, np.zeros((4, IN)), np.zeros((4, OUT)), loss="mse", optimizer=SGD(layer.named_parameters(), lr=0.1),
            epochs=1, batch_size=4, accumulate=value, verbose=False)


@st.composite
def ignored_problems(draw):
    n, classes = draw(st.integers(2, 6)), 3
    X = draw(float_arrays(np.float64, (n, IN), bound=2.0))
    W = draw(float_arrays(np.float64, (classes, IN), bound=1.0))
    target = np.array(draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)))
    ignored = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    ignored[draw(st.integers(0, n - 1))] = False  # the batch keeps one target at least
    target[ignored] = -100
    return X, W, target, draw(st.integers(1, n))


@given(problem=ignored_problems())
def test_ignored_targets_weigh_micro_batches_by_their_kept_targets(problem):
    """cross_entropy is a mean over the kept targets: the step is the batch's, even where a micro-batch keeps none."""
    X, W, target, k = problem
    layer = nn.Linear(IN, 3, bias=False, dtype=np.float64, random_state=0)
    layer.weight.data[...] = W
    fit(layer, X, target, loss="cross_entropy", optimizer=SGD(layer.named_parameters(), lr=0.5), epochs=1,
        batch_size=X.shape[0], accumulate=k, shuffle=False, verbose=False)
    z = X @ W.T  # (n, 3): the batch gradient by hand, (softmax - onehot) / n_kept on the kept rows
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    kept = target != -100
    p[kept, target[kept]] -= 1
    p[~kept] = 0
    expected = W - 0.5 * (p / kept.sum()).T @ X
    np.testing.assert_allclose(layer.weight.data, expected, rtol=1e-12, atol=1e-12)


def test_lm_micro_batches_take_the_token_mean_step_checked_by_finite_differences():
    """The "lm" loss averages the kept next-token labels: rows 0-1 keep 1 label, rows 2-3 keep 6."""
    from lowrank.reference.gradcheck import check_gradients

    model = nn.GPT2(vocab_size=7, n_positions=4, n_embd=4, n_layer=1, n_head=1,
                   embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dtype=np.float64, random_state=0)
    ids = np.random.default_rng(0).integers(0, 7, (4, 4))
    labels = ids.copy()
    labels[:2, 1:3] = -100
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.wpe.weight"]
    params = dict(model.named_parameters())
    start = {name: p.data.copy() for name, p in params.items()}
    before = {name: start[name] for name in names}
    lr = 1e-3
    fit(model, ids, labels, loss="lm", optimizer=SGD(model.named_parameters(), lr=lr), epochs=1, batch_size=4,
        accumulate=2, shuffle=False, verbose=False)
    stepped = {name: (before[name] - params[name].data) / lr for name in names}  # SGD: θ1 = θ0 - lr g
    for name, p in params.items():  # every parameter took a step: back to where the gradient was taken
        p.data = start[name].copy()
    model.eval()

    def loss_at(**arrays):
        for name, value in arrays.items():
            params[name].data = value
        return nn.lm_loss(model(ids), labels)[0]  # the whole batch's mean over its 8 kept labels

    check_gradients(loss_at, before, stepped)
