"""lowrank.reference.harness: it passes a correct candidate and catches each classic LoRA bug.

Every candidate here is written by hand in NumPy from the formula
``y = x @ W.T + b + s * ((x * mask) @ A.T) @ B.T`` and its gradients, never
with lowrank's kernels: the harness is shown to tell a right layer from a
wrong one, not to agree with itself.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from lowrank.reference.cases import LORA_CASES
from lowrank.reference.harness import assert_lora_linear_matches

BUGS = ("scaling ignored", "transposed B", "dropout on the base path", "bias forgotten")


def by_hand(bug=None, *, grads_as_dict=True):
    """A LoRA layer by hand, right or with one classic mistake made consistently in forward and backward."""

    def forward(x, weight, bias, A, B, scaling, dropout_mask=None):
        mask = 1.0 if dropout_mask is None else dropout_mask
        if bug == "scaling ignored":
            scaling = 1.0
        Bt = B.T if bug == "transposed B" and B.shape[0] == B.shape[1] else B  # expressible when out == r
        x_base, x_lora = (x * mask, x) if bug == "dropout on the base path" else (x, x * mask)
        y = x_base @ weight.T + scaling * (x_lora @ A.T) @ Bt.T  # (..., out)
        if bias is not None and bug != "bias forgotten":
            y = y + bias
        return y, (x_base, x_lora, mask, weight, A, Bt, scaling, B is not Bt)

    def backward(dy, cache, base_trainable=True):
        x_base, x_lora, mask, W, A, Bt, s, transposed = cache
        n_in, n_out = x_base.shape[-1], dy.shape[-1]
        dy2 = dy.reshape(-1, n_out)  # (N, out)
        xb2, xl2 = x_base.reshape(-1, n_in), x_lora.reshape(-1, n_in)  # (N, in)
        dxa = s * dy2 @ Bt  # (N, r)
        d_base, d_lora = (dy @ W), (dxa @ A).reshape(x_base.shape)  # (..., in)
        dx = d_base * mask + d_lora if bug == "dropout on the base path" else d_base + d_lora * mask
        dB = s * dy2.T @ (xl2 @ A.T)  # (out, r)
        grads = {"x": dx, "A": dxa.T @ xl2, "B": dB.T if transposed else dB}
        if base_trainable:
            grads.update(weight=dy2.T @ xb2, bias=dy2.sum(axis=0))
        if grads_as_dict:
            return grads
        return type("Grads", (), grads)()  # attributes, as a namedtuple or dataclass would have

    return forward, backward


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grads_as_dict", [True, False])
def test_a_correct_candidate_by_hand_passes(dtype, grads_as_dict):
    assert_lora_linear_matches(*by_hand(grads_as_dict=grads_as_dict), dtype=dtype, max_examples=25)


@pytest.mark.parametrize(("bug", "wrong", "right", "smallest"), [
    ("scaling ignored", ["y", "dx", "dA", "dB"], ["dweight"], "A (1, 1), B (1, 1)"),
    ("transposed B", ["y", "dx", "dA", "dB"], ["dweight"], "B (2, 2)"),
    ("dropout on the base path", ["y", "dx", "dweight"], [], "dropout_mask (1,)"),
    ("bias forgotten", ["y"], ["dx", "dA", "dB", "dweight", "dbias"], "x (1,), weight (1, 1), bias (1,)"),
])  # fmt: skip
def test_a_wrong_candidate_fails_with_the_smallest_case_and_each_tensor(bug, wrong, right, smallest):
    with pytest.raises(AssertionError) as info:
        assert_lora_linear_matches(*by_hand(bug), max_examples=50)
    message = str(info.value)
    assert "smallest failing case found" in message and smallest in message, message
    lines = {line.split()[0]: line for line in message.splitlines() if line.startswith("  ")}
    for name in wrong:
        assert "MISMATCH" in lines[name], message
    for name in right:
        assert lines[name].split()[-1] == "ok", message


def test_a_bug_only_a_catalogue_case_reaches_is_caught_there():
    """The drawn batches never give x 12 rows of 3 features; the catalogue's large-batch case does."""
    forward, backward = by_hand()
    large = next(c for c in LORA_CASES if c.name == "r2_alpha4_largebatch")

    def forward_wrong_on_large_batches(x, weight, bias, A, B, scaling, dropout_mask=None):
        y, cache = forward(x, weight, bias, A, B, scaling, dropout_mask)
        return (y + 1e-6 if x.shape == (*large.batch, large.in_features) else y), cache

    with pytest.raises(AssertionError, match=r"failing catalogue case 'r2_alpha4_largebatch': x \(12, 3\)"):
        assert_lora_linear_matches(forward_wrong_on_large_batches, backward, max_examples=25)


def test_a_candidate_that_raises_is_reported_with_the_case():
    forward, backward = by_hand()

    def forward_needing_a_bias(x, weight, bias, A, B, scaling, dropout_mask=None):
        if bias is None:
            raise KeyError("bias")
        return forward(x, weight, bias, A, B, scaling, dropout_mask)

    with pytest.raises(AssertionError, match=r"the candidate raised KeyError: 'bias'\non the case: .*bias None"):
        assert_lora_linear_matches(forward_needing_a_bias, backward, max_examples=25)


def test_a_missing_gradient_is_reported_unless_the_base_is_not_checked():
    forward, backward = by_hand()

    def backward_without_base(dy, cache, base_trainable=True):
        return backward(dy, cache, base_trainable=False)  # no weight, no bias

    with pytest.raises(AssertionError, match="dweight missing"):
        assert_lora_linear_matches(forward, backward_without_base, max_examples=5)
    assert_lora_linear_matches(forward, backward_without_base, max_examples=5, check_base=False)


def test_a_candidate_writing_into_its_inputs_does_not_spoil_the_reference():
    forward, backward = by_hand()

    def forward_in_place(x, weight, bias, A, B, scaling, dropout_mask=None):
        y, cache = forward(x.copy(), weight.copy(), bias, A.copy(), B.copy(), scaling, dropout_mask)
        x[...], weight[...], A[...], B[...] = 0.0, 0.0, 0.0, 0.0
        return y, cache

    assert_lora_linear_matches(forward_in_place, backward, max_examples=10)


def test_argument_errors():
    fwd, bwd = by_hand()
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        assert_lora_linear_matches(fwd, bwd, dtype=np.int32)
    with pytest.raises(ValueError, match=r"max_examples must be in \[1, inf\], got 0"):
        assert_lora_linear_matches(fwd, bwd, max_examples=0)
    with pytest.raises(ValueError, match="rtol must be in"):
        assert_lora_linear_matches(fwd, bwd, rtol=-1.0)
    with pytest.raises(TypeError, match="check_base must be True or False"):
        assert_lora_linear_matches(fwd, bwd, check_base=1)


def test_missing_hypothesis_names_the_test_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match=r"pip install 'lowrank\[test\]'"):
        assert_lora_linear_matches(*by_hand())


# ---------------------------------------------------------------- a reference is strict


def _with_output(change, name="x"):
    """The correct candidate, with its gradient ``name`` passed through ``change``."""
    forward, backward = by_hand()

    def backward_changed(dy, cache, base_trainable=True):
        grads = backward(dy, cache, base_trainable)
        grads[name] = change(grads[name])
        return grads

    return forward, backward_changed


@pytest.mark.parametrize(("change", "reason"), [
    (lambda g: g + 1j, r"dx      dtype complex128 \(complex, not real\), expected float64"),
    (lambda g: g + 0j, r"dx      dtype complex128 \(complex, not real\), expected float64"),  # equal values
    (lambda g: g.astype(str), r"dx      dtype <U\d+ \(not a real number type\), expected float64"),
    (lambda g: g.astype(object), r"dx      dtype object \(not a real number type\), expected float64"),
    (lambda g: [g, 1.0], r"dx      not an array \(list: ValueError: .*inhomogeneous"),  # ragged
    (lambda g: g.astype(np.float32), r"dx      max_abs .* MISMATCH.* \(dtype float32, expected float64\)"),
])  # fmt: skip
def test_outputs_that_are_not_real_arrays_of_the_dtype_fail_with_the_reason(change, reason):
    with pytest.raises(AssertionError, match="disagrees with lowrank on dx") as info:
        assert_lora_linear_matches(*_with_output(change), max_examples=5)
    assert re.search(reason, str(info.value)), str(info.value)


def test_a_float64_result_in_a_float32_run_fails_even_with_the_right_values():
    """y holds exactly the float32 reference's values, widened to float64: only its dtype is wrong."""
    forward, backward = float64_rounded_once(*by_hand())

    def forward_float64(x, weight, bias, A, B, scaling, dropout_mask=None):
        y, cache = forward(x, weight, bias, A, B, scaling, dropout_mask)
        return y.astype(np.float64), cache

    with pytest.raises(AssertionError, match="disagrees with lowrank on y ") as info:
        assert_lora_linear_matches(forward_float64, backward, dtype=np.float32, max_examples=5)
    assert "  y       max_abs 0  max_rel 0  MISMATCH (dtype float64, expected float32)" in str(info.value)


def float64_rounded_once(forward, backward):
    """A candidate that computes in float64 from its float32 inputs and rounds each output once."""

    def forward64(x, weight, bias, A, B, scaling, dropout_mask=None):
        def wide(a):
            return None if a is None else a.astype(np.float64)

        y, cache = forward(wide(x), wide(weight), wide(bias), wide(A), wide(B), scaling, wide(dropout_mask))
        return y.astype(x.dtype), (cache, x.dtype)

    def backward64(dy, cache, base_trainable=True):
        inner, dtype = cache
        grads = backward(dy.astype(np.float64), inner, base_trainable)
        return {k: v.astype(dtype) for k, v in grads.items()}

    return forward64, backward64


def test_the_float32_reference_is_the_float64_result_rounded_once():
    """With no tolerance at all, a float32 candidate that computes in float64 and rounds once matches.

    A reference computed by float32 kernels (as before) rounds at every step, and differently once the
    batch is large enough to fold the update into the weight: it is a unit in the last place or more away
    from this candidate on some entry of nearly every case.
    """
    assert_lora_linear_matches(*float64_rounded_once(*by_hand()), dtype=np.float32, max_examples=25,
                               rtol=0.0, atol=0.0)  # fmt: skip
    with pytest.raises(AssertionError, match="disagrees with lowrank"):  # a float32 evaluation does not
        assert_lora_linear_matches(*by_hand(), dtype=np.float32, max_examples=25, rtol=0.0, atol=0.0)
