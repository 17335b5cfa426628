"""The validation helpers of ``lowrank.utils.validation``: random_state, the dtype rule, matrices, masks, numbers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    BAD_DTYPES,
    INPUT_DTYPES,
    SEEDS,
    arrays_with_non_finite,
    expected_float_dtype,
    legacy_global_state,
    masks,
)

from lowrank.utils import validation

# ---------------------------------------------------------------- random_state


@given(seed=SEEDS)
def test_same_int_seed_gives_same_bits(seed):
    a = validation.check_random_state(seed).random(8)
    b = validation.check_random_state(seed).random(8)
    assert a.tobytes() == b.tobytes()
    # an int seed means numpy's default generator seeded with it, nothing else
    assert a.tobytes() == np.random.default_rng(seed).random(8).tobytes()


def test_numpy_integer_seed_is_accepted():
    a = validation.check_random_state(np.int64(7)).random(4)
    assert a.tobytes() == np.random.default_rng(7).random(4).tobytes()


def test_generator_is_passed_through_so_its_stream_advances():
    rng = np.random.default_rng(3)
    assert validation.check_random_state(rng) is rng
    first = validation.check_random_state(rng).random(3)
    second = validation.check_random_state(rng).random(3)
    assert first.tobytes() != second.tobytes()


def test_none_gives_a_fresh_generator_and_leaves_global_state_alone():
    before = legacy_global_state()
    rng = validation.check_random_state(None)
    assert isinstance(rng, np.random.Generator)
    rng.random(10)
    assert legacy_global_state() == before


@pytest.mark.parametrize(
    "bad", [True, np.bool_(False), 1.5, "3", np.random.RandomState(0), [1, 2]]
)
def test_random_state_of_a_bad_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="random_state"):
        validation.check_random_state(bad)


def test_negative_seed_is_a_value_error_naming_the_argument():
    with pytest.raises(ValueError, match=r"seed.*-1|-1"):
        validation.check_random_state(-1, name="seed")
    with pytest.raises(ValueError, match="random_state"):
        validation.check_random_state(-1)


# ---------------------------------------------------------------- dtype rule


@given(dtype=INPUT_DTYPES)
def test_dtype_rule_over_accepted_dtypes(dtype):
    x = np.arange(6).reshape(2, 3).astype(dtype)
    want = expected_float_dtype(dtype)
    assert validation.float_dtype_of(x, "x") == want
    out = validation.as_float_array(x, "x")
    assert out.dtype == want
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3).astype(dtype).astype(np.float64))


def test_float_arrays_are_not_copied():
    for dtype in (np.float32, np.float64):
        x = np.ones((2, 2), dtype=dtype)
        assert validation.as_float_array(x, "x") is x


def test_explicit_dtype_overrides_the_rule():
    x = np.ones((2, 2), dtype=np.float64)
    assert validation.as_float_array(x, "x", dtype=np.float32).dtype == np.float32


def test_python_lists_follow_the_rule():
    assert validation.as_float_array([[1, 2], [3, 4]], "x").dtype == np.float64
    assert validation.as_float_array([[1.5, 2.0]], "x").dtype == np.float64


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_other_dtypes_are_type_errors_naming_the_argument(dtype):
    x = np.zeros((2, 2), dtype=dtype)
    with pytest.raises(TypeError, match="weights"):
        validation.float_dtype_of(x, "weights")
    with pytest.raises(TypeError, match="weights"):
        validation.as_float_array(x, "weights")


@pytest.mark.parametrize("bad", ["abc", b"abc", [[1, 2], [3]]])
def test_strings_and_ragged_lists_are_type_errors(bad):
    with pytest.raises(TypeError, match="M"):
        validation.as_float_array(bad, "M")


# ---------------------------------------------------------------- check_matrix


def test_check_matrix_accepts_a_finite_matrix_and_applies_the_dtype_rule():
    out = validation.check_matrix(np.arange(6).reshape(2, 3))
    assert out.dtype == np.float64 and out.shape == (2, 3)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (), (0, 3), (3, 0)])
def test_check_matrix_refuses_wrong_dimensions_and_empty(shape):
    with pytest.raises(ValueError, match="M"):
        validation.check_matrix(np.ones(shape))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_matrix_refuses_non_finite_entries(bad):
    M = np.ones((3, 4))
    M[1, 2] = bad
    with pytest.raises(ValueError, match=r"M must be finite.*\(1, 2\)"):
        validation.check_matrix(M)


def test_check_matrix_ignores_non_finite_entries_outside_the_mask():
    M = np.ones((3, 4))
    M[1, 2] = np.nan
    mask = np.ones((3, 4), dtype=bool)
    mask[1, 2] = False
    validation.check_matrix(M, mask=mask)
    mask[1, 2] = True
    with pytest.raises(ValueError, match="observed"):
        validation.check_matrix(M, mask=mask)


# ---------------------------------------------------------------- first_non_finite and its message

@given(arr=arrays_with_non_finite, data=st.data())
def test_first_non_finite_and_its_message_against_a_loop(arr, data):
    where = data.draw(masks(arr.shape, at_least_one=False) | st.none(), label="where")
    bad = [idx for idx in np.ndindex(arr.shape) if not np.isfinite(arr[idx]) and (where is None or where[idx])]
    assert validation.first_non_finite(arr, where) == (bad[0] if bad else None)  # C order: ndindex's order
    message = validation.describe_non_finite(arr, "M", where)
    if not bad:
        assert message is None
        assert validation.check_finite(arr, "M", where) is arr
        return
    at = "" if where is None else " at observed entries"
    want = f"M must be finite{at}, got {arr[bad[0]]} at index {bad[0]} ({len(bad)} non-finite entries)"
    assert message == want
    assert validation.non_finite_message("M", arr[bad[0]], bad[0], len(bad), observed=where is not None) == want
    with pytest.raises(ValueError) as info:
        validation.check_finite(arr, "M", where)
    assert str(info.value) == want


# ---------------------------------------------------------------- check_mask


def test_check_mask_accepts_a_boolean_mask():
    mask = np.eye(3, dtype=bool)
    out = validation.check_mask(mask, (3, 3))
    assert out.dtype == np.bool_ and np.array_equal(out, mask)


def test_check_mask_refuses_non_boolean_dtype():
    with pytest.raises(TypeError, match="mask"):
        validation.check_mask(np.ones((3, 3), dtype=np.int64), (3, 3))


def test_check_mask_refuses_the_wrong_shape():
    with pytest.raises(ValueError, match=r"mask.*\(3, 3\).*\(3, 4\)"):
        validation.check_mask(np.ones((3, 4), dtype=bool), (3, 3))


def test_check_mask_refuses_an_all_false_mask():
    with pytest.raises(ValueError, match="mask"):
        validation.check_mask(np.zeros((3, 3), dtype=bool), (3, 3))


# ---------------------------------------------------------------- numbers and choices


@given(value=st.integers(-50, 50))
def test_check_int_bounds(value):
    if 1 <= value <= 9:
        assert validation.check_int(value, "rank", 1, 9) == value
    else:
        with pytest.raises(ValueError, match=rf"rank must be in \[1, 9\], got {value}"):
            validation.check_int(value, "rank", 1, 9)


@pytest.mark.parametrize("bad", [2.5, 2.0, "3", True, None])
def test_check_int_refuses_non_integers(bad):
    with pytest.raises(TypeError, match="rank must be an integer"):
        validation.check_int(bad, "rank", 1)


def test_check_int_accepts_numpy_integers_and_returns_python_int():
    out = validation.check_int(np.int32(4), "rank", 1)
    assert out == 4 and type(out) is int


def test_check_rank_message_names_the_range():
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(m, n\)\] = \[1, 9\], got 12"):
        validation.check_rank(12, (9, 11))
    assert validation.check_rank(9, (9, 11)) == 9


def test_check_real_open_and_closed_ends():
    assert validation.check_real(1.0, "energy", 0.0, 1.0, low_open=True) == 1.0
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\], got 0.0"):
        validation.check_real(0.0, "energy", 0.0, 1.0, low_open=True)
    with pytest.raises(ValueError, match="energy"):
        validation.check_real(1.0000001, "energy", 0.0, 1.0, low_open=True)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="energy"):
            validation.check_real(bad, "energy", 0.0, 1.0, low_open=True)
    with pytest.raises(TypeError, match="energy"):
        validation.check_real("0.5", "energy", 0.0, 1.0)
    with pytest.raises(TypeError, match="energy"):
        validation.check_real(True, "energy", 0.0, 1.0)


def test_check_choice():
    assert validation.check_choice("svd", "init", ("svd", "random")) == "svd"
    with pytest.raises(ValueError, match=r"init must be one of 'svd', 'random', got 'SVD'"):
        validation.check_choice("SVD", "init", ("svd", "random"))
    with pytest.raises(ValueError, match="init"):
        validation.check_choice(None, "init", ("svd", "random"))


# ---------------------------------------------------------------- check_float_dtype


@pytest.mark.parametrize(
    "spelling, want",
    [(np.float32, np.float32), ("float32", np.float32), (np.dtype("f4"), np.float32),
     (np.float64, np.float64), ("float64", np.float64), (float, np.float64), ("f8", np.float64)],
)
def test_check_float_dtype_accepts_float32_and_float64_in_any_spelling(spelling, want):
    assert validation.check_float_dtype(spelling) == np.dtype(want)


@pytest.mark.parametrize("bad", [None, np.int64, "int32", np.float16, complex, object, "nonsense", 3])
def test_check_float_dtype_refuses_everything_else(bad):
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        validation.check_float_dtype(bad)
    with pytest.raises(TypeError, match="param_dtype"):
        validation.check_float_dtype(bad, "param_dtype")
