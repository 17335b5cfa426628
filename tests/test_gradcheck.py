"""The public gradient checker: it must catch wrong gradients and say where."""

from __future__ import annotations

import doctest
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import SEEDS

import lowrank.reference.gradcheck
from lowrank import nn
from lowrank.cli import main
from lowrank.nn import functional as F
from lowrank.reference.gradcheck import (
    GradcheckError,
    GradcheckRow,
    check_gradients,
    check_module_gradients,
    format_table,
    numerical_gradient,
    run_all,
)


def quadratic(seed: int, n: int = 4):
    """f(x, M) = x^T M x with its exact gradients: df/dx = (M + M^T) x, df/dM = x x^T."""
    rng = np.random.default_rng(seed)
    x, M = rng.standard_normal(n), rng.standard_normal((n, n))

    def f(x, M):
        return x @ M @ x

    return f, {"x": x, "M": M}, {"x": (M + M.T) @ x, "M": np.outer(x, x)}


# ---------------------------------------------------------------- numeric gradients


@given(seed=SEEDS)
def test_numerical_gradient_of_known_functions(seed):
    f, inputs, exact = quadratic(seed)
    scale = max(1.0, abs(f(**inputs)))  # rounding noise of the central difference ~ 1e-10 |f|
    for name in inputs:
        np.testing.assert_allclose(numerical_gradient(f, inputs, name), exact[name], rtol=1e-8, atol=1e-8 * scale)
    x = np.random.default_rng(seed).uniform(-3, 3, (2, 3))
    np.testing.assert_allclose(
        numerical_gradient(lambda x: np.sum(np.sin(x)), {"x": x}, "x"), np.cos(x), rtol=1e-8, atol=1e-9
    )


def test_numerical_gradient_at_chosen_indices_and_inputs_untouched():
    f, inputs, exact = quadratic(1)
    M_before = inputs["M"].copy()
    some = numerical_gradient(f, inputs, "M", indices=np.array([0, 5, 15]))
    np.testing.assert_allclose(some, exact["M"].reshape(-1)[[0, 5, 15]], rtol=1e-8)
    np.testing.assert_array_equal(inputs["M"], M_before)
    assert numerical_gradient(f, inputs, "M", indices=np.array([], int)).shape == (0,)


def test_float32_and_integer_inputs_are_differentiated_in_float64():
    seen = []

    def f(x):
        seen.append(x.dtype)
        return np.sum(x**2)

    g = numerical_gradient(f, {"x": np.array([1, 2], np.int32)}, "x")
    np.testing.assert_allclose(g, [2.0, 4.0], rtol=1e-9)
    check_gradients(f, {"x": np.ones(2, np.float32)}, {"x": np.full(2, 2.0)})
    assert set(seen) == {np.dtype(np.float64)}


# ---------------------------------------------------------------- check_gradients


@given(seed=SEEDS)
def test_correct_gradients_pass_with_a_full_report(seed):
    f, inputs, exact = quadratic(seed)
    report = check_gradients(f, inputs, exact)
    assert report.passed
    assert set(report.arguments) == {"x", "M"}
    assert report.arguments["M"].n_checked == report.arguments["M"].n_total == 16
    assert report.arguments["x"].max_rel_err < 1e-6


@given(seed=SEEDS, which=st.integers(0, 15), rel=st.sampled_from([1e-4, 1.0, -2.0]))
def test_a_wrong_gradient_is_caught_and_located(seed, which, rel):
    f, inputs, exact = quadratic(seed)
    wrong = exact["M"].copy()
    index = np.unravel_index(which, wrong.shape)
    # off by rel * max(|g|, 1e-3 |f|): beyond both rtol * |g| and the default atol ~ 2.2e-8 |f|
    wrong[index] += rel * max(abs(wrong[index]), 1e-3 * max(1.0, abs(f(**inputs))))
    numeric = numerical_gradient(f, inputs, "M")[index]
    with pytest.raises(GradcheckError) as info:
        check_gradients(f, inputs, {"x": exact["x"], "M": wrong})
    message = str(info.value)
    assert isinstance(info.value, AssertionError)
    assert f"gradient of 'M' is wrong at index {tuple(int(i) for i in index)}" in message
    assert f"analytic {float(wrong[index])!r}" in message
    numeric_in_message = float(re.search(r"numeric (\S+) \(", message).group(1))
    assert numeric_in_message == pytest.approx(numeric, rel=1e-12)
    assert "1 of 16 checked coordinates fail" in message
    assert "'x'" not in message  # the correct argument is not blamed
    report = info.value.report
    assert not report.passed and report.arguments["x"].passed and not report.arguments["M"].passed


def test_relative_error_is_defined_as_documented():
    # f = 3 a + 0 b: analytic off by 0.03 on a, by 1e-9 on b (true gradient 0)
    def f(a, b):
        return 3.0 * a[0] + 0.0 * b[0]

    inputs = {"a": np.array([1.0]), "b": np.array([1.0])}
    with pytest.raises(GradcheckError) as info:
        check_gradients(f, inputs, {"a": np.array([3.03]), "b": np.array([1e-9])}, atol=1e-8, rtol=1e-6)
    a, b = info.value.report.arguments["a"], info.value.report.arguments["b"]
    assert a.max_abs_err == pytest.approx(0.03, rel=1e-6)
    assert a.max_rel_err == pytest.approx(0.03 / 3.03, rel=1e-6)  # |a - n| / max(|a|, |n|)
    assert b.max_abs_err == pytest.approx(1e-9, rel=1e-3)
    assert b.max_rel_err == pytest.approx(1e-9 / (1e-8 / 1e-6), rel=1e-3)  # the floor atol / rtol
    assert not a.passed and b.passed  # |a - n| = 1e-9 <= atol


def test_non_finite_gradients_fail():
    f, inputs, exact = quadratic(2)
    bad = exact["x"].copy()
    bad[1] = np.nan
    with pytest.raises(GradcheckError, match=r"'x' is wrong at index \(1,\): analytic nan"):
        check_gradients(f, inputs, {"x": bad})


def test_sampled_mode_checks_the_requested_number_of_coordinates():
    calls = []
    weights = np.random.default_rng(0).standard_normal((30, 20))

    def f(x):
        calls.append(1)
        return np.sum(weights * x**2)

    x = np.random.default_rng(1).standard_normal((30, 20))
    report = check_gradients(f, {"x": x}, {"x": 2 * weights * x}, max_coords=25, random_state=7)
    assert report.arguments["x"].n_checked == 25 and report.arguments["x"].n_total == 600
    assert len(calls) == 1 + 2 * 25  # f(x) once for the tolerance, then two per coordinate
    same = check_gradients(f, {"x": x}, {"x": 2 * weights * x}, max_coords=25, random_state=7)
    assert same.arguments["x"].worst_index == report.arguments["x"].worst_index
    small = check_gradients(lambda x: np.sum(x**2), {"x": x[:2, :3]}, {"x": 2 * x[:2, :3]}, max_coords=25)
    assert small.arguments["x"].n_checked == small.arguments["x"].n_total == 6  # all, when few


def test_sampled_mode_finds_a_wrong_coordinate_it_draws():
    x = np.arange(1.0, 101.0)
    wrong = 2 * x
    wrong[:] *= 1.01  # every coordinate wrong: any sample must catch it
    with pytest.raises(GradcheckError, match=r"10 of 10 checked coordinates fail"):
        check_gradients(lambda x: np.sum(x**2), {"x": x}, {"x": wrong}, max_coords=10)


def test_inputs_not_checked_pass_through_unchanged():
    target = np.array([0, 2])

    def f(logits, target):
        assert target.dtype.kind == "i"  # not converted to float
        return F.cross_entropy(logits, target)[0]

    logits = np.random.default_rng(3).standard_normal((2, 3))
    check_gradients(f, {"logits": logits, "target": target}, {"logits": F.cross_entropy(logits, target)[1]})


def test_report_prints_one_line_per_argument():
    f, inputs, exact = quadratic(3)
    text = str(check_gradients(f, inputs, exact))
    assert text.splitlines()[0].startswith("gradient check (eps=1e-06, rtol=1e-06")
    lines = [line.strip() for line in text.splitlines()]
    assert any(line.startswith("M: max abs err") and line.endswith("16/16 coordinates, pass") for line in lines)


CG, NG = check_gradients, numerical_gradient
BAD_INPUT = [
    (lambda f, i, a: CG("f", i, a), TypeError, r"fn must be callable, got str"),
    (lambda f, i, a: CG(f, [1], a), TypeError, r"inputs must be a mapping"),
    (lambda f, i, a: CG(f, i, {}), TypeError, r"analytic must be a non-empty mapping"),
    (lambda f, i, a: CG(f, i, {"y": a["x"]}), ValueError, r"analytic names 'y', which is not one of the inputs"),
    (lambda f, i, a: CG(f, i, {"x": None}), ValueError, r"analytic\['x'\] is None"),
    (lambda f, i, a: CG(f, i, {"x": a["M"]}), ValueError, r"analytic\['x'\] must have the shape of inputs\['x'\]"),
    (lambda f, i, a: CG(f, i, {"x": np.array(["a"] * 4)}), TypeError, r"analytic\['x'\] must hold real numbers"),
    (lambda f, i, a: CG(f, i, a, eps=0.0), ValueError, r"eps must be in \(0, inf\), got 0.0"),
    (lambda f, i, a: CG(f, i, a, rtol=-1.0), ValueError, r"rtol must be in \(0, inf\)"),
    (lambda f, i, a: CG(f, i, a, atol=-1.0), ValueError, r"atol must be in \[0, inf\)"),
    (lambda f, i, a: CG(f, i, a, max_coords=0), ValueError, r"max_coords must be in \[1, inf\], got 0"),
    (lambda f, i, a: CG(f, i, a, max_coords=2.5), TypeError, r"max_coords must be an integer"),
    (lambda f, i, a: CG(f, i, a, max_coords=2, random_state="x"), TypeError, r"random_state must be None"),
    (lambda f, i, a: CG(lambda x, M: np.ones(2), i, a), TypeError, r"fn must return a real scalar, got ndarray"),
    (lambda f, i, a: CG(lambda x, M: "s", i, a), TypeError, r"fn must return a real scalar"),
    (lambda f, i, a: NG(f, i, "y"), ValueError, r"name must be one of the inputs \['M', 'x'\], got 'y'"),
    (lambda f, i, a: NG(f, i, "x", eps=-1.0), ValueError, r"eps must be in \(0, inf\)"),
    (lambda f, i, a: NG(f, i, "x", indices=np.array([4])), ValueError, r"flat indices in \[0, 3\], got 4..4"),
    (lambda f, i, a: NG(f, i, "x", indices=np.array([0.5])), TypeError, r"indices must be a 1-D array of integers"),
    (lambda f, i, a: NG(f, {"x": "abc", "M": 1}, "x"), TypeError, r"x must be an array of real numbers"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUT)
def test_bad_input_is_refused(call, error, match):
    f, inputs, exact = quadratic(0)
    with pytest.raises(error, match=match):
        call(f, inputs, exact)


# ---------------------------------------------------------------- run_all and its table


def test_run_all_checks_every_kernel_and_layer_and_all_pass():
    rows = run_all()
    assert rows and all(isinstance(r, GradcheckRow) for r in rows)
    failed = [r for r in rows if not r.passed]
    assert not failed, format_table(failed)
    assert all(r.max_rel_err < 1e-6 and r.n_checked == r.n_total > 0 for r in rows)
    cases = {r.case for r in rows}
    text = " | ".join(sorted(cases))
    for kernel in ["linear", "linear, no bias", "linear, frozen", "lora_linear", "lora_linear, no bias",
                   "lora_linear, dropout mask", "rsLoRA", "lora_linear, batch dims", "folded W",
                   "trainable base", "relu", "tanh", "sigmoid", "gelu (erf)", "gelu (tanh)", "dropout",
                   "mse_loss", "cross_entropy", "binary_cross_entropy_with_logits"]:  # fmt: skip
        assert kernel in text, kernel
    for layer in ["Linear", "LoRALinear", "ReLU", "Tanh", "Sigmoid", "GELU", "GELU tanh", "Sequential("]:
        assert any(c.startswith(layer) for c in cases), layer
    frozen = [r for r in rows if r.case == "linear, frozen"]
    assert [r.argument for r in frozen] == ["x"]  # no weight gradient to check for a frozen base
    lora_args = {r.argument for r in rows if r.case == "lora_linear"}
    assert lora_args == {"x", "A", "B"}
    assert {"2.lora_A.weight", "2.lora_B.weight"} <= {r.argument for r in rows if r.case.startswith("Sequential")}


def test_run_all_is_reproducible():
    assert run_all(random_state=3) == run_all(random_state=3)


def _break_dB(monkeypatch):
    """Make the LoRA backward forget the scaling in dB, in the public kernel and in the core layers call."""
    for name in ("lora_linear_backward", "lora_linear_backward_core"):
        if not hasattr(F, name):
            continue
        real = getattr(F, name)

        def forgets_the_scaling_in_dB(dy, cache, base_trainable=False, real=real):
            g = real(dy, cache, base_trainable)
            return F.LoRAGrads(x=g.x, A=g.A, B=g.B / cache.scaling, weight=g.weight, bias=g.bias)

        monkeypatch.setattr(F, name, forgets_the_scaling_in_dB)


def test_run_all_catches_a_broken_backward(monkeypatch):
    _break_dB(monkeypatch)
    rows = run_all()
    failed = {(r.case, r.argument) for r in rows if not r.passed}
    assert ("lora_linear", "B") in failed
    assert ("LoRALinear r=2", "lora_B.weight") in failed  # the layer calls the kernel, so it fails too
    assert all(r.argument in {"B", "lora_B.weight", "2.lora_B.weight"} for r in rows if not r.passed)
    table = format_table(rows)
    assert "FAIL" in table and f"{len(failed)} FAILED" in table


def test_format_table_lays_out_one_line_per_row():
    rows = [
        GradcheckRow("linear", "x", 1e-10, 2e-10, 6, 6, True),
        GradcheckRow("a longer case name", "weight", 3e-3, 0.5, 4, 12, False),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["case", "argument", "max", "abs", "err", "max", "rel", "err", "checked", "result"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["linear", "x", "1.00e-10", "2.00e-10", "6/6", "pass"]
    assert lines[3].split()[-4:] == ["3.00e-03", "5.00e-01", "4/12", "FAIL"]
    assert lines[-1] == "2 gradients in 2 cases checked by central differences: 1 FAILED"
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned


def test_docstring_example_runs():
    result = doctest.testmod(lowrank.reference.gradcheck, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- check_module_gradients


def _lora_layer(rng, n_in=5, n_out=4, **kwargs):
    layer = nn.LoRALinear(nn.Linear(n_in, n_out, dtype=np.float64, random_state=rng), random_state=rng, **kwargs)
    layer.B.data = rng.standard_normal(layer.B.shape)  # B = 0 at init would make dA = 0
    return layer


@given(seed=SEEDS, batch=st.lists(st.integers(1, 3), max_size=2), train_base=st.booleans())
def test_module_check_passes_a_correct_layer_and_names_every_trainable_parameter(seed, batch, train_base):
    rng = np.random.default_rng(seed)
    layer = _lora_layer(rng, r=2, alpha=4)
    layer.weight.trainable = layer.bias.trainable = train_base
    x = rng.standard_normal((*batch, 5))
    report = check_module_gradients(layer, x, random_state=rng)
    expected = {"x", "lora_A.weight", "lora_B.weight"} | ({"weight", "bias"} if train_base else set())
    assert report.passed and set(report.arguments) == expected
    assert all(a.n_checked == a.n_total for a in report.arguments.values())


def test_module_check_replays_dropout_masks_in_training_mode():
    """With p = 0.5 a fresh mask per forward would make every finite difference meaningless."""
    layer, twin = (_lora_layer(np.random.default_rng(1), r=2, alpha=4, dropout=0.5) for _ in range(2))
    assert layer.training
    x = np.random.default_rng(2).standard_normal((3, 5))
    assert check_module_gradients(layer, x).passed
    twin(x)  # one forward pass draws one mask
    assert layer.generator.bit_generator.state == twin.generator.bit_generator.state
    layer.eval()
    assert check_module_gradients(layer, x).passed  # and in eval mode, no mask at all


def test_module_check_of_a_model_with_a_loss_instead_of_dy():
    """An MLP with LoRA, cross-entropy on top: the scalar checked is the loss itself."""
    rng = np.random.default_rng(3)
    model = nn.Sequential(nn.Linear(5, 6, dtype=np.float64, random_state=rng), nn.Tanh(),
                          _lora_layer(rng, 6, 3, r=2, alpha=3.0))  # fmt: skip
    target = rng.integers(0, 3, size=7)
    report = check_module_gradients(model, rng.standard_normal((7, 5)), loss=lambda y: F.cross_entropy(y, target))
    assert report.passed
    assert set(report.arguments) == {"x", "0.weight", "0.bias", "2.lora_A.weight", "2.lora_B.weight"}


def test_module_check_leaves_the_module_as_it_found_it():
    rng = np.random.default_rng(4)
    layer = _lora_layer(rng, r=2)
    arrays = {name: p.data for name, p in layer.named_parameters()}
    values = {name: a.copy() for name, a in arrays.items()}
    check_module_gradients(layer, rng.standard_normal((2, 5)))
    for name, p in layer.named_parameters():
        assert p.data is arrays[name] and np.array_equal(p.data, values[name])
    assert layer.A.grad is not None and layer.weight.grad is None  # one backward pass; frozen base untouched
    with pytest.raises(RuntimeError):
        layer.backward(np.ones((2, 4)))  # no stale forward cache


def test_module_check_catches_a_broken_layer_and_names_argument_index_and_values(monkeypatch):
    _break_dB(monkeypatch)
    rng = np.random.default_rng(5)
    layer = _lora_layer(rng, r=2, alpha=4)
    with pytest.raises(GradcheckError) as info:
        check_module_gradients(layer, rng.standard_normal((3, 5)))
    message = str(info.value)
    assert re.search(r"gradient of 'lora_B.weight' is wrong at index \(\d, \d\): analytic \S+, numeric \S+", message)
    assert "'lora_A.weight'" not in message and "'x'" not in message
    report = info.value.report
    bad = report.arguments["lora_B.weight"]
    assert bad.worst_analytic == pytest.approx(bad.worst_numeric / layer.scaling, rel=1e-6)  # off by the scaling


def test_module_check_with_a_given_dy_and_sampled_coordinates():
    rng = np.random.default_rng(6)
    model = nn.Sequential(nn.Linear(8, 20, dtype=np.float64, random_state=rng), nn.GELU())
    report = check_module_gradients(model, rng.standard_normal((4, 8)), dy=np.ones((4, 20)), max_coords=10)
    assert report.passed and report.arguments["0.weight"].n_checked == 10
    assert report.arguments["0.weight"].n_total == 160


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda m, x: check_module_gradients("layer", x), TypeError, r"module must be a lowrank.nn.Module, got str"),
    (lambda m, x: check_module_gradients(m, x, dy=np.ones((2, 3)), loss=lambda y: (0.0, y)), TypeError,
     r"give dy or loss, not both"),
    (lambda m, x: check_module_gradients(m, x, loss="mse"), TypeError, r"loss must be callable"),
    (lambda m, x: check_module_gradients(m, x, dy=np.ones((3, 3))), ValueError,
     r"dy must have the shape of module\(x\), \(2, 3\), got \(3, 3\)"),
    (lambda m, x: check_module_gradients(nn.Linear(4, 3, random_state=0), x), TypeError,
     r"needs float64 parameters, got float32 for 'weight'"),
])  # fmt: skip
def test_module_check_refuses_bad_input(call, error, match):
    module, x = nn.Linear(4, 3, dtype=np.float64, random_state=0), np.ones((2, 4))
    with pytest.raises(error, match=match):
        call(module, x)


# ---------------------------------------------------------------- the command line


def test_gradcheck_command_exit_codes(monkeypatch, capsys):
    assert main(["gradcheck"]) == 0
    assert "all passed" in capsys.readouterr().out
    assert main(["gradcheck", "--seed", "-1"]) == 2  # cannot run: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("lowrank: error: gradcheck could not run:") and err.count("\n") == 1
    assert "random_state must be a non-negative int, got -1" in err
    _break_dB(monkeypatch)
    assert main(["gradcheck"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_numerical_gradient_of_a_fortran_ordered_input():
    """A Fortran-ordered input is perturbed in place too (its flat copy used to be a C-order copy: gradient 0)."""
    M = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    g = numerical_gradient(lambda M: float(np.sum(M * M)), {"M": M}, "M")
    np.testing.assert_allclose(g, 2 * M, rtol=1e-8)


def test_run_all_checks_the_lora_variants():
    """LoRA on an Embedding, on a fused projection and on a Conv1D: every argument of each is checked, and passes."""
    rows = [r for r in run_all() if r.case.startswith(("lora_embedding", "lora_merged", "LoRAEmbedding", "LoRAMerged",
                                                         "LoRALinear on Conv1D"))]  # fmt: skip
    by_case = {}
    for r in rows:
        by_case.setdefault(r.case, set()).add(r.argument)
        assert r.passed and r.n_checked == r.n_total > 0, r
    assert by_case == {
        "lora_embedding, repeated indices": {"weight", "A", "B"},
        "lora_merged_linear [q, v], dropout mask": {"x", "weight", "bias", "A", "B"},
        "LoRALinear on Conv1D (fan_in_fan_out)": {"x", "lora_A.weight", "lora_B.weight"},
        "LoRAMergedLinear [q, v] on Conv1D, dropout": {"x", "lora_A", "lora_B"},
        "LoRAEmbedding, repeated indices": {"A", "B"},
    }
