"""How a candidate's tensor is compared with the reference: one rule, one tolerance table.

``lowrank vectors check`` (:mod:`lowrank.reference.vectors`) and the
hypothesis harness (:mod:`lowrank.reference.harness`) both call
:func:`compare`, so a tensor that passes one passes the other.

The rule, elementwise over a tensor ``want`` of the reference and the
candidate's ``got`` of the same shape::

    |got - want| <= atol * max|want| + rtol * |want|

``max|want|`` is the largest magnitude in the whole reference tensor (0 for an
empty one). Why scale the absolute floor by it rather than use ``numpy.allclose``'s
fixed ``atol``: a correct implementation that sums in another order differs
from the reference by rounding errors proportional to the size of the terms it
adds, not to the entry they add up to. An entry near 0 that is the
cancellation of terms of size ``max|want|`` carries an error of about
``eps * max|want|``; a fixed ``atol`` would fail a correct candidate on data
in other units (multiply every input by 1000 and ``y``'s rounding error grows
by 1000 too) and pass a wrong one on data scaled down. Scaled this way the
test does not depend on the units of the data. On the unit-scale cases of
the reference vectors ``max|want|`` is between 1 and 10, so the two rules
differ by at most that factor on near-zero entries and agree elsewhere.

Integer reference tensors (class indices, counts) must match exactly, and a
candidate value that is NaN or infinite never matches.

A reference is strict about what it compares: the candidate's tensor must
have the reference tensor's shape and dtype (a float32 result for a float64
tensor fails, even when its values are close; so do complex, string and
object arrays), and the failure's note says which rule it broke.

The tolerances are not chosen per case: every case of a dtype takes its row
of :data:`TOLERANCES` through :func:`tolerance_for`, and every expected value
they are measured against is the float64 result rounded once to that dtype
(see :mod:`lowrank.reference.vectors`), so the same rule holds whatever the
shape or evaluation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.precision.rounding import round_to

__all__ = ["TOLERANCES", "Comparison", "compare", "compare_within", "error_stats", "tolerance_for"]

# rtol, and atol as a fraction of max|want| (see the module docstring).
# float64: a correct implementation differs from the reference by the rounding of
# another summation order, ~1e-15 relative on these small, well-conditioned
# cases; 1e-9 leaves room for that and still catches any wrong formula or
# convention. float32: eps = 1.2e-7 and products of length <= 16, so 1e-4
# relative, and 1e-5 of the tensor's scale for entries near 0 after cancellation.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"rtol": 1e-4, "atol": 1e-5},
    "float64": {"rtol": 1e-9, "atol": 1e-12},
}


def tolerance_for(dtype: Any) -> tuple[float, float]:
    """``(rtol, atol)`` of :data:`TOLERANCES` for ``dtype`` (float32 or float64).

    Raises
    ------
    TypeError
        For any other dtype.
    """
    name = np.dtype(dtype).name
    if name not in TOLERANCES:
        raise TypeError(f"dtype must be float32 or float64 to have a reference tolerance, got {name}")
    row = TOLERANCES[name]
    return row["rtol"], row["atol"]


def error_stats(got: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``|got - want|`` in float64, its maximum, and the largest ``|got - want| / |want|`` over nonzero ``want``.

    The one definition of "max abs" and "max rel" error that ``lowrank vectors
    check`` and the harness both report. The shapes must agree.

    Parameters
    ----------
    got, want : ndarray of the same shape

    Returns
    -------
    diff : ndarray of float64, want's shape
    max_abs : float
        0 for empty tensors.
    max_rel : float
        0 when every ``want`` is 0.
    """
    g, w = np.asarray(got).astype(np.float64), np.asarray(want).astype(np.float64)
    diff = np.abs(g - w)
    max_abs = float(diff.max()) if diff.size else 0.0
    nonzero = w != 0
    max_rel = float((diff[nonzero] / np.abs(w[nonzero])).max()) if nonzero.any() else 0.0
    return diff, max_abs, max_rel


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare` for one tensor.

    Attributes
    ----------
    ok : bool
    max_abs, max_rel : float
        As :func:`error_stats`; NaN when nothing could be compared (wrong shape,
        a dtype that is not real) or the candidate holds a non-finite value.
    worst_index : tuple of int or None
        Where ``|got - want|`` is largest, when the tensor fails on its values.
    note : str
        Why it failed beyond the error: a wrong shape, another dtype (a
        failure whatever the values), a dtype that is not real (complex,
        string, object), non-finite values. Empty when there is nothing to say.
    """

    ok: bool
    max_abs: float
    max_rel: float
    worst_index: tuple[int, ...] | None
    note: str


def compare(got: Any, want: np.ndarray, *, rtol: float, atol: float) -> Comparison:
    """Compare a candidate tensor with the reference under the module's rule.

    Parameters
    ----------
    got : array_like
        The candidate's tensor (anything ``np.asarray`` accepts).
    want : ndarray
        The reference tensor.
    rtol, atol : float
        ``|got - want| <= atol * max|want| + rtol * |want|`` elementwise;
        ignored (exact match) when ``want`` holds integers.

    Returns
    -------
    Comparison
        ``ok`` only when the shapes and dtypes are equal, every value of
        ``got`` is finite and every element is within the tolerance.
    """
    nan = float("nan")
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return Comparison(False, nan, nan, None, f"shape {got.shape}, expected {want.shape}")
    if got.dtype.kind not in "biuf":  # complex, string, object, datetime: nothing to measure
        kind = "complex, not real" if got.dtype.kind == "c" else "not a real number type"
        return Comparison(False, nan, nan, None, f"dtype {got.dtype} ({kind}), expected {want.dtype}")
    if want.dtype.kind in "biu":  # integer outputs must match exactly
        rtol = atol = 0.0
    diff, max_abs, max_rel = error_stats(got, want)
    w = np.abs(want.astype(np.float64))
    scale = float(w.max()) if w.size else 0.0
    finite = bool(np.isfinite(got).all())
    same_dtype = got.dtype.name == want.dtype.name  # by name: byte order does not matter
    within = finite and bool(np.all(diff <= atol * scale + rtol * w))
    ok = same_dtype and within
    notes = [] if finite else ["non-finite values"]
    if not same_dtype:
        notes.insert(0, f"dtype {got.dtype.name}, expected {want.dtype.name}")
    worst = None
    if not within and finite and diff.size:
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape))
    return Comparison(ok, max_abs if finite else nan, max_rel if finite else nan, worst, "; ".join(notes))


def compare_within(got: Any, want: np.ndarray, tolerance: np.ndarray, fmt: str) -> Comparison:
    """Compare a candidate tensor of a 16-bit format with the reference, element by element.

    The rule of the half-precision reference vectors: ``|got - want| <=
    tolerance`` for every element, where ``tolerance`` is the element's own
    (an a priori bound on the rounding error of the format, see
    :mod:`lowrank.precision.bounds`), not a relative one. ``got`` must also
    have ``want``'s shape and dtype (bfloat16 tensors read as float32, float16
    as float16), be finite, and hold values of ``fmt`` only: a float32 result
    that was never rounded to the format fails, whatever its error.

    Parameters
    ----------
    got : array_like
    want : ndarray
        The reference tensor, values of ``fmt``.
    tolerance : ndarray
        ``want``'s shape, float64, ``>= 0``.
    fmt : {"bfloat16", "float16"}

    Returns
    -------
    Comparison
    """
    nan = float("nan")
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return Comparison(False, nan, nan, None, f"shape {got.shape}, expected {want.shape}")
    if got.dtype.kind != "f" or got.dtype.name != want.dtype.name:
        return Comparison(False, nan, nan, None, f"dtype {got.dtype.name}, expected {want.dtype.name} ({fmt})")
    if not np.isfinite(got).all():
        return Comparison(False, nan, nan, None, "non-finite values")
    diff, max_abs, max_rel = error_stats(got, want)
    if not np.array_equal(round_to(got.astype(np.float32), fmt), got.astype(np.float32)):
        return Comparison(False, max_abs, max_rel, None, f"values not representable in {fmt}: round to it first")
    outside = diff > tolerance
    worst = None
    note = ""
    if outside.any():
        ratio = np.where(tolerance > 0, diff / np.where(tolerance > 0, tolerance, 1.0), np.inf)
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(ratio), diff.shape))
        note = f"{int(outside.sum())} element(s) past their bound, worst {float(ratio[worst]):.3g}x at {worst}"
    return Comparison(not outside.any(), max_abs, max_rel, worst, note)
