"""Every hypothesis strategy of the test suite, in one place.

Shapes and values are bounded so that each example is cheap and no example
hits overflow; properties are written once and drawn over dtypes and shapes.
Add new strategies to the section of the part of the package they serve.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

FLOAT_DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def rtol_for(dtype) -> float:
    """A comparison tolerance proportionate to the dtype's machine epsilon."""
    return 1e-4 if np.dtype(dtype) == np.float32 else 1e-10


# ---------------------------------------------------------------- factorization


@st.composite
def matrix_shapes(draw, min_side: int = 1, max_side: int = 12):
    """(m, n) with both sides in [min_side, max_side]."""
    m = draw(st.integers(min_side, max_side))
    n = draw(st.integers(min_side, max_side))
    return m, n


@st.composite
def matrices(draw, min_side: int = 1, max_side: int = 12, dtype=None):
    """A dense matrix with entries from a seeded standard normal, and its dtype."""
    m, n = draw(matrix_shapes(min_side, max_side))
    dtype = draw(FLOAT_DTYPES) if dtype is None else dtype
    seed = draw(SEEDS)
    M = np.random.default_rng(seed).standard_normal((m, n)).astype(dtype)
    return M


@st.composite
def matrices_and_ranks(draw, min_side: int = 1, max_side: int = 12, dtype=None):
    """A dense matrix and a valid rank in [1, min(m, n)]."""
    M = draw(matrices(min_side, max_side, dtype))
    rank = draw(st.integers(1, min(M.shape)))
    return M, rank


def planted(m: int, n: int, rank: int, seed: int, dtype=np.float64, decay: float | None = None):
    """A rank-``rank`` matrix U diag(s) V^T with orthonormal U, V.

    ``decay=None`` gives singular values spread in [1, 2]; otherwise
    ``s_i = decay**i``.
    """
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    V, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    s = np.linspace(2.0, 1.0, rank) if decay is None else decay ** np.arange(rank)
    return ((U * s) @ V.T).astype(dtype)


# Input dtypes of the dtype rule: float32/float64 kept, integers and bool -> float64.
INPUT_DTYPES = st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_])
BAD_DTYPES = [np.complex128, np.complex64, np.float16, object, "U3"]


def expected_float_dtype(dtype) -> np.dtype:
    """The dtype a factorization of input of ``dtype`` must return (the dtype rule)."""
    dtype = np.dtype(dtype)
    return dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float64)


def lapack_tol(dtype, size: int = 1) -> float:
    """An absolute tolerance for orthonormality and reconstruction of unit-scale data.

    LAPACK's backward error is a small multiple of ``eps * size``; 50 leaves room
    for the extra products the tests compute.
    """
    return 50.0 * float(np.finfo(np.dtype(dtype)).eps) * max(int(size), 1)


@st.composite
def any_dtype_matrices(draw, min_side: int = 1, max_side: int = 12):
    """A dense matrix of any accepted input dtype (floats, integers or bool)."""
    m, n = draw(matrix_shapes(min_side, max_side))
    dtype = np.dtype(draw(INPUT_DTYPES))
    rng = np.random.default_rng(draw(SEEDS))
    if dtype == np.bool_:
        return rng.random((m, n)) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0 if dtype.kind == "u" else -5, 6, size=(m, n)).astype(dtype)
    return rng.standard_normal((m, n)).astype(dtype)


def with_spectrum(m: int, n: int, s, seed: int, dtype=np.float64) -> np.ndarray:
    """U diag(s) V^T with random orthonormal U (m, k), V (n, k), k = len(s) <= min(m, n)."""
    s = np.asarray(s, dtype=np.float64)
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, s.size)))
    V, _ = np.linalg.qr(rng.standard_normal((n, s.size)))
    return ((U * s) @ V.T).astype(dtype)


def random_mask(shape, density: float, seed: int) -> np.ndarray:
    """A boolean mask with each entry observed with probability ``density`` (at least one)."""
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    mask.flat[rng.integers(mask.size)] = True
    return mask


def legacy_global_state() -> bytes:
    """The global ``np.random`` state, to check that a function never touches it."""
    return np.random.get_state()[1].tobytes()  # noqa: NPY002 (reading it is the point)


@st.composite
def als_problems(draw, min_side: int = 2, max_side: int = 10, max_rank: int = 3):
    """A masked ALS problem: (M, mask, rank, reg, weighted_reg, seed).

    M is float32 or float64 with NaN at every unobserved entry, so any read of one
    poisons the result; the mask keeps 30-100 % of the entries.
    """
    m, n = draw(matrix_shapes(min_side, max_side))
    dtype = draw(FLOAT_DTYPES)
    seed = draw(SEEDS)
    rank = draw(st.integers(1, min(max_rank, m, n)))
    density = draw(st.sampled_from([0.3, 0.6, 1.0]))
    mask = random_mask((m, n), density, seed)
    M = np.random.default_rng(seed + 1).standard_normal((m, n)).astype(dtype)
    M[~mask] = np.nan
    reg = draw(st.sampled_from([0.0, 1e-3, 0.1, 2.0]))
    weighted_reg = draw(st.booleans())
    return M, mask, rank, reg, weighted_reg, seed


# ---------------------------------------------------------------- nn


# nn modules (tests/nn/test_modules.py)


@st.composite
def batch_shapes(draw, max_dims: int = 2, max_side: int = 5):
    """Leading batch dimensions of a layer input: () up to ``max_dims`` sides in [1, max_side]."""
    return tuple(draw(st.lists(st.integers(1, max_side), min_size=0, max_size=max_dims)))


@st.composite
def lora_layer_configs(draw, max_features: int = 8, dtype=None):
    """A small LoRA layer to build: sizes, a rank valid for every init (PiSSA's too),
    alpha, rsLoRA, bias, dtype, batch shape and a seed."""
    in_features = draw(st.integers(1, max_features))
    out_features = draw(st.integers(1, max_features))
    return {
        "in_features": in_features,
        "out_features": out_features,
        "r": draw(st.integers(1, min(in_features, out_features))),
        "alpha": draw(st.floats(0.25, 16.0, allow_nan=False, allow_infinity=False)),
        "use_rslora": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "dtype": draw(FLOAT_DTYPES) if dtype is None else dtype,
        "batch_shape": draw(batch_shapes()),
        "seed": draw(SEEDS),
    }


# whole models: MLP, inject_lora, merge_lora, fit (tests/nn/test_lora_model.py, tests/test_train.py)

ACTIVATION_NAMES = st.sampled_from(["relu", "tanh", "sigmoid", "gelu", "gelu_tanh"])


@st.composite
def mlp_sizes(draw, min_layers: int = 1, max_layers: int = 3, max_width: int = 6):
    """Layer widths of a small MLP: ``min_layers`` to ``max_layers`` Linear layers, widths in [1, max_width]."""
    n_layers = draw(st.integers(min_layers, max_layers))
    return [draw(st.integers(1, max_width)) for _ in range(n_layers + 1)]


@st.composite
def adapted_mlp_configs(draw, max_width: int = 6, dtype=None):
    """An MLP to adapt with LoRA: sizes (2 or 3 Linear layers), activation, dtype, r (<= every
    layer's min side, so PiSSA works too), alpha, rsLoRA, a non-empty subset of Linear names
    to target (None: all of them) and a seed."""
    sizes = draw(mlp_sizes(min_layers=2, max_layers=3, max_width=max_width))
    names = [str(2 * i) for i in range(len(sizes) - 1)]
    subset = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    return {
        "sizes": sizes,
        "activation": draw(ACTIVATION_NAMES),
        "dtype": draw(FLOAT_DTYPES) if dtype is None else dtype,
        "r": draw(st.integers(1, min(sizes))),
        "alpha": draw(st.floats(0.25, 16.0, allow_nan=False, allow_infinity=False)),
        "use_rslora": draw(st.booleans()),
        "targets": draw(st.none() | st.just(sorted(subset, key=int))),
        "seed": draw(SEEDS),
    }


# nn functional kernels and the gradient checker (tests/nn/test_functional.py, tests/test_gradcheck.py)


@st.composite
def linear_problems(draw, dtype=np.float64, bias=None):
    """Inputs of ``F.linear`` and an upstream gradient: x (*batch, in), weight (out, in),
    bias (out,) or None, dy (*batch, out); 0 to 2 leading batch dims."""
    batch = draw(batch_shapes(max_dims=2, max_side=4))
    n_in, n_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    with_bias = draw(st.booleans()) if bias is None else bias
    rng = np.random.default_rng(draw(SEEDS))
    return {
        "x": rng.standard_normal((*batch, n_in)).astype(dtype),
        "weight": rng.standard_normal((n_out, n_in)).astype(dtype),
        "bias": rng.standard_normal(n_out).astype(dtype) if with_bias else None,
        "dy": rng.standard_normal((*batch, n_out)).astype(dtype),
    }


@st.composite
def lora_problems(draw, dtype=np.float64, bias=None, dropout=None):
    """Inputs of ``F.lora_linear`` and an upstream gradient: x, weight, bias (or None), A (r, in),
    B (out, r) nonzero, scaling (alpha / r or rsLoRA's alpha / sqrt(r)), dropout_mask (or None), dy.

    Batches run from 1 row to 16, so both evaluation orders (folded weight or not) are drawn.
    """
    problem = draw(linear_problems(dtype=dtype, bias=bias))
    n_out, n_in = problem["weight"].shape
    r = draw(st.integers(1, 4))
    alpha = draw(st.floats(0.25, 16.0, allow_nan=False, allow_infinity=False))
    scaling = alpha / np.sqrt(r) if draw(st.booleans()) else alpha / r
    with_dropout = draw(st.booleans()) if dropout is None else dropout
    p = draw(st.floats(0.1, 0.7)) if with_dropout else 0.0
    rng = np.random.default_rng(draw(SEEDS))
    x_shape = problem["x"].shape
    # the mask either has x's shape or broadcasts to it (one mask shared by the batch)
    mask_shape = x_shape if draw(st.booleans()) else x_shape[-1:]
    keep = rng.random(mask_shape) >= p
    problem.update(
        A=rng.standard_normal((r, n_in)).astype(dtype),
        B=rng.standard_normal((n_out, r)).astype(dtype),
        scaling=float(scaling),
        dropout_mask=(keep / (1 - p)).astype(dtype) if with_dropout else None,
    )
    return problem


@st.composite
def elementwise_inputs(draw, dtype=np.float64, scale: float = 3.0, away_from_zero: float = 0.0):
    """An array of 0 to 2 batch dims plus a feature axis, entries of size up to ``scale``;
    with ``away_from_zero > 0`` every entry has magnitude at least that (relu's kink)."""
    shape = (*draw(batch_shapes(max_dims=2, max_side=4)), draw(st.integers(1, 5)))
    rng = np.random.default_rng(draw(SEEDS))
    x = rng.uniform(-scale, scale, shape)
    if away_from_zero > 0:
        x = np.sign(x + (x == 0)) * (away_from_zero + np.abs(x))
    return x.astype(dtype)


# ---------------------------------------------------------------- optim / data
# (tests/nn/test_optim.py, tests/test_data.py)


@st.composite
def sgd_hyper(draw):
    """Valid SGD keyword arguments; Nesterov only with momentum > 0 and no dampening."""
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]) | st.floats(0.0, 0.99))
    nesterov = momentum > 0 and draw(st.booleans())
    return {
        "lr": draw(st.floats(1e-3, 1.0)),
        "momentum": momentum,
        "dampening": 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1, 0.5])),
        "nesterov": nesterov,
        "weight_decay": draw(st.sampled_from([0.0, 1e-2, 0.3])),
    }


@st.composite
def adam_hyper(draw):
    """Valid Adam/AdamW keyword arguments, betas away from 1 so bias corrections stay O(1)."""
    return {
        "lr": draw(st.floats(1e-3, 0.5)),
        "betas": (draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.999))),
        "eps": draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-2, 0.3])),
    }


@st.composite
def optimizer_problems(draw, n_steps: int = 3, dtype=None):
    """A small parameter value and ``n_steps`` gradients for it: (theta0, [g_1, ...]), one dtype.

    Entries are standard normal, so every update is O(lr) and no example overflows.
    """
    shape = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    dtype = draw(FLOAT_DTYPES) if dtype is None else dtype
    rng = np.random.default_rng(draw(SEEDS))
    theta0 = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(n_steps)]
    return theta0, grads
