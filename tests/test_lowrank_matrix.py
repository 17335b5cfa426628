"""LowRank: parameter counts, products through the factors, the error, validation; lora_param_count."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import expected_float_dtype, laid_out, lowrank_factors, rtol_for

import lowrank
from lowrank import LowRank, lora_param_count


def lowranks(dtype=None):
    """A LowRank of drawn factors (``strategies.lowrank_factors``): (lr, left, right)."""
    return lowrank_factors(dtype).map(lambda f: (LowRank(*f), *f))


def close(actual, desired, dtype):
    scale = max(1.0, float(np.abs(desired).max())) if np.size(desired) else 1.0
    np.testing.assert_allclose(actual, desired, rtol=rtol_for(dtype), atol=rtol_for(dtype) * scale * 10)


# ---------------------------------------------------------------- counts


@given(case=lowranks())
def test_counts_shape_and_rank(case):
    lr, left, right = case
    m, r = left.shape
    n = right.shape[1]
    assert lr.shape == (m, n)
    assert lr.rank == r
    assert lr.n_params == r * (m + n)
    assert lr.dense_params == m * n
    assert lr.compression_ratio == pytest.approx(m * n / (r * (m + n)), rel=1e-15)
    assert isinstance(lr.n_params, int) and isinstance(lr.dense_params, int)


def test_the_9x9_rank_1_example():
    lr = LowRank(np.arange(1.0, 10.0)[:, None], np.ones((1, 9)))
    assert (lr.dense_params, lr.n_params) == (81, 18)
    assert lr.compression_ratio == pytest.approx(4.5)
    # and through the SVD of a 9x9 rank-1 matrix
    M = np.outer(np.arange(1.0, 10.0), np.linspace(-1.0, 1.0, 9))
    svd_lr = lowrank.truncated_svd(M, 1).to_lowrank()
    assert (svd_lr.dense_params, svd_lr.n_params) == (81, 18)
    np.testing.assert_allclose(svd_lr.to_dense(), M, atol=1e-13)


# ---------------------------------------------------------------- dense form and products


@given(case=lowranks())
def test_to_dense_is_the_product_of_the_factors(case):
    lr, left, right = case
    dense = lr.to_dense()
    assert dense.shape == lr.shape and dense.dtype == left.dtype
    close(dense, left.astype(np.float64) @ right.astype(np.float64), left.dtype)


@given(case=lowranks(), k=st.integers(1, 4), data=st.data())
def test_products_on_both_sides_equal_the_dense_products(case, k, data):
    lr, left, right = case
    m, n = lr.shape
    dtype = left.dtype
    dense = left.astype(np.float64) @ right.astype(np.float64)  # (m, n), independent
    x, X = data.draw(laid_out(dtype, (n,)), label="x"), data.draw(laid_out(dtype, (n, k)), label="X")
    y, Y = data.draw(laid_out(dtype, (m,)), label="y"), data.draw(laid_out(dtype, (k, m)), label="Y")

    out = lr @ x
    assert out.shape == (m,)
    close(out, dense @ x, dtype)
    out = lr @ X
    assert out.shape == (m, k)
    close(out, dense @ X, dtype)
    out = y @ lr
    assert out.shape == (n,)
    close(out, y @ dense, dtype)
    out = Y @ lr
    assert out.shape == (k, n)
    close(out, Y @ dense, dtype)


@pytest.mark.parametrize("side", ["right", "left"])
def test_products_never_form_the_dense_matrix(side):
    # dense form: 100000 x 100000 float64 = 80 GB; the factors are 3.2 MB
    m = n = 100_000
    rng = np.random.default_rng(0)
    left, right = rng.standard_normal((m, 2)), rng.standard_normal((2, n))
    lr = LowRank(left, right)
    x = rng.standard_normal(n if side == "right" else m)
    tracemalloc.start()
    try:
        out = lr @ x if side == "right" else x @ lr
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"peak {peak / 1e6:.1f} MB"
    want = left @ (right @ x) if side == "right" else (x @ left) @ right
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-9)
    assert lr.dense_params == 10**10 and lr.n_params == 400_000


@pytest.mark.parametrize("shape", [(4,), (5,), (4, 3), (2, 6, 6)])
def test_right_products_with_the_wrong_shape_are_refused(shape):
    lr = LowRank(np.ones((4, 2)), np.ones((2, 6)))  # accepts (6,) or (6, k) on the right
    with pytest.raises(ValueError):
        lr @ np.ones(shape)


@pytest.mark.parametrize("shape", [(6,), (5,), (3, 6), (2, 3, 4)])
def test_left_products_with_the_wrong_shape_are_refused(shape):
    lr = LowRank(np.ones((4, 2)), np.ones((2, 6)))  # accepts (4,) or (k, 4) on the left
    with pytest.raises(ValueError):
        np.ones(shape) @ lr


# ---------------------------------------------------------------- error


@given(case=lowranks(np.float64), data=st.data())
def test_error_against_numpy(case, data):
    lr, left, right = case
    M = data.draw(laid_out(np.float64, lr.shape), label="M")
    want = np.sqrt(sum(float(v) ** 2 for v in (M - left @ right).ravel()))  # by hand
    norm = np.sqrt(sum(float(v) ** 2 for v in M.ravel()))
    assert lr.error(M) == pytest.approx(want, rel=1e-12, abs=1e-300)
    if norm > 0:
        assert lr.error(M, relative=True) == pytest.approx(want / norm, rel=1e-12, abs=1e-300)
    else:  # ‖M‖ = 0: 0 if the factorization is 0 too, else inf
        assert lr.error(M, relative=True) == (0.0 if want == 0 else np.inf)
    assert lr.error(left @ right) == pytest.approx(0.0, abs=1e-12 * np.abs(left @ right).sum())


def test_error_refuses_the_wrong_shape():
    lr = LowRank(np.ones((4, 2)), np.ones((2, 6)))
    with pytest.raises(ValueError, match="M"):
        lr.error(np.ones((6, 4)))


# ---------------------------------------------------------------- validation and dtypes


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32, np.bool_])
def test_dtype_rule(dtype):
    lr = LowRank(np.ones((3, 2), dtype=dtype), np.ones((2, 4), dtype=dtype))
    want = expected_float_dtype(dtype)
    assert lr.left.dtype == want and lr.right.dtype == want
    assert lr.to_dense().dtype == want


@pytest.mark.parametrize("dtype", [np.complex128, object, "U3"])
def test_other_dtypes_are_type_errors(dtype):
    with pytest.raises(TypeError, match="left"):
        LowRank(np.zeros((3, 2), dtype=dtype), np.ones((2, 4)))
    with pytest.raises(TypeError, match="right"):
        LowRank(np.ones((3, 2)), np.zeros((2, 4), dtype=dtype))


@pytest.mark.parametrize("name", ["left", "right"])
@pytest.mark.parametrize("shape", [(3,), (3, 2, 1), (), (0, 2)])
def test_factors_must_be_2d(name, shape):
    good = {"left": np.ones((3, 2)), "right": np.ones((2, 4))}
    good[name] = np.ones(shape)
    with pytest.raises(ValueError, match=name):
        LowRank(good["left"], good["right"])


def test_inner_dimensions_must_agree_and_the_message_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(3, 5\)"):
        LowRank(np.ones((4, 2)), np.ones((3, 5)))


# ---------------------------------------------------------------- LoRA parameter count


def test_gpt3_example():
    count = lora_param_count(12288, 96, 2, 1)
    assert count == 4_718_592
    assert count == 2 * 96 * 1 * (12288 + 12288)
    assert round(count / 175_255.8e6 * 100, 4) == 0.0027


@given(
    d_model=st.integers(1, 10_000),
    n_layers=st.integers(1, 100),
    n_matrices=st.integers(1, 8),
    r=st.integers(1, 64),
)
def test_lora_param_count_formula(d_model, n_layers, n_matrices, r):
    r = min(r, d_model)
    count = lora_param_count(d_model, n_layers, n_matrices, r)
    assert isinstance(count, int)
    a_size, b_size = r * d_model, d_model * r  # A (r, d_model) and B (d_model, r) per matrix
    assert count == n_layers * n_matrices * (a_size + b_size)


@pytest.mark.parametrize(
    "args, name",
    [
        ((0, 96, 2, 1), "d_model"),
        ((12288, 0, 2, 1), "n_layers"),
        ((12288, 96, 0, 1), "n_matrices"),
        ((12288, 96, 2, 0), "r"),
        ((8, 96, 2, 9), "r"),
    ],
)
def test_lora_param_count_refuses_bad_values(args, name):
    with pytest.raises(ValueError, match=name):
        lora_param_count(*args)


def test_lora_param_count_refuses_non_integers():
    with pytest.raises(TypeError, match="r"):
        lora_param_count(12288, 96, 2, 1.5)


def test_product_with_a_non_numeric_operand_is_a_type_error():
    lr = LowRank(np.ones((3, 2)), np.ones((2, 4)))
    with pytest.raises(TypeError, match="right operand"):
        lr @ "abc"
    with pytest.raises(TypeError, match="left operand"):
        "abc" @ lr
