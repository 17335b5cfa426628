"""Rounding to bfloat16, float16 and float32.

float16 is IEEE binary16, and NumPy's cast to it is correctly rounded (to
nearest, ties to even, on the subnormal grid below ``2**-14``, to ±inf past
65504, NaN kept with its sign), from float32 and from float64 alike: a
float64 value is rounded once, not through float32. :func:`round_to` uses
that cast. bfloat16 has no NumPy dtype; it is rounded by hand, on the
integer bits of float32:

Every float32 value is a bit pattern ``sign | exponent (8 bits) | fraction
(23 bits)``, and for values of one sign the patterns are ordered like the
values. Rounding to bfloat16 (8 significand bits, float32's exponent range)
keeps the top 7 of the 23 fraction bits: add half a unit of the last kept
bit (minus one, plus that bit, so a tie goes to the even neighbour), then
clear the 16 dropped bits. A carry out of the fraction bumps the exponent,
which is exactly the next binade's first value, and past the largest finite
value it lands on infinity.

float64 input is rounded once, not twice: it is first rounded to float32
*to odd* (truncated, with the last bit set when anything was cut off), which
keeps enough information that the second rounding gives the correctly
rounded result (Boldo and Melquiond, "Emulation of FMA and correctly rounded
sums: proved algorithms using rounding to odd", 2008; float32 has 24 bits,
more than two beyond bfloat16's 8), as ml_dtypes does. PyTorch casts float64
through float32, rounding twice, which can land on the wrong side of a tie:
``1 + 2**-8 + 2**-30`` becomes 1.0 there, ``1 + 2**-7`` here.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from lowrank.utils.validation import as_float_array, check_choice

__all__ = ["FORMATS", "Format", "from_bits", "round_to", "smallest_subnormal", "to_bits", "unit_roundoff"]

Format = Literal["bfloat16", "float16", "float32"]
FORMATS: tuple[str, ...] = ("bfloat16", "float16", "float32")
"""The formats :func:`round_to` knows, narrowest exponent range last but one."""

# name: (p, the significand's bits with the implicit one; emin, the smallest normal exponent)
_SPEC = {"bfloat16": (8, -126), "float16": (11, -14), "float32": (24, -126), "float64": (53, -1022)}
_QUIET = 0x00400000  # the quiet bit of a float32 NaN

# bfloat16 conversions stream in chunks of 2**18 elements, so the uint32
# temporaries cost 1 MiB each instead of the whole array's size.
_CHUNK = 1 << 18


def unit_roundoff(fmt: str) -> float:
    """The unit roundoff ``u = 2**-p`` of a format: the largest relative error of rounding to nearest.

    ``bfloat16`` 2**-8, ``float16`` 2**-11, ``float32`` 2**-24, ``float64`` 2**-53.

    Examples
    --------
    >>> unit_roundoff("bfloat16") == 2**-8
    True
    """
    check_choice(fmt, "fmt", (*FORMATS, "float64"))
    return 2.0 ** -_SPEC[fmt][0]


def smallest_subnormal(fmt: str) -> float:
    """The smallest positive value of a format, ``2**(emin - p + 1)``.

    Rounding's absolute error is at most half of it, at any magnitude.
    """
    check_choice(fmt, "fmt", (*FORMATS, "float64"))
    p, emin = _SPEC[fmt]
    return 2.0 ** (emin - p + 1)


def round_to(x: Any, fmt: str) -> np.ndarray:
    """Round values to the nearest value of ``fmt``, ties to even, as IEEE 754 casts do.

    Bit for bit PyTorch's and ml_dtypes' casts of float32 values: subnormals
    round on the subnormal grid, a value past the largest finite one by half
    a unit or more becomes ±inf, ±inf stay, a NaN stays a NaN (its sign kept;
    its payload, which implementations treat differently, is not part of the
    contract). float64 values are rounded once, directly, as ml_dtypes does
    (see the module docstring): PyTorch rounds twice, through float32, and
    can differ by one unit on a near-tie.

    Parameters
    ----------
    x : array_like
        Real values; float16 input is read as float32 (the package's dtype
        rule), integers and bools as float64.
    fmt : {"bfloat16", "float16", "float32"}

    Returns
    -------
    ndarray of x's shape, float32 for float32 input, float64 for float64 input
        Every value exactly representable in ``fmt``.

    Examples
    --------
    >>> import numpy as np
    >>> round_to(np.array([1 + 2**-8, 1 + 3 * 2**-8, 70000.0], np.float32), "bfloat16").tolist()
    [1.0, 1.015625, 70144.0]
    >>> round_to(np.array([1 + 2**-8 + 2**-30]), "bfloat16").tolist()  # once, not through float32
    [1.0078125]
    """
    check_choice(fmt, "fmt", FORMATS)
    arr = as_float_array(x, "x")
    return round_to_core(arr, fmt)


def round_to_core(x: np.ndarray, fmt: str) -> np.ndarray:
    """:func:`round_to` without validation: ``x`` is a float32 or float64 array, ``fmt`` a known format."""
    if fmt == "float32":
        if x.dtype == np.float32:
            return x.copy()
        with np.errstate(over="ignore", invalid="ignore"):
            return x.astype(np.float32).astype(np.float64)  # one correctly rounded cast
    if fmt == "float16":
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to ±inf is the rounding asked for
            return x.astype(np.float16).astype(x.dtype)  # NumPy's cast: correctly rounded, see above
    flat = x.reshape(-1)  # (n,)
    out = np.empty(flat.shape, np.uint32)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start : start + _CHUNK]
        bits = float32_bits_rounded_to_odd(part) if part.dtype == np.float64 else part.view(np.uint32)
        round_float32_bits_to_bfloat16(bits, out=out[start : start + _CHUNK])
    rounded = out.view(np.float32).reshape(x.shape)
    return rounded if x.dtype == np.float32 else rounded.astype(np.float64)


def round_float32_bits_to_bfloat16(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 bit patterns (uint32, 1-d) -> the float32 patterns of their values rounded to bfloat16.

    Ties go to even; see the module docstring. bfloat16 has float32's
    exponent range, so one grid serves every binade: 16 bits are dropped.
    The sign bit rides along: a carry reaches it only from a NaN, replaced
    by a quiet NaN of the same sign. ``out`` (uint32, bits' shape, not
    ``bits`` itself) receives the result, computed in place without temporaries.
    """
    rounded = np.empty_like(bits) if out is None else out
    np.right_shift(bits, 16, out=rounded)
    rounded &= np.uint32(1)  # the last kept bit: a tie rounds to even
    rounded += np.uint32(0x7FFF)  # half a unit of the last kept bit, minus one
    rounded += bits
    rounded &= np.uint32(0xFFFF0000)
    nan = np.isnan(bits.view(np.float32))
    if nan.any():
        rounded[nan] = (bits[nan] & np.uint32(0xFFFF0000)) | _QUIET  # a quiet NaN, sign kept
    return rounded


def float32_bits_rounded_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 values (1-d) -> the bits of the float32 values they round to *to odd*.

    Truncate toward zero, then set the last bit if anything was cut off.
    Values past float32's range become its largest finite value with the
    last bit set (odd), so the second rounding still sends them to ±inf.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        nearest = x.astype(np.float32)  # round to nearest; beyond float32's range: inf
    back = nearest.astype(np.float64)
    bits = nearest.view(np.uint32)
    # Where the cast rounded away from zero, step one unit back toward zero (the
    # magnitude is the low 31 bits, so -1 on the pattern shrinks it whatever the sign),
    # which truncates; then mark every inexact result by setting its last bit.
    bits = bits - (np.abs(back) > np.abs(x)).astype(np.uint32)
    bits |= (back != x).astype(np.uint32)  # NaN compares unequal: harmless, only low bits change
    return bits


def to_bits(x: Any, fmt: str) -> np.ndarray:
    """The 16-bit patterns of ``x`` rounded to ``fmt`` (:func:`round_to`'s rounding).

    Parameters
    ----------
    x : array_like
    fmt : {"bfloat16", "float16"}

    Returns
    -------
    ndarray of uint16, x's shape
        bfloat16: the high half of the float32 pattern; float16: IEEE binary16.

    Examples
    --------
    >>> import numpy as np
    >>> [hex(b) for b in to_bits(np.array([1.0, -2.0, np.inf, 1 + 2**-8], np.float32), "bfloat16")]
    ['0x3f80', '0xc000', '0x7f80', '0x3f80']
    """
    check_choice(fmt, "fmt", ("bfloat16", "float16"))
    rounded = round_to_core(as_float_array(x, "x"), fmt).astype(np.float32, copy=False)
    if fmt == "bfloat16":
        return (rounded.view(np.uint32) >> 16).astype(np.uint16)
    return rounded.astype(np.float16).view(np.uint16)  # exact: every value is a float16 already


def from_bits(bits: Any, fmt: str) -> np.ndarray:
    """The float32 values of 16-bit patterns of ``fmt`` (exact).

    Parameters
    ----------
    bits : ndarray of uint16 or int16
    fmt : {"bfloat16", "float16"}

    Returns
    -------
    ndarray of float32, bits' shape
    """
    check_choice(fmt, "fmt", ("bfloat16", "float16"))
    arr = np.asarray(bits)
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize != 2:
        raise TypeError(f"bits must be a 16-bit integer array, got dtype {arr.dtype}")
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False).view(np.uint16)
    if fmt == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.view(np.float16).astype(np.float32)
