"""lowrank.precision: rounding against ml_dtypes and exact rationals, kernels and bounds against float64.

Independent references: ml_dtypes' casts (every 16-bit pattern, and 2**20
random float32 values with ties, subnormals and overflow), NumPy's own
float64 -> float16 cast (direct, rounded once), exact rational arithmetic
(``fractions.Fraction``) for hand-picked values, and float64 evaluation of
the layer for the kernels and their bounds.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowrank
from lowrank import precision as P

# (p, emin, emax) of each format, written out again here, from IEEE 754 and the bfloat16 definition
SPEC = {"bfloat16": (8, -126, 127), "float16": (11, -14, 15), "float32": (24, -126, 127)}


def exact_round(x: float, fmt: str) -> float:
    """The value of ``fmt`` nearest the exact rational value of ``x``, ties to even (IEEE overflow rule)."""
    p, emin, emax = SPEC[fmt]
    if np.isnan(x) or np.isinf(x) or x == 0:
        return x
    q = Fraction(x)
    e = abs(q).numerator.bit_length() - abs(q).denominator.bit_length()  # floor(log2 |q|) or one more
    if Fraction(2) ** e > abs(q):
        e -= 1
    e = max(e, emin)  # below the normal range the grid stays that of 2**emin: subnormals
    quantum = Fraction(2) ** (e - p + 1)
    n = q / quantum
    lo = n.numerator // n.denominator
    rest = n - lo
    n_r = lo + 1 if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and lo % 2) else lo
    r = n_r * quantum
    largest = (2 - Fraction(2) ** (1 - p)) * Fraction(2) ** emax
    if abs(r) > largest:
        return float(np.copysign(np.inf, x))
    return float(r) if r != 0 else float(np.copysign(0.0, x))


HAND_PICKED = [
    (1 + 2**-8, "bfloat16", 1.0),  # a tie: to the even neighbour 1
    (1 + 3 * 2**-8, "bfloat16", 1 + 2**-6),  # a tie: up to the even 1 + 2**-6
    (1 + 2**-8 + 2**-20, "bfloat16", 1 + 2**-7),  # past the tie
    (1 + 2**-11, "float16", 1.0),
    (1 + 3 * 2**-11, "float16", 1 + 2**-9),
    (65504.0, "float16", 65504.0),  # the largest float16
    (65519.99, "float16", 65504.0),  # below half a unit past it: stays finite
    (65520.0, "float16", np.inf),  # half a unit past: overflows
    (-65520.0, "float16", -np.inf),
    (2**-24, "float16", 2**-24),  # the smallest subnormal
    (2**-25, "float16", 0.0),  # half of it: a tie, to the even 0
    (1.5 * 2**-25, "float16", 2**-24),
    (3 * 2**-25, "float16", 2**-23),  # a tie on the subnormal grid, up to the even 2 * 2**-24
    (2**-133, "bfloat16", 2**-133),  # bfloat16's smallest subnormal
    (2**-134, "bfloat16", 0.0),
    (3.3895313892515355e38, "bfloat16", 3.3895313892515355e38),  # the largest bfloat16
    (3.4e38, "bfloat16", np.inf),
    (1 + 2**-8 + 2**-30, "bfloat16", 1 + 2**-7),  # float64 only: rounded once (through float32: 1.0)
    (1 + 2**-24 + 2**-40, "float32", 1 + 2**-23),
]


@pytest.mark.parametrize(("x", "fmt", "want"), HAND_PICKED)
def test_hand_picked_values_round_as_exact_arithmetic_says(x, fmt, want):
    assert exact_round(x, fmt) == want  # the reference agrees with the hand-written answer
    got = P.round_to(np.array([x]), fmt)
    assert got.dtype == np.float64 and got[0] == want
    if float(np.float32(x)) == x:  # representable in float32: the float32 path too
        got32 = P.round_to(np.array([x], np.float32), fmt)
        assert got32.dtype == np.float32 and got32[0] == np.float32(want)


@given(
    hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(allow_nan=False, width=64)),
    st.sampled_from(P.FORMATS),
)
def test_float64_values_round_once_to_the_nearest_value(values, fmt):
    got = P.round_to(values, fmt)
    want = np.array([exact_round(float(v), fmt) for v in values])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


@given(
    hnp.arrays(np.float32, st.integers(1, 20), elements=st.floats(allow_nan=False, width=32)),
    st.sampled_from(P.FORMATS),
)
def test_float32_values_round_to_the_nearest_value(values, fmt):
    got = P.round_to(values, fmt)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([exact_round(float(v), fmt) for v in values], np.float32))


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_float64_ties_and_near_ties_round_once_as_exact_arithmetic_says(fmt):
    """Exact float16/bfloat16 ties, and values 2**-40 past them, from the subnormals to overflow."""
    rng = np.random.default_rng(0)
    p = SPEC[fmt][0]
    k = rng.integers(2 ** (p - 1), 2**p, 4096) * rng.choice([-1, 1], 4096)  # p-bit integers, either sign
    ties = (k + np.sign(k) * 0.5) * 2.0 ** rng.integers(-40, 6, 4096)  # p + 1 bits: halfway between two
    spread = np.ldexp(rng.uniform(-2, 2, 2048), rng.integers(-30, 18, 2048))  # subnormal to overflow
    x = np.concatenate([ties, ties + 2.0**-40 * np.sign(ties), spread])
    want = np.array([exact_round(float(v), fmt) for v in x])
    np.testing.assert_array_equal(P.round_to(x, fmt), want)


def test_unit_roundoff_and_smallest_subnormal():
    assert [P.unit_roundoff(f) for f in (*P.FORMATS, "float64")] == [2**-8, 2**-11, 2**-24, 2**-53]
    assert [P.smallest_subnormal(f) for f in P.FORMATS] == [2**-133, 2**-24, 2**-149]
    assert np.float32(P.smallest_subnormal("float32")) == np.nextafter(np.float32(0), np.float32(1))


def test_nan_stays_nan_with_its_sign():
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF], np.uint32).view(np.float32)
    for fmt in P.FORMATS:
        out = P.round_to(nans, fmt)
        assert np.isnan(out).all() and (np.signbit(out) == np.signbit(nans)).all()
        with np.errstate(invalid="ignore"):  # widening a signalling NaN
            wide = nans.astype(np.float64)
        assert np.isnan(P.round_to(wide, fmt)).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="fmt must be one of 'bfloat16', 'float16', 'float32', got 'bf16'"):
        P.round_to(np.ones(2), "bf16")
    with pytest.raises(TypeError, match="x must hold real numbers"):
        P.round_to(np.ones(2, np.complex64), "bfloat16")
    with pytest.raises(ValueError, match="fmt must be one of 'bfloat16', 'float16', got 'float32'"):
        P.to_bits(np.ones(2), "float32")
    with pytest.raises(TypeError, match="bits must be a 16-bit integer array, got dtype float32"):
        P.from_bits(np.ones(2, np.float32), "float16")


def test_float16_input_computes_and_returns_float32():
    x = np.array([1.5, -2**-24, 65504], np.float16)
    out = P.round_to(x, "bfloat16")
    assert out.dtype == np.float32 and out.tolist() == [1.5, -(2**-24), 65536.0]
    assert lowrank.truncated_svd(np.eye(3, dtype=np.float16), 1).U.dtype == np.float32
    assert lowrank.nn.Parameter(np.ones(2, np.float16)).dtype == np.float32
    assert lowrank.nn.functional.relu(np.array([-1, 2], np.float16))[0].dtype == np.float32


# ---------------------------------------------------------------- against ml_dtypes


@pytest.fixture(scope="module")
def ml_dtypes():
    return pytest.importorskip("ml_dtypes")


def _their_type(ml_dtypes, fmt):
    return {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[fmt]


def _assert_same_values(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Bit for bit, except that a NaN only has to be a NaN (payloads differ between implementations)."""
    nan = np.isnan(theirs)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours.view(np.uint32)[~nan], theirs.view(np.uint32)[~nan])


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_every_16_bit_pattern_reads_like_ml_dtypes_and_rounds_back_to_itself(ml_dtypes, fmt):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = P.from_bits(bits, fmt)
    _assert_same_values(values, bits.view(_their_type(ml_dtypes, fmt)).astype(np.float32))
    _assert_same_values(P.round_to(values, fmt), values)
    back = P.to_bits(values, fmt)
    nan = np.isnan(values)
    np.testing.assert_array_equal(back[~nan], bits[~nan])
    assert np.isnan(P.from_bits(back[nan], fmt)).all()


def _random_float32(fmt: str) -> np.ndarray:
    """2**20 random patterns (every exponent: subnormals, inf, NaN) plus exact ties, near-ties and overflow."""
    rng = np.random.default_rng(12)
    patterns = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    grid = P.from_bits(rng.integers(0, 1 << 16, 1 << 16, dtype=np.uint64).astype(np.uint16), fmt)
    grid = grid[np.isfinite(grid)].astype(np.float64)
    up = P.from_bits(P.to_bits(grid, fmt) + np.uint16(1), fmt).astype(np.float64)  # the next pattern
    ok = np.isfinite(up) & (np.sign(up) == np.sign(grid))
    ties = ((grid[ok] + up[ok]) / 2).astype(np.float32)  # exact: the midpoint has p + 1 bits
    nudged = np.concatenate([np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    largest = float(np.max(grid[ok]))
    edge = np.float32(largest) * (1 + np.linspace(-1, 1, 4097, dtype=np.float32) * np.float32(2**-7))
    return np.concatenate([patterns, ties, nudged, edge, -edge])


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_a_million_float32_values_round_like_ml_dtypes(ml_dtypes, fmt):
    x = _random_float32(fmt)
    assert x.size >= 10**6
    with np.errstate(over="ignore", invalid="ignore"):
        theirs = x.astype(_their_type(ml_dtypes, fmt))
    _assert_same_values(P.round_to(x, fmt), theirs.astype(np.float32))
    ours_bits = P.to_bits(x, fmt)
    finite = ~np.isnan(theirs)
    np.testing.assert_array_equal(ours_bits[finite], theirs.view(np.uint16)[finite])


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_a_million_float64_values_round_once_like_ml_dtypes(ml_dtypes, fmt):
    """ml_dtypes casts float64 directly, rounding once, as lowrank does; near-ties are where it matters."""
    x32 = _random_float32(fmt)
    x32 = x32[np.isfinite(x32)].astype(np.float64)
    nudge = np.ldexp(np.abs(x32), -30)  # well below float32's resolution: rounding twice would lose it
    x = np.concatenate([x32, x32 + nudge, x32 - nudge])
    with np.errstate(over="ignore"):
        theirs = x.astype(_their_type(ml_dtypes, fmt)).astype(np.float64)
    np.testing.assert_array_equal(P.round_to(x, fmt), theirs)
    assert P.round_to(np.array([1 + 2**-8 + 2**-30]), "bfloat16")[0] == 1 + 2**-7  # through float32: 1.0


# ---------------------------------------------------------------- kernels and bounds

FORMS = ("unmerged", "merged", "remerged")


@st.composite
def layers(draw, max_features: int = 12, max_rank: int = 4):
    """A LoRA layer in float64: x (batch, in), W (out, in), bias or None, A (r, in), B (out, r), scaling."""
    n, d_in, d_out = (draw(st.integers(1, max_features)) for _ in range(3))
    r = draw(st.integers(1, max_rank))
    values = st.floats(-4, 4, allow_nan=False, allow_infinity=False)  # subnormals included: the h terms
    arr = lambda shape: draw(hnp.arrays(np.float64, shape, elements=values))  # noqa: E731
    x, W, A, B = arr((n, d_in)), arr((d_out, d_in)), arr((r, d_in)), arr((d_out, r))
    bias = draw(st.none() | st.just(arr((d_out,))))
    scaling = draw(st.floats(-8, 8, allow_nan=False))
    if draw(st.booleans()):
        x = np.ascontiguousarray(x[:, ::-1])[:, ::-1]  # a negative-stride view
    return x, W, bias, A, B, scaling


def _emulated(x, W, bias, A, B, s, fmt, form):
    if form == "unmerged":
        return P.lora_linear(x, W, bias, A, B, s, fmt)[0]
    merged = P.lora_merge(W, A, B, s, fmt)
    return P.linear(x, merged if form == "merged" else P.lora_unmerge(merged, A, B, s, fmt), bias, fmt)


def _exact(x, W, bias, A, B, s, form):
    y = x @ W.T + (0 if bias is None else bias)
    return y if form == "remerged" else y + s * ((x @ A.T) @ B.T)


@given(layers(), st.sampled_from(P.FORMATS), st.sampled_from(FORMS))
def test_the_emulated_error_never_exceeds_the_bound(layer, fmt, form):
    x, W, bias, A, B, s = layer
    y_hat = _emulated(x, W, bias, A, B, s, fmt, form)
    assert y_hat.dtype == np.float32
    np.testing.assert_array_equal(P.round_to(y_hat, fmt), y_hat)  # values of the format
    err = np.abs(y_hat - _exact(x, W, bias, A, B, s, form))
    bound = P.lora_linear_bound(x, W, bias, A, B, s, fmt, form)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"error {err[worst]} over the bound {bound[worst]} at {worst}"


@given(layers(), st.sampled_from(P.FORMATS), st.booleans())
def test_the_merged_weight_stays_within_its_bound(layer, fmt, unmerge):
    _, W, _, A, B, s = layer
    merged = P.lora_merge(W, A, B, s, fmt)
    got, want = (P.lora_unmerge(merged, A, B, s, fmt), W) if unmerge else (merged, W + s * (B @ A))
    assert (np.abs(got - want) <= P.lora_merge_bound(W, A, B, s, fmt, unmerge=unmerge)).all()


# Typical data: x ~ N(0, 1), W and A ~ U(±1/sqrt(in)) (kaiming), B ~ N(0, 0.1), bias ~ N(0, 0.1), s = 2,
# in = 256. The bound over the largest ratio error / bound over the layer's outputs, measured
# (docs/precision.md): bfloat16 20 (unmerged), 25 (merged), 47 (merged then unmerged); float16 27,
# 25, 46; float32 163, 156, 91. The bound is a worst case over summation orders and signs, so it grows
# like k where typical errors grow like sqrt(k).
LOOSENESS = {"bfloat16": 60, "float16": 60, "float32": 250}


@pytest.mark.parametrize("fmt", P.FORMATS)
@pytest.mark.parametrize("form", FORMS)
def test_the_bound_is_not_loose_by_more_than_the_stated_factor_on_typical_data(fmt, form):
    rng = np.random.default_rng(3)
    n, d_in, d_out, r = 128, 256, 128, 8
    x = rng.standard_normal((n, d_in))
    W, A = rng.uniform(-1, 1, (d_out, d_in)) / 16, rng.uniform(-1, 1, (r, d_in)) / 16
    B, bias = 0.1 * rng.standard_normal((d_out, r)), 0.1 * rng.standard_normal(d_out)
    err = np.abs(_emulated(x, W, bias, A, B, 2.0, fmt, form) - _exact(x, W, bias, A, B, 2.0, form))
    ratio = err / P.lora_linear_bound(x, W, bias, A, B, 2.0, fmt, form)
    assert ratio.max() <= 1
    assert ratio.max() >= 1 / LOOSENESS[fmt]


def test_a_kernel_that_accumulates_in_bfloat16_breaks_the_bound():
    """The bound has teeth: forgetting float32 accumulation is caught on an ordinary layer."""
    rng = np.random.default_rng(5)
    x, W = rng.uniform(0, 1, (16, 512)), rng.uniform(0, 1, (8, 512)) / 16  # e.g. after a ReLU
    xr, wr = P.round_to(x, "bfloat16"), P.round_to(W, "bfloat16")
    acc = np.zeros((16, 8))
    for j in range(512):  # every partial sum rounded to bfloat16
        acc = P.round_to(acc + P.round_to(xr[:, j : j + 1] * wr[:, j], "bfloat16"), "bfloat16")
    zero_a, zero_b = np.zeros((1, 512)), np.zeros((8, 1))
    bound = P.lora_linear_bound(x, W, None, zero_a, zero_b, 1.0, "bfloat16")
    assert (np.abs(acc - x @ W.T) > bound).any()


def test_small_integers_give_exact_results_through_every_stage():
    """Exact products and sums: the emulation must return the exact value (wiring, transposes, scaling)."""
    rng = np.random.default_rng(1)
    x, W = rng.integers(-3, 4, (5, 6)).astype(np.float64), rng.integers(-3, 4, (4, 6)).astype(np.float64)
    A, B, bias = rng.integers(-3, 4, (2, 6)), rng.integers(-3, 4, (4, 2)), rng.integers(-3, 4, 4)
    want = x @ W.T + bias + 2.0 * ((x @ A.T) @ B.T)
    for fmt in P.FORMATS:
        y, cache = P.lora_linear(x, W, bias, A, B, 2.0, fmt)
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(P.linear(x, P.lora_merge(W, A, B, 2.0, fmt), bias, fmt), want)
        dy = rng.integers(-3, 4, (5, 4)).astype(np.float64)
        g = P.lora_linear_backward(dy, cache)
        np.testing.assert_array_equal(g.x, dy @ W + 2.0 * (dy @ B) @ A)
        np.testing.assert_array_equal(g.A, 2.0 * (dy @ B).T @ x)
        np.testing.assert_array_equal(g.B, 2.0 * dy.T @ (x @ A.T))


def test_each_stage_rounds_to_the_format():
    """``t = x @ A.T`` is rounded before ``B`` reads it: 1 + 2**-8 becomes 1, so y = 256, not 257."""
    x, A, B = np.array([[1.0, 2**-8]]), np.array([[1.0, 1.0]]), np.array([[256.0]])
    y, _ = P.lora_linear(x, np.zeros((1, 2)), None, A, B, 1.0, "bfloat16")
    assert y[0, 0] == 256.0
    y32, _ = P.lora_linear(x, np.zeros((1, 2)), None, A, B, 1.0, "float32")
    assert y32[0, 0] == 257.0


def test_kernels_refuse_bad_input():
    x, W, A, B = np.ones((2, 3)), np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"x must have shape \(..., 3\)"):
        P.lora_linear(np.ones((2, 5)), W, None, A, B, 1.0)
    with pytest.raises(ValueError, match=r"B must have shape \(4, 2\), got \(2, 4\)"):
        P.lora_linear(x, W, None, A, B.T, 1.0)
    with pytest.raises(ValueError, match="scaling must be in"):
        P.lora_merge(W, A, B, np.inf)
    with pytest.raises(ValueError, match="form must be one of"):
        P.lora_linear_bound(x, W, None, A, B, 1.0, "bfloat16", form="fused")
    _, cache = P.lora_linear(x, W, None, A, B, 1.0)
    with pytest.raises(ValueError, match=r"dy must have the output's shape \(2, 4\)"):
        P.lora_linear_backward(np.ones((2, 3)), cache)
    with pytest.raises(TypeError, match="cache must be the PrecisionLoRACache"):
        P.lora_linear_backward(np.ones((2, 4)), None)


def test_precision_loads_lazily_and_imports_numpy_only():
    assert lowrank.precision is P
    assert "lowrank.precision" in dir(lowrank) or "precision" in dir(lowrank)


# ---------------------------------------------------------------- the command line


def test_cli_round_prints_the_value_and_its_bits(capsys):
    from lowrank.cli import main

    assert main(["precision", "round", "1.00390625", "70000", "--to", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "1.00390625 -> 1.0  bits 0x3f80" in out and "70000.0 -> 70144.0  bits 0x4789" in out
    assert main(["precision", "round", "65520", "--to", "float16", "--json"]) == 0
    assert '"rounded": Infinity, "bits": "0x7c00"' in capsys.readouterr().out


def test_cli_bound_reports_errors_within_bounds_and_exits_0(capsys):
    import json

    from lowrank.cli import main

    assert main(["precision", "bound", "--shape", "8,32,16,4", "--fmt", "float16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["within_bounds"] and [row["form"] for row in report["forms"]] == list(FORMS)
    assert all(0 < row["max_error"] <= row["max_bound"] for row in report["forms"])


def _adapter_and_base(tmp_path, fan_in_fan_out):
    """A PEFT-style adapter on two Linear layers (one of them with r=2 by rank_pattern) and its base file."""
    import json

    from lowrank.io import save_safetensors

    rng = np.random.default_rng(0)
    shapes = {"h.0.attn": (24, 12), "h.1.mlp": (10, 24)}  # (out, in), none square: a transposition shows
    base, tensors = {}, {}
    for name, (n_out, n_in) in shapes.items():
        W = rng.uniform(-0.3, 0.3, (n_out, n_in))
        base[f"{name}.weight"] = W.T.copy() if fan_in_fan_out else W  # Conv1D stores (in, out)
        r = 2 if name == "h.1.mlp" else 4
        tensors[f"base_model.model.{name}.lora_A.weight"] = rng.standard_normal((r, n_in)) / 4
        tensors[f"base_model.model.{name}.lora_B.weight"] = rng.standard_normal((n_out, r)) / 4
    base["h.0.ln.weight"] = np.ones(12)
    save_safetensors(tmp_path / "base.safetensors", base, dtypes="bfloat16")
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["attn", "mlp"],
              "rank_pattern": {"h.1.mlp": 2}, "fan_in_fan_out": fan_in_fan_out}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_safetensors(folder / "adapter_model.safetensors", tensors)
    return folder, tmp_path / "base.safetensors"


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_cli_bound_of_a_real_adapter_reports_every_adapted_weight(tmp_path, capsys, fan_in_fan_out):
    import json

    from lowrank.cli import main

    folder, base = _adapter_and_base(tmp_path, fan_in_fan_out)
    argv = ["precision", "bound", "--adapter", str(folder), "--base", str(base), "--rows", "5", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["within_bounds"] and report["rows"] == 5
    got = {m["module"]: (m["shape"], m["scaling"], m["stored"]) for m in report["modules"]}
    assert got == {"h.0.attn": ([5, 12, 24, 4], 2.0, "BF16"), "h.1.mlp": ([5, 24, 10, 2], 4.0, "BF16")}
    for m in report["modules"]:
        assert [row["form"] for row in m["forms"]] == list(FORMS)
        assert all(0 < row["max_error"] <= row["max_bound"] for row in m["forms"])
    assert main(argv[:-1]) == 0
    out = capsys.readouterr().out
    assert "h.0.attn  (12x24, r=4, scaling=2, stored BF16)" in out and "every error within its bound" in out


def test_cli_bound_of_an_adapter_refuses_what_does_not_fit_in_one_line(tmp_path, capsys):
    import json

    from lowrank.cli import main

    folder, base = _adapter_and_base(tmp_path, fan_in_fan_out=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    assert main(["precision", "bound", "--adapter", str(folder), "--base", str(base)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fan_in_fan_out=True would fit" in err
    for argv in (["--adapter", str(folder)], ["--adapter", str(folder), "--base", str(base), "--shape", "8,32,16,4"],
                 ["--adapter", str(folder), "--base", str(base), "--alpha", "3"], []):  # fmt: skip
        assert main(["precision", "bound", *argv]) == 2
        assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [["precision", "bound", "--shape", "8,32,16"], ["precision", "bound", "--shape", "8,32,16,64"],
     ["precision", "round", "x"], ["precision", "round", "1", "--to", "int8"]],
)
def test_cli_refuses_bad_arguments_with_exit_code_2(argv, capsys):
    from lowrank.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowrank: error:") and err.count("\n") == 1


def test_a_dora_adapter_is_refused_by_adapted_weights_and_the_cli(tmp_path, capsys):
    import json

    from lowrank.cli import main
    from lowrank.io import save_safetensors
    from lowrank.io.adapter import adapted_weights

    folder, base = _adapter_and_base(tmp_path, fan_in_fan_out=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    from lowrank.io import load_safetensors

    tensors = load_safetensors(folder / "adapter_model.safetensors")
    tensors["base_model.model.h.0.attn.lora_magnitude_vector"] = np.ones(24)
    tensors["base_model.model.h.1.mlp.lora_magnitude_vector"] = np.ones(10)
    save_safetensors(folder / "adapter_model.safetensors", tensors)
    with pytest.raises(ValueError, match="a DoRA adapter"):
        next(adapted_weights(base, folder))
    assert main(["precision", "bound", "--adapter", str(folder), "--base", str(base)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DoRA" in err
