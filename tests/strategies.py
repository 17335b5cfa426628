"""Every hypothesis strategy of the test suite, in one place.

Strategies draw the values themselves (``hypothesis.extra.numpy.arrays`` of
bounded finite floats), never a seed for ``numpy.random.default_rng``: so a
failure shrinks to a small, readable array, and the examples are hypothesis's
own, edge values (0, equal entries, the bounds) included. Arrays come in
several memory layouts (C, Fortran, every other entry of a bigger array,
reversed along an axis) so the code under test meets non-contiguous and
negative-stride views. Shapes and values are bounded so that each example is
cheap and none overflows. ``SEEDS`` remains, for the ``random_state``
argument of the functions under test. Add new strategies to the section of
the part of the package they serve. A few plain helpers that several test
files share sit beside them (tolerances, the SVD sign rule written out).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FLOAT_DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def rtol_for(dtype) -> float:
    """A comparison tolerance proportionate to the dtype's machine epsilon."""
    return 1e-4 if np.dtype(dtype) == np.float32 else 1e-10


# ---------------------------------------------------------------- arrays and their layouts


def float_elements(dtype=np.float64, bound: float = 4.0, min_magnitude: float = 0.0):
    """Finite floats in ``[-bound, bound]`` representable in ``dtype`` (no NaN, inf or subnormal).

    With ``min_magnitude > 0`` every value has at least that magnitude.
    """
    width = 32 if np.dtype(dtype) == np.float32 else 64
    if width == 32:  # hypothesis wants bounds representable at the width: round them inwards
        bound = float(np.nextafter(np.float32(bound), np.float32(0))) if np.float32(bound) > bound else bound
        if min_magnitude > 0 and np.float32(min_magnitude) < min_magnitude:
            min_magnitude = float(np.nextafter(np.float32(min_magnitude), np.float32(np.inf)))
        bound, min_magnitude = float(np.float32(bound)), float(np.float32(min_magnitude))
    if min_magnitude > 0:
        positive = st.floats(min_magnitude, bound, allow_subnormal=False, width=width)
        return positive | positive.map(lambda v: -v)
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=width)


def float_arrays(dtype, shape, bound: float = 4.0, min_magnitude: float = 0.0):
    """A C-contiguous array of ``shape`` with entries from :func:`float_elements`."""
    return hnp.arrays(np.dtype(dtype), tuple(shape), elements=float_elements(dtype, bound, min_magnitude))


LAYOUTS = ("C", "F", "strided", "reversed")


def float_views(dtype, shape, bound: float = 4.0, min_magnitude: float = 0.0, layouts=LAYOUTS):
    """Entries from :func:`float_elements` in a drawn memory layout (:func:`laid_out`)."""
    return laid_out(dtype, shape, float_elements(dtype, bound, min_magnitude), layouts)


def _elements_for(dtype, elements):
    if elements is not None:
        return elements
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return st.booleans()
    if dtype.kind in "iu":
        return st.integers(0 if dtype.kind == "u" else -5, 5)
    return float_elements(dtype)


@st.composite
def strided_views(draw, dtype, shape, elements=None):
    """A non-contiguous view of ``shape``: every other entry, along a drawn axis, of a drawn array
    twice as long there."""
    shape = tuple(shape)
    if not shape:
        return draw(hnp.arrays(np.dtype(dtype), shape, elements=_elements_for(dtype, elements)))
    axis = draw(st.integers(0, len(shape) - 1))
    big = tuple(2 * side if i == axis else side for i, side in enumerate(shape))
    base = draw(hnp.arrays(np.dtype(dtype), big, elements=_elements_for(dtype, elements)))
    return base[(slice(None),) * axis + (slice(None, None, 2),)]


@st.composite
def reversed_views(draw, dtype, shape, elements=None):
    """A negative-stride view of ``shape``: a drawn array reversed (``[::-1]``) along a drawn axis."""
    arr = draw(hnp.arrays(np.dtype(dtype), tuple(shape), elements=_elements_for(dtype, elements)))
    if arr.ndim == 0:
        return arr
    return np.flip(arr, draw(st.integers(0, arr.ndim - 1)))


@st.composite
def laid_out(draw, dtype, shape, elements=None, layouts=LAYOUTS):
    """An array of ``shape`` and drawn values in a drawn memory layout: C or Fortran order,
    a strided view (:func:`strided_views`) or a negative-stride one (:func:`reversed_views`)."""
    layout = draw(st.sampled_from(layouts))
    if layout == "strided":
        return draw(strided_views(dtype, shape, elements))
    if layout == "reversed":
        return draw(reversed_views(dtype, shape, elements))
    arr = draw(hnp.arrays(np.dtype(dtype), tuple(shape), elements=_elements_for(dtype, elements)))
    return np.asfortranarray(arr) if layout == "F" else arr


# ---------------------------------------------------------------- factorization


@st.composite
def matrix_shapes(draw, min_side: int = 1, max_side: int = 12):
    """(m, n) with both sides in [min_side, max_side]."""
    m = draw(st.integers(min_side, max_side))
    n = draw(st.integers(min_side, max_side))
    return m, n


@st.composite
def matrices(draw, min_side: int = 1, max_side: int = 12, dtype=None):
    """A dense float32 or float64 matrix with drawn entries in [-4, 4], in any layout (:func:`laid_out`)."""
    shape = draw(matrix_shapes(min_side, max_side))
    dtype = draw(FLOAT_DTYPES) if dtype is None else dtype
    return draw(laid_out(dtype, shape))


@st.composite
def matrices_and_ranks(draw, min_side: int = 1, max_side: int = 12, dtype=None):
    """A dense matrix (:func:`matrices`) and a valid rank in [1, min(m, n)]."""
    M = draw(matrices(min_side, max_side, dtype))
    rank = draw(st.integers(1, min(M.shape)))
    return M, rank


@st.composite
def orthonormal_columns(draw, n: int, k: int):
    """An (n, k) float64 matrix with orthonormal columns, k <= n: the Q of the QR of a drawn matrix.

    Householder QR returns orthonormal columns for any input, a rank-deficient
    or zero one too (then Q is made of coordinate vectors).
    """
    G = draw(float_arrays(np.float64, (n, k), bound=1.0))
    return np.linalg.qr(G)[0]  # (n, k)


@st.composite
def singular_values(draw, p: int, min_gap: float = 0.1, smallest=(0.5, 1.0), max_gap: float = 1.0):
    """``p`` singular values, descending, consecutive ones at least ``min_gap`` apart,
    the smallest in the interval ``smallest``: float64 of shape (p,)."""
    low = draw(st.floats(*smallest))
    gaps = np.asarray(draw(st.lists(st.floats(min_gap, max_gap), min_size=p - 1, max_size=p - 1)), np.float64)
    return low + np.append(np.cumsum(gaps[::-1])[::-1], 0.0)  # (p,)


@st.composite
def planted_matrices(draw, m: int, n: int, s, dtype=np.float64):
    """``U diag(s) Vᵀ`` with drawn orthonormal ``U (m, k)`` and ``V (n, k)``, k = len(s) <= min(m, n):
    a matrix whose singular values are exactly ``s`` (and zeros)."""
    s = np.asarray(s, dtype=np.float64)
    U = draw(orthonormal_columns(m, s.size))
    V = draw(orthonormal_columns(n, s.size))
    return ((U * s) @ V.T).astype(dtype)  # (m, n)


@st.composite
def spectrum_matrices(draw, min_side: int = 1, max_side: int = 12, dtype=None, min_gap: float = 0.1):
    """(M, s): a matrix built from drawn orthonormal factors and drawn, well-separated singular
    values ``s`` (all ``min(m, n)`` of them, so M's spectrum is exactly ``s``), in any layout."""
    m, n = draw(matrix_shapes(min_side, max_side))
    dtype = draw(FLOAT_DTYPES) if dtype is None else dtype
    s = draw(singular_values(min(m, n), min_gap=min_gap))
    M = draw(planted_matrices(m, n, s, dtype))
    return draw(as_layout(M)), s


@st.composite
def as_layout(draw, arr):
    """The same values in a drawn memory layout: a C or Fortran copy, a strided view of a bigger
    array holding them at every other position, or a reversed view of a reversed copy."""
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "F":
        return np.asfortranarray(arr)
    if layout == "C" or arr.ndim == 0:
        return np.ascontiguousarray(arr)
    axis = draw(st.integers(0, arr.ndim - 1))
    if layout == "reversed":
        return np.flip(np.flip(arr, axis).copy(), axis)
    big = np.zeros(tuple(2 * side if i == axis else side for i, side in enumerate(arr.shape)), arr.dtype)
    index = (slice(None),) * axis + (slice(None, None, 2),)
    big[index] = arr
    return big[index]


@st.composite
def gapped_problems(draw, min_side: int = 10, max_side: int = 25):
    """(M, s, rank): drawn orthonormal factors around s = 3, 2.5, 2 (the first ``rank``), then a
    tail below 0.5, so the best rank-``rank`` approximation is unique; any layout."""
    m, n, rank = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side)), draw(st.integers(1, 3))
    s = np.concatenate([[3.0, 2.5, 2.0][:rank], 0.5 * 0.8 ** np.arange(min(m, n) - rank)])  # (min(m, n),)
    return draw(planted_matrices(m, n, s).flatmap(as_layout)), s, rank


# decaying spectra, singular value i (from 0) as a function of i
SPECTRA = {
    "geometric": lambda i: 0.9**i,
    "fast": lambda i: 0.7**i,
    "power": lambda i: (i + 1.0) ** -2,
    "harmonic": lambda i: 1.0 / (i + 1.0),
}


@st.composite
def decaying_matrices(draw, min_side: int = 20, max_side: int = 40, dtype=None):
    """(M, s): drawn orthonormal factors around a decaying spectrum of a drawn kind (:data:`SPECTRA`), any layout."""
    m, n = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side))
    s = SPECTRA[draw(st.sampled_from(sorted(SPECTRA)))](np.arange(min(m, n)))  # (min(m, n),)
    dtype = draw(FLOAT_DTYPES) if dtype is None else dtype
    return draw(planted_matrices(m, n, s, dtype).flatmap(as_layout)), s


@st.composite
def planted_low_rank(draw, m: int = 30, n: int = 20, max_rank: int = 5):
    """(M, true_rank): an exactly low-rank matrix, drawn factors and singular values, any layout."""
    true_rank = draw(st.integers(1, max_rank))
    s = draw(singular_values(true_rank, min_gap=0.0))
    return draw(planted_matrices(m, n, s, draw(FLOAT_DTYPES)).flatmap(as_layout)), true_rank


@st.composite
def lowrank_factors(draw, dtype=None, max_side: int = 12, max_rank: int = 6):
    """(left, right): factors of drawn values, left (m, r) and right (r, n), each in any layout."""
    m, n = draw(matrix_shapes(1, max_side))
    r = draw(st.integers(1, max_rank))
    dtype = draw(FLOAT_DTYPES) if dtype is None else dtype
    return draw(laid_out(dtype, (m, r))), draw(laid_out(dtype, (r, n)))


def canonical(U: np.ndarray, Vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular vectors under the sign rule, written independently of the package: the largest-|.|
    entry of each column of U (the first one on ties) made positive, Vt's rows flipped to match."""
    U, Vt = U.copy(), Vt.copy()
    for j in range(U.shape[1]):
        i = int(np.argmax(np.abs(U[:, j])))
        if U[i, j] < 0:
            U[:, j] *= -1
            Vt[j] *= -1
    return U, Vt


def follow_signs_on_ties(U: np.ndarray, Vt: np.ndarray, U_ref: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """U and Vt with a column's sign taken from U_ref where the sign rule is a near-tie.

    The rule makes the largest-magnitude entry of each column positive; when
    the two largest magnitudes of U_ref's column are within ``tol`` (e.g.
    ±0.7071 in a 45° rotation), rounding differences between two SVD runs
    (another LAPACK path, another BLAS thread count) may pick either entry,
    and either sign is right. Elsewhere the sign is left as computed.
    """
    U, Vt = U.copy(), Vt.copy()
    for j in range(U.shape[1]):
        top = np.sort(np.abs(U_ref[:, j]))[::-1]
        if top.size > 1 and top[0] - top[1] <= tol and U[:, j] @ U_ref[:, j] < 0:
            U[:, j] *= -1
            Vt[j] *= -1
    return U, Vt


def assert_sign_rule(U: np.ndarray) -> None:
    """Each column of U has its largest-|.| entry (the first one on ties) positive."""
    for j in range(U.shape[1]):
        i = int(np.argmax(np.abs(U[:, j])))
        assert U[i, j] > 0, f"column {j}: largest-magnitude entry {U[i, j]} at row {i} is not positive"


def planted(m: int, n: int, rank: int, seed: int, dtype=np.float64, decay: float | None = None):
    """A rank-``rank`` matrix U diag(s) V^T with orthonormal U, V, from a seed: for fixed,
    parametrized cases (hypothesis tests use :func:`planted_matrices`).

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
BAD_DTYPES = [np.complex128, np.complex64, object, "U3"]  # float16 is computed in float32


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
    """A dense matrix of any accepted input dtype (floats, integers in [-5, 5] or bool), any layout."""
    shape = draw(matrix_shapes(min_side, max_side))
    return draw(laid_out(draw(INPUT_DTYPES), shape))


def with_spectrum(m: int, n: int, s, seed: int, dtype=np.float64) -> np.ndarray:
    """U diag(s) V^T with random orthonormal U (m, k), V (n, k), k = len(s) <= min(m, n), from a
    seed: for fixed, parametrized cases (hypothesis tests use :func:`planted_matrices`)."""
    s = np.asarray(s, dtype=np.float64)
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, s.size)))
    V, _ = np.linalg.qr(rng.standard_normal((n, s.size)))
    return ((U * s) @ V.T).astype(dtype)


def random_mask(shape, density: float, seed: int) -> np.ndarray:
    """A boolean mask with each entry observed with probability ``density`` (at least one), from a
    seed: for fixed, parametrized cases (hypothesis tests use :func:`masks`)."""
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    mask.flat[rng.integers(mask.size)] = True
    return mask


@st.composite
def masks(draw, shape, at_least_one: bool = True):
    """A drawn boolean mask of ``shape``, with at least one True entry unless ``at_least_one=False``."""
    mask = draw(hnp.arrays(np.bool_, tuple(shape), elements=st.booleans()))
    if at_least_one:
        mask.flat[draw(st.integers(0, mask.size - 1))] = True
    return mask


def legacy_global_state() -> bytes:
    """The global ``np.random`` state, to check that a function never touches it."""
    return np.random.get_state()[1].tobytes()  # noqa: NPY002 (reading it is the point)


@st.composite
def als_problems(draw, min_side: int = 2, max_side: int = 10, max_rank: int = 3):
    """A masked ALS problem: (M, mask, rank, reg, weighted_reg, seed).

    M is float32 or float64, drawn entries in [-4, 4] in any layout, with NaN at
    every unobserved entry, so any read of one poisons the result; the mask is
    drawn entry by entry (at least one True). ``seed`` is for ``random_state``.
    """
    m, n = draw(matrix_shapes(min_side, max_side))
    dtype = draw(FLOAT_DTYPES)
    rank = draw(st.integers(1, min(max_rank, m, n)))
    mask = draw(masks((m, n)))
    M = draw(laid_out(dtype, (m, n)))
    M[~mask] = np.nan  # writes through a view into its base: the layout stays
    reg = draw(st.sampled_from([0.0, 1e-3, 0.1, 2.0]))
    weighted_reg = draw(st.booleans())
    return M, mask, rank, reg, weighted_reg, draw(SEEDS)


@st.composite
def interactions(draw, min_side: int = 2, max_side: int = 8, max_rank: int = 3, dtypes=FLOAT_DTYPES):
    """An implicit-feedback problem: (R, rank, alpha, reg, weighted_reg, seed).

    R is dense and non-negative, in any memory layout: strengths drawn in
    [0, 5], then a drawn sparsity pattern zeroes entries out (one drawn entry
    stays positive), so rows and columns with no interaction occur.
    """
    m, n = draw(matrix_shapes(min_side, max_side))
    dtype = draw(dtypes)
    R = draw(laid_out(dtype, (m, n), elements=st.floats(0.0, 5.0, width=32)))
    keep = draw(masks((m, n), at_least_one=False))
    R[~keep] = 0  # writes through a view into its base: the layout stays
    R[draw(st.integers(0, m - 1)), draw(st.integers(0, n - 1))] = draw(st.floats(0.5, 5.0, width=32))
    rank = draw(st.integers(1, min(max_rank, m, n)))
    alpha = draw(st.sampled_from([0.0, 0.5, 2.0, 10.0]))
    reg = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
    return R, rank, alpha, reg, draw(st.booleans()), draw(SEEDS)


# ---------------------------------------------------------------- validation (tests/test_checks.py)

# arrays of 1 to 3 dims holding NaN and inf among finite floats, in any layout
arrays_with_non_finite = hnp.array_shapes(min_dims=1, max_dims=3, max_side=4).flatmap(
    lambda shape: laid_out(np.float64, shape, st.floats(-4.0, 4.0) | st.sampled_from([np.nan, np.inf, -np.inf]))
)


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


def _nn_array(dtype, shape, views: bool, bound: float = 2.0, min_magnitude: float = 0.0):
    if views:
        return float_views(dtype, shape, bound, min_magnitude)
    return float_arrays(dtype, shape, bound, min_magnitude)


@st.composite
def linear_problems(draw, dtype=np.float64, bias=None, views: bool = False):
    """Inputs of ``F.linear`` and an upstream gradient: x (*batch, in), weight (out, in),
    bias (out,) or None, dy (*batch, out); 0 to 2 leading batch dims; drawn entries in [-2, 2].

    With ``views=True`` each array comes in a drawn memory layout (:func:`laid_out`).
    """
    batch = draw(batch_shapes(max_dims=2, max_side=4))
    n_in, n_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    with_bias = draw(st.booleans()) if bias is None else bias
    return {
        "x": draw(_nn_array(dtype, (*batch, n_in), views)),
        "weight": draw(_nn_array(dtype, (n_out, n_in), views)),
        "bias": draw(_nn_array(dtype, (n_out,), views)) if with_bias else None,
        "dy": draw(_nn_array(dtype, (*batch, n_out), views)),
    }


@st.composite
def lora_problems(draw, dtype=np.float64, bias=None, dropout=None, views: bool = False):
    """Inputs of ``F.lora_linear`` and an upstream gradient: x, weight, bias (or None), A (r, in),
    B (out, r) with every entry nonzero, scaling (alpha / r or rsLoRA's alpha / sqrt(r)),
    dropout_mask (or None), dy.

    Batches run from 1 row to 16, so both evaluation orders (folded weight or not) are drawn.
    With ``views=True`` each array comes in a drawn memory layout (:func:`laid_out`).
    """
    problem = draw(linear_problems(dtype=dtype, bias=bias, views=views))
    n_out, n_in = problem["weight"].shape
    r = draw(st.integers(1, 4))
    alpha = draw(st.floats(0.25, 16.0, allow_nan=False, allow_infinity=False))
    scaling = alpha / np.sqrt(r) if draw(st.booleans()) else alpha / r
    with_dropout = draw(st.booleans()) if dropout is None else dropout
    p = draw(st.floats(0.1, 0.7)) if with_dropout else 0.0
    x_shape = problem["x"].shape
    # the mask either has x's shape or broadcasts to it (one mask shared by the batch)
    mask_shape = x_shape if draw(st.booleans()) else x_shape[-1:]
    keep = draw(masks(mask_shape, at_least_one=False)) if with_dropout else None
    problem.update(
        A=draw(_nn_array(dtype, (r, n_in), views)),
        B=draw(_nn_array(dtype, (n_out, r), views, min_magnitude=0.25)),
        scaling=float(scaling),
        dropout_mask=(keep / (1 - p)).astype(dtype) if with_dropout else None,
    )
    return problem


@st.composite
def lora_embedding_problems(draw, dtype=np.float64):
    """Inputs of ``F.lora_embedding`` and an upstream gradient: idx (integers, any of 0 to 2 dims, repeats
    likely: drawn from a small table), weight (num, dim), A (r, num) and B (dim, r) with nonzero entries,
    scaling, dy (*idx.shape, dim)."""
    num, dim, r = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    idx_shape = draw(batch_shapes(max_dims=2, max_side=5))
    idx = draw(hnp.arrays(np.int64, idx_shape, elements=st.integers(0, num - 1)))
    return {
        "idx": idx,
        "weight": draw(_nn_array(dtype, (num, dim), views=True)),
        "A": draw(_nn_array(dtype, (r, num), views=True, min_magnitude=0.25)),
        "B": draw(_nn_array(dtype, (dim, r), views=True, min_magnitude=0.25)),
        "scaling": draw(st.floats(0.25, 8.0)),
        "dy": draw(_nn_array(dtype, (*idx_shape, dim), views=False)),
    }


@st.composite
def merged_lora_problems(draw, dtype=np.float64):
    """Inputs of ``F.lora_merged_linear`` (loralib's MergedLinear): x, weight (out, in) with out =
    len(enable_lora) * d, bias or None, enable_lora (one True at least), A (k r, in), B (k d, r) with
    nonzero entries, scaling, dropout_mask or None, dy."""
    enable = draw(st.lists(st.booleans(), min_size=1, max_size=4).filter(any))
    d, n_in, r = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    k, n_out = sum(enable), len(enable) * d
    batch = draw(batch_shapes(max_dims=2, max_side=4))
    with_dropout = draw(st.booleans())
    keep = draw(masks((*batch, n_in), at_least_one=False)) if with_dropout else None
    return {
        "x": draw(_nn_array(dtype, (*batch, n_in), views=True)),
        "weight": draw(_nn_array(dtype, (n_out, n_in), views=True)),
        "bias": draw(_nn_array(dtype, (n_out,), views=False)) if draw(st.booleans()) else None,
        "A": draw(_nn_array(dtype, (k * r, n_in), views=True)),
        "B": draw(_nn_array(dtype, (k * d, r), views=True, min_magnitude=0.25)),
        "scaling": draw(st.floats(0.25, 8.0)),
        "enable_lora": enable,
        "dropout_mask": (keep / 0.5).astype(dtype) if with_dropout else None,
        "dy": draw(_nn_array(dtype, (*batch, n_out), views=False)),
    }


@st.composite
def elementwise_inputs(draw, dtype=np.float64, scale: float = 3.0, away_from_zero: float = 0.0, views: bool = False):
    """An array of 0 to 2 batch dims plus a feature axis, drawn entries of size up to ``scale``;
    with ``away_from_zero > 0`` every entry has magnitude at least that (relu's kink).

    With ``views=True`` it comes in a drawn memory layout (:func:`laid_out`).
    """
    shape = (*draw(batch_shapes(max_dims=2, max_side=4)), draw(st.integers(1, 5)))
    return draw(_nn_array(dtype, shape, views, bound=scale, min_magnitude=away_from_zero))


# the evaluation paths of lora_linear (tests/nn/test_lora_paths.py)
LORA_PATHS = ("folded", "unfolded", "folded forward only")


@st.composite
def lora_path_cases(draw, path=None, zero_B=None):
    """One call of ``F.lora_linear`` and its backward, the path chosen by the sizes: x (*batch, in)
    in any layout, weight (out, in), bias (out,) or None, A (r, in), B (out, r) (zeros with
    ``zero_B``), scaling, dropout_mask (x's shape or (in,), or None), dy (*batch, out);
    entries drawn in [-3, 3].

    ``path`` (one of :data:`LORA_PATHS`): "folded" draws N > in and N > out rows (both passes
    fold), "unfolded" N <= min(in, out) (neither does), "folded forward only" in < N <= out.
    """
    dtype = draw(FLOAT_DTYPES)
    path = draw(st.sampled_from(LORA_PATHS)) if path is None else path
    n_in, n_out, r = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    if path == "folded":
        n = draw(st.integers(max(n_in, n_out) + 1, 14))
    elif path == "unfolded":
        n = draw(st.integers(1, min(n_in, n_out)))
    else:
        n_in = min(n_in, 4)
        n_out = draw(st.integers(n_in + 1, 7))
        n = draw(st.integers(n_in + 1, n_out))
    batch = draw(st.sampled_from([(n,), (1, n)] + ([(2, n // 2)] if n % 2 == 0 else [])))
    x = draw(float_views(dtype, (*batch, n_in), bound=3.0))
    zero_B = draw(st.booleans()) if zero_B is None else zero_B
    B = np.zeros((n_out, r), dtype) if zero_B else draw(float_arrays(dtype, (n_out, r), bound=3.0))
    mask = None
    if draw(st.booleans()):
        p = draw(st.sampled_from([0.25, 0.5]))
        shape = draw(st.sampled_from([x.shape, x.shape[-1:]]))  # x's shape, or one mask shared by the batch
        keep = draw(masks(shape, at_least_one=False))
        mask = (keep / (1 - p)).astype(dtype)
    return {
        "x": x,
        "weight": draw(float_arrays(dtype, (n_out, n_in), bound=3.0)),
        "bias": draw(st.none() | float_arrays(dtype, (n_out,), bound=3.0)),
        "A": draw(float_arrays(dtype, (r, n_in), bound=3.0)),
        "B": B,
        "scaling": draw(st.sampled_from([0.5, 2.0]) | st.floats(0.25, 4.0)),
        "dropout_mask": mask,
        "dy": draw(float_arrays(dtype, (*batch, n_out), bound=3.0)),
    }


# attention kernels and layers (tests/nn/test_attention.py, tests/crosscheck/test_attention_torch.py)


@st.composite
def layer_norm_problems(draw, dtype=np.float64, views: bool = False):
    """Inputs of ``F.layer_norm`` and an upstream gradient: x (*batch, D) with D in [2, 6],
    weight and bias (D,) or None, dy; 0 to 2 batch dims; drawn entries in [-3, 3].

    Every row of x is a drawn row plus ``0.5 * arange(D)``, so no row is constant: at a row
    of zero variance the derivative grows as ``1/sqrt(eps)`` and the central differences
    would judge rounding, not the gradient. With ``views=True`` x comes in a drawn layout.
    """
    d = draw(st.integers(2, 6))
    shape = (*draw(batch_shapes(max_dims=2, max_side=3)), d)
    x = draw(_nn_array(dtype, shape, views, bound=3.0))
    affine = draw(st.booleans())
    return {
        "x": x + np.arange(d, dtype=dtype) * dtype(0.5),
        "weight": draw(float_arrays(dtype, (d,), bound=3.0)) if affine else None,
        "bias": draw(float_arrays(dtype, (d,), bound=3.0)) if affine else None,
        "dy": draw(float_arrays(dtype, shape, bound=3.0)),
    }


@st.composite
def attention_problems(draw, dtype=np.float64, causal=None, mask_kind=None, dropout=None, views: bool = False):
    """Inputs of ``F.scaled_dot_product_attention`` and an upstream gradient.

    q (*batch, T, d), k (*batch, S, d), v (*batch, S, dv), 0 to 2 batch dims, T in [1, 4],
    S in [1, 5] (S = T when causal), d and dv in [1, 4], entries in [-2, 2]; ``attn_mask`` None,
    boolean (shape (T, S) or the scores' full shape, rows entirely False included) or additive
    float in [-3, 3] with some ``-inf`` entries; ``is_causal``; a dropout mask on the weights
    (0 or 1/(1-p)) or None; ``scale`` None or drawn in [0.2, 2]; ``dy`` (*batch, T, dv).
    """
    batch = draw(batch_shapes(max_dims=2, max_side=3))
    is_causal = draw(st.booleans()) if causal is None else causal
    t = draw(st.integers(1, 4))
    s = t if is_causal else draw(st.integers(1, 5))
    d, dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    scores_shape = (*batch, t, s)
    kind = draw(st.sampled_from(["none", "bool", "float"])) if mask_kind is None else mask_kind
    mask_shape = draw(st.sampled_from([(t, s), scores_shape]))
    attn_mask = None
    if kind == "bool":
        attn_mask = draw(masks(mask_shape, at_least_one=False))
    elif kind == "float":
        values = draw(float_arrays(dtype, mask_shape, bound=3.0))
        attn_mask = np.where(draw(masks(mask_shape)), values, -np.inf).astype(dtype)
    with_dropout = draw(st.booleans()) if dropout is None else dropout
    dropout_mask = None
    if with_dropout:
        p = draw(st.sampled_from([0.25, 0.5]))
        dropout_mask = (draw(masks(scores_shape, at_least_one=False)) / (1 - p)).astype(dtype)
    return {
        "q": draw(_nn_array(dtype, (*batch, t, d), views)),
        "k": draw(_nn_array(dtype, (*batch, s, d), views)),
        "v": draw(_nn_array(dtype, (*batch, s, dv), views)),
        "attn_mask": attn_mask,
        "is_causal": is_causal,
        "dropout_mask": dropout_mask,
        "scale": draw(st.none() | st.floats(0.2, 2.0)),
        "dy": draw(float_arrays(dtype, (*batch, t, dv), bound=2.0)),
    }


@st.composite
def embedding_problems(draw, dtype=np.float64):
    """A table (V, D) with V in [1, 6] and D in [1, 4], integer indices of 0 to 3 dims (few
    rows, so repeated indices are common) and dy (*indices.shape, D)."""
    v, d = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4))
    indices = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, v - 1)))
    return {
        "indices": indices,
        "weight": draw(float_arrays(dtype, (v, d), bound=3.0)),
        "dy": draw(float_arrays(dtype, (*shape, d), bound=3.0)),
    }


@st.composite
def ignored_target_problems(draw, dtype=np.float64, ignore_index: int = -100):
    """Logits (*batch, C) with 0 to 2 batch dims and C in [1, 5], entries in [-8, 8], and integer
    targets (*batch) in [0, C) where a drawn subset (never all) equals ``ignore_index``."""
    c = draw(st.integers(1, 5))
    batch = draw(batch_shapes(max_dims=2, max_side=4))
    target = draw(hnp.arrays(np.int64, batch, elements=st.integers(0, c - 1)))
    ignored = draw(masks(batch, at_least_one=False)) if target.size else np.zeros(batch, bool)
    if ignored.all():
        ignored.flat[draw(st.integers(0, ignored.size - 1))] = False
    return {
        "logits": draw(float_arrays(dtype, (*batch, c), bound=8.0)),
        "target": np.where(ignored, ignore_index, target),
        "ignore_index": ignore_index,
    }


# ---------------------------------------------------------------- io (tests/test_safetensors.py)

# the dtypes a safetensors file stores; big-endian input is accepted and stored little-endian
SAFETENSORS_STORED = ["<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "i1", "u1", "<u2", "<u4", "<u8", "?"]
SAFETENSORS_DTYPES = st.sampled_from([*SAFETENSORS_STORED, ">f8", ">f4", ">i4", ">u2"])
TENSOR_NAMES = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6).filter(lambda s: s != "__metadata__")
METADATA = st.dictionaries(TENSOR_NAMES, st.text(st.characters(blacklist_categories=("Cs",)), max_size=6), max_size=4)


@st.composite
def stored_arrays(draw, dtypes=SAFETENSORS_DTYPES, elements=None):
    """An array of a drawn storable dtype and any shape (0-d and zero-size included), in any layout
    (:func:`laid_out`); by default every value of the dtype (NaN, inf, the integer extremes) may occur."""
    dtype = np.dtype(draw(dtypes))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    return draw(laid_out(dtype, shape, hnp.from_dtype(dtype) if elements is None else elements))


TENSORS = st.dictionaries(TENSOR_NAMES, stored_arrays(), max_size=4)


def every_float(width: int, max_size: int = 60):
    """A 1-d float array of ``width`` bits holding any value of that width: NaN, ±inf, subnormals too."""
    return hnp.arrays(np.dtype(f"f{width // 8}"), st.integers(0, max_size), elements=st.floats(width=width))


def bfloat16_patterns(max_size: int = 60):
    """A 1-d uint16 array of any bit patterns: every bfloat16 value, NaNs included."""
    return hnp.arrays(np.uint16, st.integers(0, max_size))


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

    Entries are drawn in [-3, 3], so every update is O(lr) and no example overflows.
    """
    shape = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    dtype = draw(FLOAT_DTYPES) if dtype is None else dtype
    # 0 or at least 1e-4 in magnitude: a clipped or decayed float32 entry never turns subnormal
    elements = st.just(0.0) | float_elements(dtype, 3.0, min_magnitude=1e-4)
    theta0 = draw(hnp.arrays(np.dtype(dtype), shape, elements=elements))
    grads = [draw(hnp.arrays(np.dtype(dtype), shape, elements=elements)) for _ in range(n_steps)]
    return theta0, grads


# DoRA (tests/nn/test_dora.py)


@st.composite
def dora_problems(draw, dtype=np.float64, bias=None, dropout=None, views: bool = False, min_norm: float = 0.25):
    """:func:`lora_problems` plus DoRA's magnitude (out,): entries in [-3, 3], zero included, so
    ``m / n`` runs through the rows the backward recovers from ``y`` and those it recomputes.

    Every row of ``V = W + scaling * B @ A`` has norm at least ``min_norm`` (DoRA's direction
    ``V / ‖V‖`` is undefined at 0, and finite differences need room around it).
    """
    from hypothesis import assume

    problem = draw(lora_problems(dtype=dtype, bias=bias, dropout=dropout, views=views))
    W, A, B = (np.asarray(problem[k], np.float64) for k in ("weight", "A", "B"))
    V = W + problem["scaling"] * (B @ A)
    assume(np.sqrt((V * V).sum(axis=1)).min() >= min_norm)
    n_out = W.shape[0]
    problem["magnitude"] = draw(_nn_array(dtype, (n_out,), views, bound=3.0))
    return problem


# ---------------------------------------------------------------- sparse matrices (randomized_svd on scipy.sparse)


@st.composite
def sparse_matrices(draw, min_side: int = 2, max_side: int = 12, dtype=None):
    """A dense C-ordered matrix of drawn entries and a drawn pattern of structural zeros: the tests
    hand it to scipy.sparse in a drawn format (:data:`SPARSE_FORMATS`) and keep the dense form to compare."""
    m, n = draw(matrix_shapes(min_side, max_side))
    dtype = draw(FLOAT_DTYPES) if dtype is None else dtype
    values = draw(float_arrays(dtype, (m, n)))
    keep = draw(hnp.arrays(np.bool_, (m, n)))
    return np.where(keep, values, 0).astype(dtype)


SPARSE_FORMATS = st.sampled_from(["csr", "csc", "coo", "lil", "csr_array"])
