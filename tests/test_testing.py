"""lowrank.reference.harness: the harness passes the reference itself and catches each classic LoRA bug."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from lowrank.nn import functional as F
from lowrank.reference.harness import assert_lora_linear_matches


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_reference_passes(dtype):
    assert_lora_linear_matches(F.lora_linear, F.lora_linear_backward, dtype=dtype, max_examples=25)


def test_an_independent_numpy_candidate_returning_a_dict_passes():
    def forward(x, weight, bias, A, B, scaling, dropout_mask=None):
        xm = x if dropout_mask is None else x * dropout_mask
        y = x @ weight.T + scaling * (xm @ A.T) @ B.T + (0 if bias is None else bias)
        return y, (x, xm, weight, A, B, scaling, dropout_mask)

    def backward(dy, cache, base_trainable=True):
        x, xm, W, A, B, s, mask = cache
        x2, xm2 = x.reshape(-1, x.shape[-1]), xm.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dxa = s * dy2 @ B  # (N, r)
        dxm = (dxa @ A).reshape(x.shape)
        dx = dy @ W + (dxm if mask is None else dxm * mask)
        return {"x": dx, "A": dxa.T @ xm2, "B": s * dy2.T @ (xm2 @ A.T), "weight": dy2.T @ x2,
                "bias": dy2.sum(axis=0)}

    assert_lora_linear_matches(forward, backward, max_examples=25)


def _bug(name):
    """Candidates each with one classic mistake, built on the reference kernels."""

    def forward(x, weight, bias, A, B, scaling, dropout_mask=None):
        if name == "dropout on both paths" and dropout_mask is not None:
            x = x * dropout_mask
        if name == "alpha instead of alpha / r":
            scaling = scaling * A.shape[0]
        return F.lora_linear(x, weight, bias, A, B, scaling, dropout_mask=dropout_mask)

    def backward(dy, cache, base_trainable=True):
        g = F.lora_linear_backward(dy, cache, base_trainable=base_trainable)
        if name == "dB without scaling":
            return SimpleNamespace(x=g.x, A=g.A, B=g.B / cache.scaling, weight=g.weight, bias=g.bias)
        if name == "transposed dA" and g.A.shape[0] == g.A.shape[1]:
            return SimpleNamespace(x=g.x, A=g.A.T, B=g.B, weight=g.weight, bias=g.bias)
        return g

    return forward, backward


@pytest.mark.parametrize(("bug", "named", "clean"), [
    ("dropout on both paths", "y", "dA"),
    ("alpha instead of alpha / r", "y", None),
    ("dB without scaling", "dB", "dA"),
    ("transposed dA", "dA", "dB"),
])  # fmt: skip
def test_a_buggy_candidate_fails_with_the_smallest_case_and_each_tensor(bug, named, clean):
    forward, backward = _bug(bug)
    with pytest.raises(AssertionError) as info:
        assert_lora_linear_matches(forward, backward, max_examples=50)
    message = str(info.value)
    assert "smallest failing case found" in message
    assert f"  {named:<7} max_abs" in message and "MISMATCH" in message.split(f"  {named:<7}")[1].splitlines()[0]
    if clean is not None:
        assert "ok" in message.split(f"  {clean:<7}")[1].splitlines()[0]
    if bug == "dB without scaling":  # shrinking reaches the smallest shapes
        assert "x (1,), weight (1, 1)" in message


def test_a_candidate_that_raises_is_reported_with_the_case():
    def forward(x, weight, bias, A, B, scaling, dropout_mask=None):
        if bias is None:
            raise KeyError("bias")
        return F.lora_linear(x, weight, bias, A, B, scaling, dropout_mask)

    with pytest.raises(AssertionError, match=r"the candidate raised KeyError: 'bias'\non the case: .*bias None"):
        assert_lora_linear_matches(forward, F.lora_linear_backward, max_examples=25)


def test_a_missing_gradient_is_reported():
    def backward(dy, cache, base_trainable=True):
        g = F.lora_linear_backward(dy, cache, base_trainable=False)
        return g  # weight and bias are None

    with pytest.raises(AssertionError, match="dweight missing"):
        assert_lora_linear_matches(F.lora_linear, backward, max_examples=5)
    assert_lora_linear_matches(F.lora_linear, backward, max_examples=5, check_base=False)


def test_argument_errors():
    fwd, bwd = F.lora_linear, F.lora_linear_backward
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
        assert_lora_linear_matches(F.lora_linear, F.lora_linear_backward)
