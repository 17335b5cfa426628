"""The kernels of lowrank.nn.functional.

Every gradient is compared with central differences through
``lowrank.reference.gradcheck`` (float64, relative error < 1e-6); forwards with formulas
written out here in NumPy, ``math.erf``/``math.erfc``, ``scipy.special`` and,
when installed, PyTorch autograd in float64. That a frozen base computes no
weight gradient is observed by spying on the matrix products the backward
pass actually runs.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    FLOAT_DTYPES,
    SEEDS,
    elementwise_inputs,
    linear_problems,
    lora_problems,
)

from lowrank.nn import functional as F
from lowrank.nn.functional.activations import erfc
from lowrank.reference.gradcheck import check_gradients

RTOL = 1e-6  # the bar for every kernel's gradient, in float64


def lora_inputs(problem: dict) -> dict:
    return {k: problem[k] for k in ("x", "weight", "bias", "A", "B")}


def lora_reference(x, weight, bias, A, B, scaling, dropout_mask=None):
    """The LoRA forward, written out in float64 the obvious way."""
    x, W, A, B = (np.asarray(a, np.float64) for a in (x, weight, A, B))
    xm = x if dropout_mask is None else x * dropout_mask
    y = x @ W.T + scaling * ((xm @ A.T) @ B.T)
    return y if bias is None else y + bias


# ---------------------------------------------------------------- gradients vs finite differences


@given(problem=linear_problems(), trainable=st.booleans())
def test_linear_gradients_match_finite_differences(problem, trainable):
    x, W, b, dy = problem["x"], problem["weight"], problem["bias"], problem["dy"]
    _, cache = F.linear(x, W, b)
    g = F.linear_backward(dy, cache, trainable=trainable)
    analytic = {"x": g.x}
    if trainable:
        analytic["weight"] = g.weight
        if b is not None:
            analytic["bias"] = g.bias
    assert (g.weight is None) == (not trainable)
    assert (g.bias is None) == (not trainable or b is None)

    def f(x, weight, bias):
        return np.sum(F.linear(x, weight, bias)[0] * dy)

    report = check_gradients(f, {"x": x, "weight": W, "bias": b}, analytic, rtol=RTOL)
    assert all(a.max_rel_err < RTOL for a in report.arguments.values())


@given(problem=lora_problems(), base_trainable=st.booleans())
def test_lora_linear_gradients_match_finite_differences(problem, base_trainable):
    s, mask, dy, b = problem["scaling"], problem["dropout_mask"], problem["dy"], problem["bias"]
    _, cache = F.lora_linear(**lora_inputs(problem), scaling=s, dropout_mask=mask)
    g = F.lora_linear_backward(dy, cache, base_trainable=base_trainable)
    analytic = {"x": g.x, "A": g.A, "B": g.B}
    if base_trainable:
        analytic["weight"] = g.weight
        if b is not None:
            analytic["bias"] = g.bias
    else:
        assert g.weight is None and g.bias is None

    def f(x, weight, bias, A, B):
        return np.sum(F.lora_linear(x, weight, bias, A, B, s, mask)[0] * dy)

    report = check_gradients(f, lora_inputs(problem), analytic, rtol=RTOL)
    assert set(report.arguments) == set(analytic)


ACTIVATIONS = {
    "relu": (F.relu, F.relu_backward),
    "tanh": (F.tanh, F.tanh_backward),
    "sigmoid": (F.sigmoid, F.sigmoid_backward),
    "gelu": (F.gelu, F.gelu_backward),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), F.gelu_backward),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(x=elementwise_inputs(scale=4.0, away_from_zero=0.01), seed=SEEDS)
def test_activation_gradients_match_finite_differences(name, x, seed):
    # entries kept at least 0.01 from 0, far beyond eps = 1e-6: relu's kink is never straddled
    forward, backward = ACTIVATIONS[name]
    dy = np.random.default_rng(seed).standard_normal(x.shape)
    _, cache = forward(x)

    def f(x):
        return np.sum(forward(x)[0] * dy)

    check_gradients(f, {"x": x}, {"x": backward(dy, cache)}, rtol=RTOL)


@given(x=elementwise_inputs(), p=st.floats(0.0, 0.9), seed=SEEDS)
def test_dropout_gradient_is_the_mask(x, p, seed):
    rng = np.random.default_rng(seed)
    mask = F.dropout_mask(x.shape, p, random_state=rng)
    dy = rng.standard_normal(x.shape)
    y, cache = F.dropout(x, mask)
    np.testing.assert_array_equal(y, x * mask)
    dx = F.dropout_backward(dy, cache)
    np.testing.assert_array_equal(dx, dy * mask)
    check_gradients(lambda x: np.sum(F.dropout(x, mask)[0] * dy), {"x": x}, {"x": dx}, rtol=RTOL)


@given(seed=SEEDS, shape=st.sampled_from([(3,), (4, 3), (2, 3, 4)]), scale=st.floats(0.1, 20.0))
def test_loss_gradients_match_finite_differences(seed, shape, scale):
    rng = np.random.default_rng(seed)
    pred = scale * rng.standard_normal(shape)
    cases = [
        (F.mse_loss, rng.standard_normal(shape)),
        (F.cross_entropy, rng.integers(0, shape[-1], size=shape[:-1])),
        (F.binary_cross_entropy_with_logits, rng.uniform(0.0, 1.0, shape)),
    ]
    for loss_fn, target in cases:
        loss, grad = loss_fn(pred, target)
        assert isinstance(loss, float)
        check_gradients(lambda pred, fn=loss_fn, t=target: fn(pred, t)[0], {"pred": pred}, {"pred": grad}, rtol=RTOL)


# ---------------------------------------------------------------- forwards vs independent formulas


@given(problem=lora_problems())
def test_lora_linear_forward_matches_the_formula(problem):
    y, _ = F.lora_linear(**lora_inputs(problem), scaling=problem["scaling"], dropout_mask=problem["dropout_mask"])
    expected = lora_reference(**lora_inputs(problem), scaling=problem["scaling"], dropout_mask=problem["dropout_mask"])
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@given(problem=linear_problems())
def test_linear_forward_matches_the_formula(problem):
    x, W, b = problem["x"], problem["weight"], problem["bias"]
    y, _ = F.linear(x, W, b)
    expected = np.einsum("...i,oi->...o", x, W) + (0 if b is None else b)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@given(x=elementwise_inputs(scale=8.0))
def test_gelu_matches_the_scalar_erf_formula(x):
    y, _ = F.gelu(x)
    flat = x.reshape(-1)
    # x * Φ(x) with Φ through math.erfc: accurate for every x, so a relative bound, set by
    # erfc's condition number 2 u² <= 64 (u = x / sqrt(2)) on the rounding of -x / sqrt(2)
    via_erfc = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in flat]).reshape(x.shape)
    np.testing.assert_allclose(y, via_erfc, rtol=5e-14, atol=1e-300)
    # torch's own formula x * (1 + erf(x / sqrt(2))) / 2 loses digits as Φ -> 0: absolute bound
    via_erf = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in flat]).reshape(x.shape)
    np.testing.assert_allclose(y, via_erf, rtol=0, atol=1e-14)


def test_gelu_and_its_derivative_match_50_digit_arithmetic():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    z = np.linspace(-12.0, 12.0, 481)
    y, cache = F.gelu(z)
    dy = F.gelu_backward(np.ones_like(z), cache)
    exact_y = [float(mpmath.mpf(v) * mpmath.ncdf(v)) for v in z]
    exact_dy = [float(mpmath.ncdf(v) + mpmath.mpf(v) * mpmath.npdf(v)) for v in z]
    # erfc's condition number 2 u² (u = x / sqrt(2)) is 144 at x = -12: the rounding of
    # x / sqrt(2) alone costs 144 ε there, so 5e-14, not 1e-15
    np.testing.assert_allclose(y, exact_y, rtol=5e-14, atol=1e-300)
    np.testing.assert_allclose(dy, exact_dy, rtol=5e-14, atol=1e-16)  # atol: the root near x = -0.75


@given(x=elementwise_inputs(scale=8.0))
def test_gelu_tanh_matches_the_scalar_formula(x):
    y, _ = F.gelu(x, approximate="tanh")
    c = math.sqrt(2 / math.pi)
    expected = [0.5 * v * (1 + math.tanh(c * (v + 0.044715 * v**3))) for v in x.reshape(-1)]
    # 1 + tanh(u) cancels for negative x in both: an absolute bound there
    np.testing.assert_allclose(y.reshape(-1), expected, rtol=1e-13, atol=1e-14)


def test_erfc_matches_math_erfc_everywhere():
    z = np.concatenate([
        np.linspace(-30.0, 30.0, 60001),
        [0.0, -0.0, 5e-324, 1e-20, 0.46875, -0.46875, 4.0, -4.0, 26.543, -26.543, 1e300, -1e300],
    ])  # fmt: skip
    got = erfc(z)
    expected = np.array([math.erfc(v) for v in z])
    np.testing.assert_allclose(got, expected, rtol=2e-15, atol=1e-300)
    np.testing.assert_array_equal(erfc(np.array([np.inf, -np.inf])), [0.0, 2.0])
    assert np.isnan(erfc(np.array([np.nan]))).all()


@given(x=elementwise_inputs(scale=40.0))
def test_sigmoid_and_tanh_match_their_formulas_without_overflow(x):
    with np.errstate(over="raise"):
        y, _ = F.sigmoid(x)
    np.testing.assert_allclose(y, scipy.special.expit(x), rtol=1e-15, atol=1e-300)
    np.testing.assert_array_equal(F.tanh(x)[0], np.tanh(x))
    np.testing.assert_array_equal(F.relu(x)[0], np.where(x > 0, x, 0.0))


def test_relu_derivative_at_zero_is_zero():
    dx = F.relu_backward(np.ones(3), F.relu(np.array([-1.0, 0.0, 1.0]))[1])
    np.testing.assert_array_equal(dx, [0.0, 0.0, 1.0])


# ---------------------------------------------------------------- losses vs independent formulas


@given(seed=SEEDS, shape=st.sampled_from([(5,), (4, 3), (2, 3, 4)]), scale=st.floats(0.1, 30.0))
def test_cross_entropy_matches_scipy_log_softmax(seed, shape, scale):
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal(shape)
    target = rng.integers(0, shape[-1], size=shape[:-1])
    loss, grad = F.cross_entropy(logits, target)
    logp = scipy.special.log_softmax(logits, axis=-1)
    picked = np.take_along_axis(logp, target[..., None], axis=-1)
    assert loss == pytest.approx(-picked.mean(), rel=1e-13, abs=1e-15)
    onehot = np.eye(shape[-1])[target]
    np.testing.assert_allclose(grad, (np.exp(logp) - onehot) / target.size, rtol=1e-12, atol=1e-17)


def test_cross_entropy_is_finite_for_huge_logits():
    logits = np.array([[1e4, -1e4, 0.0], [3e5, 3e5 + 1.0, 3e5 - 2.0]])
    target = np.array([1, 0])
    loss, grad = F.cross_entropy(logits, target)
    shifted = logits - logits.max(axis=1, keepdims=True)  # the loss is shift-invariant row by row
    ref, _ = F.cross_entropy(shifted, target)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert loss == pytest.approx(ref, rel=1e-12)
    # row 0: -log softmax picks -1e4 - 1e4 = -2e4 (nats), row 1: logsumexp - (3e5 + 1 - 1) ...
    expected0 = 2e4 + math.log1p(math.exp(-1e4) + math.exp(-2e4))
    lse1 = np.log(np.sum(np.exp([-1.0, 0.0, -3.0])))
    assert loss == pytest.approx((expected0 + (lse1 + 1.0)) / 2, rel=1e-14)


@given(seed=SEEDS, scale=st.floats(0.1, 50.0))
def test_binary_cross_entropy_matches_logaddexp_form(seed, scale):
    rng = np.random.default_rng(seed)
    z = scale * rng.standard_normal((3, 4))
    t = rng.uniform(0.0, 1.0, (3, 4))
    loss, grad = F.binary_cross_entropy_with_logits(z, t)
    # -t log σ(z) - (1 - t) log(1 - σ(z)) = t log(1 + e^-z) + (1 - t) log(1 + e^z)
    expected = np.mean(t * np.logaddexp(0, -z) + (1 - t) * np.logaddexp(0, z))
    assert loss == pytest.approx(expected, rel=1e-13, abs=1e-15)
    np.testing.assert_allclose(grad, (scipy.special.expit(z) - t) / z.size, rtol=1e-13, atol=1e-18)


def test_binary_cross_entropy_is_finite_for_huge_logits():
    loss, grad = F.binary_cross_entropy_with_logits(np.array([1e4, -1e4]), np.array([0.0, 1.0]))
    assert loss == pytest.approx(1e4, rel=1e-15)
    np.testing.assert_allclose(grad, [0.5, -0.5])


@given(seed=SEEDS)
def test_mse_matches_the_formula(seed):
    rng = np.random.default_rng(seed)
    pred, target = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    loss, grad = F.mse_loss(pred, target)
    assert loss == pytest.approx(np.mean((pred - target) ** 2), rel=1e-14)
    np.testing.assert_allclose(grad, 2 * (pred - target) / pred.size, rtol=1e-15)


# ---------------------------------------------------------------- the frozen base: no dW, observed


PRODUCTS: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
_UNCOUNTED = {np.dot, np.vdot, np.inner, np.outer, np.einsum, np.tensordot, np.kron, np.linalg.multi_dot}


class Spy(np.ndarray):
    """A view that logs the operand shapes of every matrix product it takes part in.

    Results of any ufunc on a Spy are Spies again, so products of arrays
    derived from a spied one are logged too; products that bypass ``matmul``
    (``np.dot``, ``np.einsum``, ...) are refused rather than missed.
    """

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        plain = [a.view(np.ndarray) if isinstance(a, Spy) else a for a in inputs]
        if ufunc is np.matmul:
            PRODUCTS.append((plain[0].shape, plain[1].shape))
        if out is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, Spy) else o for o in out)
        result = getattr(ufunc, method)(*plain, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return result.view(Spy) if isinstance(result, np.ndarray) else result

    def __array_function__(self, func, types, args, kwargs):
        if func in _UNCOUNTED:
            raise AssertionError(f"a product through np.{func.__name__} would escape the count")
        return super().__array_function__(func, types, args, kwargs)

    def dot(self, *args, **kwargs):
        raise AssertionError("a product through ndarray.dot would escape the count")


def spied(cache):
    """The cache with every array replaced by a Spy view of it."""
    arrays = {
        f.name: getattr(cache, f.name).view(Spy)
        for f in dataclasses.fields(cache)
        if isinstance(getattr(cache, f.name), np.ndarray)
    }
    return dataclasses.replace(cache, **arrays)


def products_of(call) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The operand shapes of each matrix product ``call()`` runs."""
    PRODUCTS.clear()
    call()
    return list(PRODUCTS)


def cost(product) -> int:
    """Multiply-adds of a 2-D product ``(m, k) @ (k, n)``."""
    a, b = product
    return math.prod(a[:-1]) * a[-1] * b[-1]


def test_spy_sees_products_and_refuses_uncounted_ones():
    a = np.ones((2, 3)).view(Spy)
    assert products_of(lambda: (a.T * 2.0) @ np.ones((2, 4))) == [((3, 2), (2, 4))]
    with pytest.raises(AssertionError, match=r"np\.dot"):
        np.dot(a, np.ones(3))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n_rows", [8, 48])  # fewer rows than features, and more (folded weight)
def test_frozen_lora_base_computes_no_weight_gradient(n_rows, with_bias, with_mask):
    rng = np.random.default_rng(0)
    n_in, n_out, r = 24, 20, 2
    x, W = rng.standard_normal((n_rows, n_in)), rng.standard_normal((n_out, n_in))
    b = rng.standard_normal(n_out) if with_bias else None
    A, B = rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))
    mask = F.dropout_mask(x.shape, 0.25, random_state=1) if with_mask else None
    dy = rng.standard_normal((n_rows, n_out))
    _, cache = F.lora_linear(x, W, b, A, B, 2.0, mask)

    frozen_grads = []
    frozen = products_of(lambda: frozen_grads.append(F.lora_linear_backward(dy, spied(cache))))
    trained = products_of(lambda: F.lora_linear_backward(dy, spied(cache), base_trainable=True))
    g = frozen_grads[0]
    assert g.weight is None and g.bias is None

    big = n_rows * n_in * n_out  # one (N, in, out) product: dx = dy @ W, or dW = dy.T @ x
    low_rank = 4 * r * (n_rows * (n_in + n_out) + n_in * n_out)  # every product with r inside
    assert sum(cost(p) >= big for p in frozen) == 1  # dx only
    assert sum(cost(p) >= big for p in trained) == 2  # dx and dW
    assert sum(map(cost, frozen)) <= big + low_rank
    dW = ((n_out, n_rows), (n_rows, n_in))  # dy.T @ x: contracts the batch into an (out, in) array
    assert dW in trained and dW not in frozen


def test_frozen_linear_computes_no_weight_gradient():
    rng = np.random.default_rng(1)
    x, W, b, dy = (rng.standard_normal(s) for s in [(16, 12), (10, 12), (10,), (16, 10)])
    _, cache = F.linear(x, W, b)
    out = []
    frozen = products_of(lambda: out.append(F.linear_backward(dy, spied(cache), trainable=False)))
    assert out[0].weight is None and out[0].bias is None
    trained = products_of(lambda: F.linear_backward(dy, spied(cache), trainable=True))
    assert frozen == [((16, 10), (10, 12))]  # dx = dy @ W
    assert sorted(trained) == sorted([((16, 10), (10, 12)), ((10, 16), (16, 12))])  # and dW = dy.T @ x


# ---------------------------------------------------------------- fresh adapter, dtypes, caches


@given(problem=lora_problems(dtype=np.float32) | lora_problems(dtype=np.float64))
def test_fresh_adapter_gives_the_base_output_bit_for_bit(problem):
    x, W, b, A = problem["x"], problem["weight"], problem["bias"], problem["A"]
    zero_B = np.zeros_like(problem["B"])
    y_lora, _ = F.lora_linear(x, W, b, A, zero_B, problem["scaling"], problem["dropout_mask"])
    y_base, _ = F.linear(x, W, b)
    assert y_lora.dtype == y_base.dtype == x.dtype
    assert y_lora.shape == y_base.shape
    assert y_lora.tobytes() == y_base.tobytes()


@given(problem=lora_problems(dtype=np.float32), base_trainable=st.booleans())
def test_float32_in_gives_float32_out_and_gradients(problem, base_trainable):
    s, mask, dy = problem["scaling"], problem["dropout_mask"], problem["dy"]
    y, cache = F.lora_linear(**lora_inputs(problem), scaling=s, dropout_mask=mask)
    g = F.lora_linear_backward(dy.astype(np.float64), cache, base_trainable=base_trainable)  # dy cast
    grads = [g.x, g.A, g.B] + ([g.weight] if base_trainable else [])
    assert y.dtype == np.float32 and all(a.dtype == np.float32 for a in grads)
    ref = lora_reference(**lora_inputs(problem), scaling=s, dropout_mask=mask)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * (1 + np.abs(ref).max()))
    _, lin_cache = F.linear(problem["x"], problem["weight"], problem["bias"])
    lg = F.linear_backward(dy, lin_cache)
    assert lg.x.dtype == lg.weight.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_elementwise_kernel_and_loss_keeps_the_dtype(dtype):
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((3, 4)).astype(dtype), rng.standard_normal((3, 4)).astype(dtype)
    for forward, backward in ACTIVATIONS.values():
        y, cache = forward(x)
        assert y.dtype == dtype and backward(dy, cache).dtype == dtype
    mask = F.dropout_mask(x.shape, 0.5, random_state=0, dtype=dtype)
    assert mask.dtype == dtype
    y, cache = F.dropout(x, mask.astype(np.float64))  # the mask is cast to x's dtype
    assert y.dtype == dtype and F.dropout_backward(dy, cache).dtype == dtype
    for loss_fn, target in [
        (F.mse_loss, np.zeros((3, 4))),
        (F.cross_entropy, np.array([0, 3, 1])),
        (F.binary_cross_entropy_with_logits, np.full((3, 4), 0.5)),
    ]:
        loss, grad = loss_fn(x, target)
        assert type(loss) is float and grad.dtype == dtype


def test_integer_input_computes_in_float64():
    y, _ = F.linear(np.arange(6).reshape(2, 3), np.ones((2, 3)))
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, [[3.0, 3.0], [12.0, 12.0]])
    assert F.relu(np.array([-1, 2]))[0].dtype == np.float64


@given(problem=lora_problems())
def test_cache_holds_no_new_out_by_in_array_and_inputs_are_untouched(problem):
    before = {k: None if v is None else np.copy(v) for k, v in problem.items()}
    mask = problem["dropout_mask"]
    _, cache = F.lora_linear(**lora_inputs(problem), scaling=problem["scaling"], dropout_mask=mask)
    given_arrays = [v for v in problem.values() if isinstance(v, np.ndarray)]
    n, n_in, r = math.prod(problem["x"].shape[:-1]), problem["x"].shape[-1], problem["A"].shape[0]
    allowed = {(n, r)} | ({(n, n_in)} if mask is not None else set())  # xa, and x * mask
    for field in dataclasses.fields(cache):
        value = getattr(cache, field.name)
        if isinstance(value, np.ndarray) and not any(np.shares_memory(value, v) for v in given_arrays):
            assert value.shape in allowed, f"cache.{field.name} is a new array of shape {value.shape}"
    assert cache.weight is problem["weight"]  # referenced, not copied
    g = F.lora_linear_backward(problem["dy"], cache, base_trainable=True)
    for name, grad in [("x", g.x), ("A", g.A), ("B", g.B), ("weight", g.weight)]:
        for k, v in problem.items():
            if isinstance(v, np.ndarray):
                assert not np.shares_memory(grad, v), f"grad {name} shares memory with {k}"
    for k, v in problem.items():
        if v is not None and not np.isscalar(v):
            np.testing.assert_array_equal(v, before[k])


@given(problem=linear_problems())
def test_batch_dims_are_flattened_and_restored(problem):
    x, W, b, dy = problem["x"], problem["weight"], problem["bias"], problem["dy"]
    y, cache = F.linear(x, W, b)
    g = F.linear_backward(dy, cache)
    y2, cache2 = F.linear(x.reshape(-1, x.shape[-1]), W, b)
    g2 = F.linear_backward(dy.reshape(-1, W.shape[0]), cache2)
    assert y.shape == (*x.shape[:-1], W.shape[0]) and g.x.shape == x.shape
    np.testing.assert_array_equal(y.reshape(y2.shape), y2)
    np.testing.assert_array_equal(g.weight, g2.weight)


# ---------------------------------------------------------------- dropout mask


@given(p=st.floats(0.0, 0.9), seed=SEEDS)
def test_dropout_mask_is_inverted_with_mean_one(p, seed):
    n = 50_000
    mask = F.dropout_mask((n,), p, random_state=seed)
    kept = mask != 0
    np.testing.assert_array_equal(mask[kept], np.full(kept.sum(), 1 / (1 - p)))
    sd = math.sqrt(p / (1 - p) / n)  # of the mean of n entries of variance p / (1 - p)
    assert abs(mask.mean() - 1.0) <= 6 * sd + 1e-12
    again = F.dropout_mask((n,), p, random_state=seed)
    assert again.tobytes() == mask.tobytes()
    as32 = F.dropout_mask((n,), p, random_state=seed, dtype=np.float32)
    np.testing.assert_array_equal(as32 != 0, kept)


def test_dropout_mask_accepts_an_int_shape_and_a_generator():
    rng = np.random.default_rng(3)
    mask = F.dropout_mask(5, 0.5, random_state=rng)
    assert mask.shape == (5,)
    np.testing.assert_array_equal(F.dropout_mask((2, 0), 0.5, random_state=0), np.ones((2, 0)))
    np.testing.assert_array_equal(F.dropout_mask((4,), 0.0, random_state=0), np.ones(4))


# ---------------------------------------------------------------- against PyTorch, when installed


def test_lora_linear_and_gelu_match_torch_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x, W, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    A, B = rng.standard_normal((2, 5)), rng.standard_normal((4, 2))
    mask = F.dropout_mask(x.shape, 0.3, random_state=5)
    dy = rng.standard_normal((2, 3, 4))
    y, cache = F.lora_linear(x, W, b, A, B, 1.5, mask)
    g = F.lora_linear_backward(dy, cache, base_trainable=True)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in dict(x=x, W=W, b=b, A=A, B=B).items()}
    ty = t["x"] @ t["W"].T + t["b"] + 1.5 * ((t["x"] * torch.tensor(mask)) @ t["A"].T) @ t["B"].T
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    for name, ours in [("x", g.x), ("W", g.weight), ("b", g.bias), ("A", g.A), ("B", g.B)]:
        np.testing.assert_allclose(ours, t[name].grad.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)

    z = np.linspace(-9.0, 9.0, 181)
    dz = rng.standard_normal(z.shape)
    for approximate in ("none", "tanh"):
        tz = torch.tensor(z, requires_grad=True)
        tg = torch.nn.functional.gelu(tz, approximate=approximate)
        tg.backward(torch.tensor(dz))
        yz, cz = F.gelu(z, approximate)
        np.testing.assert_allclose(yz, tg.detach().numpy(), rtol=1e-13, atol=1e-15)
        # torch forms Φ as (1 + erf(x / sqrt(2))) / 2, which cancels for negative x (ours goes
        # through erfc; see the mpmath test): an absolute bound where the derivative is tiny
        np.testing.assert_allclose(F.gelu_backward(dz, cz), tz.grad.numpy(), rtol=1e-12, atol=1e-13)

    logits, target = rng.standard_normal((2, 3, 5)), rng.integers(0, 5, (2, 3))
    tl = torch.tensor(logits, requires_grad=True)
    torch.nn.functional.cross_entropy(tl.reshape(-1, 5), torch.tensor(target).reshape(-1)).backward()
    _, grad = F.cross_entropy(logits, target)
    np.testing.assert_allclose(grad, tl.grad.numpy(), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- bad input


def _lora_args(**overrides):
    rng = np.random.default_rng(0)
    args = dict(
        x=rng.standard_normal((3, 5)), weight=rng.standard_normal((4, 5)), bias=np.zeros(4),
        A=rng.standard_normal((2, 5)), B=rng.standard_normal((4, 2)), scaling=2.0, dropout_mask=None,
    )  # fmt: skip
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (dict(x=np.float64(1.0)), ValueError, r"x must have at least one dimension"),
        (dict(x="abc"), TypeError, r"x must be an array of real numbers"),
        (dict(x=np.ones((3, 5), complex)), TypeError, r"x must hold real numbers"),
        (dict(x=np.ones((3, 4))), ValueError, r"x of shape \(3, 4\) does not fit weight of shape \(4, 5\)"),
        (dict(weight=np.ones(5)), ValueError, r"weight must be a non-empty 2-D array .* got shape \(5,\)"),
        (dict(weight=np.ones((0, 5))), ValueError, r"weight must be a non-empty 2-D array"),
        (dict(weight=np.ones((4, 5), np.float32)), TypeError, r"weight must have the same dtype as x"),
        (dict(bias=np.ones(3)), ValueError, r"bias must have shape \(out_features,\) = \(4,\) .* got shape \(3,\)"),
        (dict(bias=np.ones(4, np.float32)), TypeError, r"bias must have the same dtype as x"),
        (dict(A=np.ones((2, 4))), ValueError, r"A must have shape \(r, in_features\) .* got A of shape \(2, 4\)"),
        (dict(A=np.ones((0, 5))), ValueError, r"r >= 1"),
        (dict(A=np.ones(5)), ValueError, r"got A of shape \(5,\)"),
        (dict(B=np.ones((4, 3))), ValueError, r"B must have shape \(out_features, r\) = \(4, 2\) .* got B of shape"),
        (dict(B=np.ones((4, 2), np.float32)), TypeError, r"B must have the same dtype as x"),
        (dict(scaling="2"), TypeError, r"scaling must be a real number"),
        (dict(scaling=np.inf), ValueError, r"scaling must be in"),
        (dict(dropout_mask=np.ones((3, 4))), ValueError, r"dropout_mask must broadcast to x's shape \(3, 5\)"),
        (dict(dropout_mask=np.ones((2, 3, 5))), ValueError, r"dropout_mask must broadcast"),
    ],
)
def test_lora_linear_refuses_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        F.lora_linear(**_lora_args(**overrides))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((np.ones((2, 3)), np.ones((4, 2))), ValueError, r"x of shape \(2, 3\) does not fit weight"),
        ((np.ones((2, 3)), np.ones((4, 3)), np.ones(2)), ValueError, r"bias must have shape"),
        ((np.ones((2, 3)), np.ones((4, 3), np.float32)), TypeError, r"weight must have the same dtype"),
        ((np.float64(3.0), np.ones((4, 3))), ValueError, r"at least one dimension"),
    ],
)
def test_linear_refuses_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        F.linear(*args)


def test_backward_functions_refuse_bad_input():
    x = np.ones((2, 3))
    _, lin = F.linear(x, np.ones((4, 3)))
    _, lora = F.lora_linear(x, np.ones((4, 3)), None, np.ones((1, 3)), np.ones((4, 1)), 1.0)
    with pytest.raises(ValueError, match=r"dy must have the shape of the output y, \(2, 4\), got shape \(2, 3\)"):
        F.linear_backward(np.ones((2, 3)), lin)
    with pytest.raises(ValueError, match=r"dy must have the shape of the output y"):
        F.lora_linear_backward(np.ones(4), lora)
    with pytest.raises(TypeError, match=r"cache must be the LinearCache returned by linear\(\), got LoRACache"):
        F.linear_backward(np.ones((2, 4)), lora)
    with pytest.raises(TypeError, match=r"cache must be the LoRACache returned by lora_linear\(\)"):
        F.lora_linear_backward(np.ones((2, 4)), lin)
    with pytest.raises(TypeError, match=r"trainable must be True or False, got int 1"):
        F.linear_backward(np.ones((2, 4)), lin, trainable=1)
    with pytest.raises(TypeError, match=r"base_trainable must be True or False"):
        F.lora_linear_backward(np.ones((2, 4)), lora, base_trainable="yes")
    with pytest.raises(TypeError, match=r"dy must hold real numbers"):
        F.linear_backward(np.ones((2, 4), complex), lin)
    caches = {name: forward(x)[1] for name, (forward, _) in ACTIVATIONS.items()}
    for name, (_, backward) in ACTIVATIONS.items():
        with pytest.raises(ValueError, match=r"dy must have the shape of x, \(2, 3\), got shape \(3,\)"):
            backward(np.ones(3), caches[name])
        with pytest.raises(TypeError, match=r"cache must be the .*Cache returned by"):
            backward(np.ones((2, 3)), lin)
    _, drop = F.dropout(x, np.ones(3))
    with pytest.raises(ValueError, match=r"dy must have the shape of x"):
        F.dropout_backward(np.ones((3, 2)), drop)
    with pytest.raises(TypeError, match=r"cache must be the DropoutCache"):
        F.dropout_backward(x, lin)


def test_activations_and_dropout_refuse_bad_input():
    with pytest.raises(ValueError, match=r"approximate must be one of 'none', 'tanh', got 'erf'"):
        F.gelu(np.ones(2), approximate="erf")
    with pytest.raises(TypeError, match=r"x must hold real numbers"):
        F.relu(np.array(["a"]))
    with pytest.raises(ValueError, match=r"mask must broadcast to x's shape \(2, 3\), got shape \(2,\)"):
        F.dropout(np.ones((2, 3)), np.ones(2))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        F.dropout_mask((2,), 1.0)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got -0.1"):
        F.dropout_mask((2,), -0.1)
    with pytest.raises(TypeError, match=r"p must be a real number"):
        F.dropout_mask((2,), None)
    with pytest.raises(ValueError, match=r"every entry of shape must be in \[0, inf\], got -1"):
        F.dropout_mask((2, -1), 0.5)
    with pytest.raises(TypeError, match=r"every entry of shape must be an integer, got float 2.0"):
        F.dropout_mask((2.0,), 0.5)
    with pytest.raises(TypeError, match=r"shape must be an int or a tuple of ints, got list"):
        F.dropout_mask([2, 3], 0.5)
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64, got <class 'numpy.int64'>"):
        F.dropout_mask((2,), 0.5, dtype=np.int64)
    with pytest.raises(TypeError, match=r"random_state must be None, an int or a numpy.random.Generator"):
        F.dropout_mask((2,), 0.5, random_state="seed")


MSE, CE, BCE = F.mse_loss, F.cross_entropy, F.binary_cross_entropy_with_logits
ONES, NAN, INF = np.ones, np.nan, np.inf


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: MSE(ONES(3), ONES(4)), ValueError, r"target must have pred's shape \(3,\), got shape \(4,\)"),
        (lambda: MSE(ONES(0), ONES(0)), ValueError, r"pred must hold at least one element"),
        (lambda: MSE(np.array([1.0, NAN]), ONES(2)), ValueError, r"pred must be finite, got nan at index \(1,\)"),
        (lambda: MSE(ONES(2), np.array([INF, 1.0])), ValueError, r"target must be finite, got inf"),
        (lambda: CE(ONES((2, 3)), np.array([0.0, 1.0])), TypeError, r"integer class indices, got dtype float64"),
        (lambda: CE(ONES((2, 3)), np.array([True, False])), TypeError, r"got dtype bool"),
        (
            lambda: CE(ONES((2, 3)), np.array([0, 1, 2])),
            ValueError,
            r"target must have shape logits.shape\[:-1\] = \(2,\) for logits of shape \(2, 3\), "
            r"got target of shape \(3,\)",
        ),
        (
            lambda: CE(ONES((2, 3)), np.array([0, 3])),
            ValueError,
            r"target must hold class indices in \[0, C-1\] = \[0, 2\], got 3 at index \(1,\)",
        ),
        (lambda: CE(ONES((2, 3)), np.array([-1, 0])), ValueError, r"got -1 at index \(0,\)"),
        (lambda: CE(ONES((0, 3)), np.zeros(0, int)), ValueError, r"target must hold at least one element"),
        (lambda: CE(np.array([[0.0, INF]]), np.array([0])), ValueError, r"logits must be finite, got inf at index"),
        (lambda: CE(np.float64(1.0), np.array(0)), ValueError, r"logits must have at least one dimension"),
        (lambda: BCE(ONES(2), ONES(3)), ValueError, r"target must have logits' shape \(2,\), got shape \(3,\)"),
        (lambda: BCE(ONES(2), np.array([0.5, 1.5])), ValueError, r"target must hold values in \[0, 1\], got 1.5"),
        (lambda: BCE(ONES(2), np.array([0.5, NAN])), ValueError, r"target must hold values in \[0, 1\], got nan"),
        (lambda: BCE(np.array([NAN, 0.0]), ONES(2)), ValueError, r"logits must be finite"),
        (lambda: BCE(ONES(0), ONES(0)), ValueError, r"logits must hold at least one element"),
    ],
)
def test_losses_refuse_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_losses_accept_a_single_sample_and_integer_targets():
    loss, grad = F.cross_entropy(np.array([0.0, 0.0]), np.array(1))  # logits (C,), target ()
    assert loss == pytest.approx(math.log(2)) and grad.shape == (2,)
    loss, _ = F.binary_cross_entropy_with_logits(np.zeros(2), np.array([0, 1]))  # int target
    assert loss == pytest.approx(math.log(2))
    loss, _ = F.mse_loss(np.ones(2, np.float32), np.zeros(2))  # target cast
    assert loss == 1.0


@given(dtype=FLOAT_DTYPES)
def test_kernels_take_any_number_of_batch_dims_including_none(dtype):
    W = np.ones((2, 3), dtype)
    for x in [np.ones(3, dtype), np.ones((1, 3), dtype), np.ones((2, 1, 4, 3), dtype), np.ones((0, 3), dtype)]:
        y, cache = F.lora_linear(x, W, None, np.ones((1, 3), dtype), np.ones((2, 1), dtype), 0.5)
        assert y.shape == (*x.shape[:-1], 2)
        g = F.lora_linear_backward(np.ones(y.shape, dtype), cache)
        assert g.x.shape == x.shape and g.A.shape == (1, 3) and g.B.shape == (2, 1)


def test_the_example_in_docs_lora_md_runs():
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "lora.md").read_text(encoding="utf-8")
    examples = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert examples
    for example in examples:  # tests/test_docs.py holds the rest of the course to the code too
        exec(compile(example, "docs/lora.md", "exec"), {})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_at_the_edge_of_the_range_warns_nothing_and_saturates(dtype, approximate):
    """Far from 0 GELU is x (right) or 0 (left) and its derivative 1 or 0: the tanh form's x**3
    and the derivative's x*x must not overflow on the way there (issue: RuntimeWarnings leaked)."""
    big = np.finfo(dtype).max
    x = np.array([-big, -1e13, 1e13, big], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, cache = F.gelu(x, approximate=approximate)
        dx = F.gelu_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(y, [0.0, 0.0, dtype(1e13), big])
    np.testing.assert_array_equal(dx, [0.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("mask", [0.5, np.float32(0.5), np.array(0.5)])
def test_dropout_refuses_a_probability_where_the_mask_goes(mask):
    """torch.nn.functional.dropout(x, p) takes p; F.dropout(x, 0.5) would silently halve x."""
    with pytest.raises(TypeError, match=r"dropout_mask\(x.shape, p\)"):
        F.dropout(np.ones(3), mask)
