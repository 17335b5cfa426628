"""Argument validation, the dtype rule and ``random_state``, in one place.

Every public function validates its input here, once, at the boundary. Each
helper enforces one rule and raises ``ValueError`` or ``TypeError`` with a
message that names the argument, the rule and the value received::

    rank must be in [1, min(m, n)] = [1, 9], got 12

The dtype rule: float32 and float64 are preserved, integer and
bool input becomes float64, float16 input is computed in float32 and the
result returned in float32 (exact: every float16 value is a float32 one; to
compute *in* a 16-bit format, emulate it with :mod:`lowrank.precision`),
anything else is a ``TypeError``. bfloat16 has no NumPy dtype: its values
arrive as float32 (``lowrank.precision.from_bits``, ``load_safetensors``).
"""

from __future__ import annotations

import numbers
from typing import Any, TypeAlias

import numpy as np

# A string, so importing this module does not load numpy.random (7 ms by `python -X importtime`, 15 % of numpy).
RandomState: TypeAlias = "int | np.integer | np.random.Generator | None"

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_random_state(random_state: RandomState, name: str = "random_state") -> np.random.Generator:
    """Resolve ``random_state`` into a ``numpy.random.Generator``, once.

    Parameters
    ----------
    random_state : None, int or numpy.random.Generator
        None gives a fresh unseeded generator; an int seeds a new one; a
        Generator is returned as it is, so the caller's stream advances.

    Returns
    -------
    numpy.random.Generator
    """
    if random_state is None:
        return np.random.default_rng()
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, (bool, np.bool_)):
        raise TypeError(f"{name} must be None, an int or a numpy.random.Generator, got {random_state!r}")
    if isinstance(random_state, numbers.Integral):
        if random_state < 0:
            raise ValueError(f"{name} must be a non-negative int, got {random_state}")
        return np.random.default_rng(int(random_state))
    raise TypeError(
        f"{name} must be None, an int or a numpy.random.Generator, "
        f"got {type(random_state).__name__} {random_state!r}"
    )


def float_dtype_of(x: np.ndarray, name: str) -> np.dtype:
    """The float dtype that ``x`` computes in under the dtype rule."""
    dtype = x.dtype
    if dtype in FLOAT_DTYPES:
        return dtype
    if dtype.kind == "f" and dtype.itemsize == 2:  # float16: computed, and returned, in float32
        return np.dtype(np.float32)
    if dtype.kind in "biu":
        return np.dtype(np.float64)
    raise TypeError(
        f"{name} must hold real numbers (float16, float32, float64, integer or bool), got dtype {dtype}"
    )


def as_float_array(x: Any, name: str, dtype: np.dtype | None = None) -> np.ndarray:
    """Convert ``x`` to a float32/float64 ndarray under the dtype rule.

    Parameters
    ----------
    x : array_like
    name : str
        The argument's name, for the error message.
    dtype : numpy.dtype, optional
        Cast to this float dtype instead of the one the rule picks.
    """
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be an array of real numbers, got {type(x).__name__} {x!r}")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:  # ragged nested lists and the like
        raise TypeError(f"{name} must be an array of real numbers, got {type(x).__name__}: {exc}") from None
    if not arr.dtype.isnative:  # byte order normalised to native: >f8 is float64 like any other
        arr = arr.astype(arr.dtype.newbyteorder("="))
    target = float_dtype_of(arr, name) if dtype is None else np.dtype(dtype)
    return arr.astype(target, copy=False)


def first_non_finite(arr: np.ndarray, where: np.ndarray | None = None) -> tuple[int, ...] | None:
    """The index of the first NaN or inf of ``arr`` (in C order), or None if there is none.

    Parameters
    ----------
    arr : ndarray of any shape
    where : ndarray of bool of arr's shape, optional
        Look only at the entries where this is True (e.g. observed entries).

    Returns
    -------
    tuple of int, or None
    """
    bad = ~np.isfinite(arr)
    if where is not None:
        bad &= where
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), arr.shape))


def describe_non_finite(arr: np.ndarray, name: str, where: np.ndarray | None = None) -> str | None:
    """The one-line message for a non-finite ``arr``, or None when it is finite.

    ``"{name} must be finite, got nan at index (0, 2) (3 non-finite entries)"``
    (``"must be finite at observed entries"`` with ``where``): the one wording
    every check of finiteness in lowrank uses.
    """
    index = first_non_finite(arr, where)
    if index is None:
        return None
    bad = ~np.isfinite(arr) if where is None else ~np.isfinite(arr) & where
    count = int(np.count_nonzero(bad))
    return non_finite_message(name, arr[index], index, count, observed=where is not None)


def non_finite_message(
    name: str, value: Any, index: tuple[int, ...], count: int, *, observed: bool = False
) -> str:
    """:func:`describe_non_finite`'s wording, for a caller that found the bad entry itself.

    For input not held as a dense array, e.g. the stored entries of a
    scipy.sparse matrix, whose first non-finite entry is named by its
    ``(row, column)``.

    Parameters
    ----------
    name : str
        The argument's name.
    value : float
        The first non-finite entry (NaN, inf or -inf).
    index : tuple of int
        Where it is.
    count : int
        How many non-finite entries there are in all.
    observed : bool, default False
        Say "at observed entries" (only those were checked).
    """
    at = " at observed entries" if observed else ""
    return f"{name} must be finite{at}, got {value} at index {index} ({count} non-finite entries)"


def check_finite(arr: np.ndarray, name: str, where: np.ndarray | None = None) -> np.ndarray:
    """Raise ValueError (:func:`describe_non_finite`'s message) unless ``arr`` is finite; return it."""
    message = describe_non_finite(arr, name, where)
    if message is not None:
        raise ValueError(message)
    return arr


def check_matrix(
    M: Any,
    name: str = "M",
    *,
    mask: np.ndarray | None = None,
    dtype: np.dtype | None = None,
) -> np.ndarray:
    """Check that ``M`` is a non-empty 2-D real matrix, finite where observed.

    Parameters
    ----------
    M : array_like of shape (m, n)
    name : str
    mask : ndarray of bool of shape (m, n), optional
        Only entries where ``mask`` is True must be finite; the others are
        never read.
    dtype : numpy.dtype, optional
        Cast to this float dtype instead of the one the rule picks.

    Returns
    -------
    ndarray of shape (m, n), float32 or float64
    """
    arr = as_float_array(M, name, dtype)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got an array of shape {arr.shape} ({arr.ndim}-D)")
    if arr.size == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
    check_finite(arr, name, mask)
    return arr


def check_mask(mask: Any, shape: tuple[int, int], name: str = "mask") -> np.ndarray:
    """Check a boolean observation mask of the given shape with one True entry at least."""
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array (True where observed), got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have the matrix's shape {tuple(shape)}, got {arr.shape}")
    if not arr.any():
        raise ValueError(f"{name} must observe at least one entry, got an all-False mask")
    return arr


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None, rule: str = "") -> int:
    """Check that ``value`` is an integer in ``[low, high]`` (either bound optional).

    Parameters
    ----------
    rule : str
        How to describe the range in the message, e.g. ``"[1, min(m, n)]"``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        described = f"{rule} = [{lo}, {hi}]" if rule else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be in {described}, got {value}")
    return value


def check_rank(rank: Any, shape: tuple[int, int], name: str = "rank") -> int:
    """Check a factorization rank: an integer in ``[1, min(m, n)]``."""
    return check_int(rank, name, 1, min(shape), rule="[1, min(m, n)]")


def check_real(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check that ``value`` is a finite real number in the given interval.

    The interval is closed unless ``low_open``/``high_open`` say otherwise,
    and the message writes it the usual way, e.g. ``(0, 1]``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not np.isfinite(value) or too_low or too_high:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """Check that ``value`` is True or False (a NumPy bool too), not a truthy stand-in."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of the allowed strings."""
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def is_scipy_sparse(M: Any) -> bool:
    """Whether ``M`` is a scipy.sparse matrix or array (any format), told without importing scipy.

    A class defined in ``scipy.sparse`` (or derived from one) counts; scipy's
    ``LinearOperator`` (``scipy.sparse.linalg``) does not: it has products but
    no stored entries.
    """
    return any(
        cls.__module__.startswith("scipy.sparse") and not cls.__module__.startswith("scipy.sparse.linalg")
        for cls in type(M).__mro__
    )


def check_float_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """Check a dtype argument: float32 or float64, in any spelling NumPy accepts.

    ``None`` is refused (``np.dtype(None)`` would silently mean float64).
    """
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    if resolved is None or resolved not in FLOAT_DTYPES:  # (dtype == None is True in NumPy)
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}")
    return resolved
