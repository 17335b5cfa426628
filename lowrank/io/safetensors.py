"""The safetensors format, read and written with NumPy alone.

A ``.safetensors`` file is three parts::

    8 bytes      N, the header's length: an unsigned little-endian 64-bit integer
    N bytes      the header: a UTF-8 JSON object
                   {"<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
                    "__metadata__": {"<key>": "<value>", ...}}          (optional)
    the rest     the data section: each tensor's bytes, little-endian, C order, at
                 [begin, end) counted from the section's start

Files written here are byte-for-byte those of the ``safetensors`` package
(checked in the tests): tensors sorted by dtype in the package's order (U64,
I64, F64, F32, U32, I32, BF16, F16, U16, I16, I8, U8, BOOL: every tensor
stays aligned to its item size), then by name; the header as compact JSON with ``__metadata__`` first
(its keys sorted here, where the package's order varies from run to run),
padded with spaces to a multiple of 8 bytes so every tensor starts aligned.

bfloat16 has no NumPy dtype. Reading, BF16 becomes float32 exactly (each
16-bit pattern is the high half of a float32's 32 bits). Writing, float
tensors chosen with ``dtypes=`` are rounded to bfloat16 by
:func:`bfloat16_bits`, which is :func:`lowrank.precision.to_bits`: round to
nearest, ties to even, on the integer bits (the one place bfloat16 rounding lives).

This module holds the format and nothing else: :func:`read_safetensors`
reads, :func:`safetensors_writer` validates the tensors and returns the
function that writes the file's bytes. :mod:`lowrank.io.files` wraps them
as ``load_safetensors`` and ``save_safetensors`` (the atomic write).

Reading validates every claim of the header before allocating anything, and
then reads each tensor's bytes straight into its final array: a file never
costs more memory than its header plus the arrays asked for.
"""

from __future__ import annotations

import io
import json
import mmap
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from lowrank.precision.rounding import from_bits, to_bits

__all__ = [
    "MAX_HEADER_BYTES",
    "SafetensorsHeader",
    "TensorInfo",
    "bfloat16_bits",
    "bfloat16_to_float32",
    "read_safetensors",
    "read_safetensors_header",
    "safetensors_writer",
]

PathLike = str | os.PathLike

MAX_HEADER_BYTES = 100_000_000
"""The largest header accepted, in bytes (the ``safetensors`` package's own limit)."""

# Each dtype's NumPy type (little-endian) and its rank in the package's write order
# (its Rust enum's order; a file lists the highest rank first). BF16 has no NumPy
# type: its bits are stored as '<u2' and read into float32.
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "BOOL": (np.dtype(np.bool_), 0),
    "U8": (np.dtype("u1"), 1),
    "I8": (np.dtype("i1"), 2),
    "I16": (np.dtype("<i2"), 3),
    "U16": (np.dtype("<u2"), 4),
    "F16": (np.dtype("<f2"), 5),
    "BF16": (np.dtype("<u2"), 6),
    "I32": (np.dtype("<i4"), 7),
    "U32": (np.dtype("<u4"), 8),
    "F32": (np.dtype("<f4"), 9),
    "F64": (np.dtype("<f8"), 10),
    "I64": (np.dtype("<i8"), 11),
    "U64": (np.dtype("<u8"), 12),
}
_NAME_OF = {(dt.kind, dt.itemsize): name for name, (dt, _) in _DTYPES.items() if name != "BF16"}
_TARGETS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}

# Conversions stream in chunks of this many elements, so a converted copy of a
# large tensor never exists whole. It is faster too: writing 256 MiB of float32
# as bfloat16 took 0.3 s in chunks of 1 Mi elements (64 Ki: the same; 8 Mi: 0.8 s)
# against 4.5 s converting the whole array at once (measured on 2 loaded cores).
_CHUNK = 1 << 20
_MAPPED_FROM = 1 << 22  # bytes: tensors this large are read into a memory map of their own (_empty)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header.

    Attributes
    ----------
    dtype : str
        The format's dtype name: ``"F32"``, ``"BF16"``, ``"I64"``, ...
    shape : tuple of int
    begin, end : int
        Byte offsets of its data, counted from the start of the data section.
    """

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header.

    Attributes
    ----------
    tensors : dict from str to TensorInfo
        Every tensor, in the order of their data in the file.
    metadata : dict from str to str
        The ``__metadata__`` map (empty when the file has none).
    data_start : int
        Where the data section starts in the file: ``8 + N``.
    """

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


# ---------------------------------------------------------------- bfloat16


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16, returning the 16-bit patterns.

    Round to nearest, ties to even, as IEEE 754 does: a value past the
    largest finite bfloat16 by half a unit or more becomes ±inf, ±inf stay
    ±inf, a NaN stays a NaN (its sign and top payload bits kept, the quiet
    bit set), subnormals round on the subnormal grid.

    float64 input is rounded once, not twice: it is first rounded to float32
    *to odd* (truncated, with the last bit set when anything was cut off),
    which keeps enough information that the second rounding gives the
    correctly rounded bfloat16 (Boldo and Melquiond, "Emulation of FMA and
    correctly rounded sums: proved algorithms using rounding to odd", 2008).
    A plain float32 cast first would round twice and can land on the wrong
    side of a tie, e.g. ``1 + 2**-8 + 2**-30`` (PyTorch gives 1.0, the
    correct answer is ``1 + 2**-7``).

    Parameters
    ----------
    x : ndarray
        float64, float32 or float16 values, any shape.

    Returns
    -------
    ndarray of uint16, same shape as ``x``

    Examples
    --------
    >>> import numpy as np
    >>> [hex(b) for b in bfloat16_bits(np.array([1.0, -2.0, np.inf, 1 + 2**-8], np.float32))]
    ['0x3f80', '0xc000', '0x7f80', '0x3f80']
    """
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"x must hold float16, float32 or float64 values, got dtype {x.dtype}")
    return to_bits(x.astype(np.float32) if x.dtype.itemsize == 2 else x, "bfloat16")  # float16 -> float32: exact


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bfloat16 bit patterns (exact: the bits become the high half)."""
    return from_bits(bits, "bfloat16")


# ---------------------------------------------------------------- reading


def _fail(path: PathLike, rule: str, detail: str) -> ValueError:
    return ValueError(f"{os.fspath(path)} is not a readable .safetensors file: {rule}: {detail}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(Exception):
    pass


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors_header(path: PathLike) -> SafetensorsHeader:
    """Read and validate a safetensors file's header, without reading any tensor.

    Every claim a file can make is checked against the others and against
    the file's size, so that nothing is allocated from a lie: the header
    length (at most the bytes after it, and at most :data:`MAX_HEADER_BYTES`),
    the JSON (well-formed UTF-8, an object, no key twice), ``__metadata__``
    (a map of str to str), each entry (an object with a known ``dtype``, a
    ``shape`` of non-negative ints, ``data_offsets`` of two non-negative
    ints, ``begin <= end``), each size (``prod(shape) * itemsize == end -
    begin``), the offsets (inside the data section), and the layout (in
    offset order the tensors tile the data section exactly: no overlap, no
    gap, nothing after the last).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    SafetensorsHeader

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        One line naming the file and the rule the file breaks.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb", buffering=0) as f:
        return _read_header(f, path)


def _read_header(f: io.FileIO, path: Path) -> SafetensorsHeader:
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise _fail(path, "header length", f"the file has {size} bytes, fewer than the 8 that give the header's length")
    length = np.empty(8, np.uint8)
    _read_into(f, path, "the header length", length)
    n = int.from_bytes(length.tobytes(), "little")
    if n > MAX_HEADER_BYTES:
        raise _fail(path, "header length", f"{n:,} bytes claimed, more than the limit of {MAX_HEADER_BYTES:,}")
    if n > size - 8:
        raise _fail(path, "header length", f"{n:,} bytes claimed, but only {size - 8:,} follow")
    raw = np.empty(n, np.uint8)
    _read_into(f, path, "the header", raw)
    try:
        text = raw.tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(path, "header encoding", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except _DuplicateKey as exc:
        raise _fail(path, "duplicate key", f"{exc.args[0]!r} appears twice in the header") from None
    except (ValueError, RecursionError) as exc:
        raise _fail(path, "header JSON", f"malformed ({str(exc).splitlines()[0] or type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise _fail(path, "header JSON", f"the header must be a JSON object, got {type(obj).__name__}")

    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "metadata", "__metadata__ must map strings to strings")

    data_size = size - 8 - n
    tensors = [(name, _check_entry(path, name, entry, data_size)) for name, entry in obj.items()]
    tensors.sort(key=lambda item: (item[1].begin, item[1].end))
    offset = 0
    for name, info in tensors:
        if info.begin != offset:
            what = "overlaps the tensor before it" if info.begin < offset else "leaves a gap before it"
            raise _fail(
                path,
                "layout",
                f"tensor {name!r} starts at byte {info.begin}, the previous one ends at {offset}: it {what}",
            )
        offset = info.end
    if offset != data_size:
        raise _fail(
            path,
            "layout",
            f"the tensors end at byte {offset} of a {data_size}-byte data section: "
            f"{data_size - offset} bytes belong to no tensor",
        )
    return SafetensorsHeader(dict(tensors), metadata, 8 + n)


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    """Validate one header entry: its fields, its byte count, its bounds."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _fail(path, "entry", f"tensor {name!r} must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise _fail(path, "dtype", f"tensor {name!r} has dtype {dtype!r}, not one of {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _fail(path, "shape", f"tensor {name!r} has shape {shape!r}, not a list of non-negative ints")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise _fail(
            path,
            "data_offsets",
            f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end",
        )
    begin, end = offsets
    nbytes = _DTYPES[dtype][0].itemsize
    for d in shape:  # Python ints: no overflow, however large the claim
        nbytes *= d
    if nbytes != end - begin:
        raise _fail(
            path,
            "size",
            f"tensor {name!r} of shape {tuple(shape)} and dtype {dtype} needs {nbytes:,} "
            f"bytes, but data_offsets span {end - begin:,}",
        )
    if end > data_size:
        raise _fail(
            path,
            "data_offsets",
            f"tensor {name!r} ends at byte {end:,}, past the end of the {data_size:,}-byte data section",
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def read_safetensors(path: PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read the tensors of a ``.safetensors`` file as NumPy arrays (NumPy alone).

    Parameters
    ----------
    path : str or os.PathLike
    names : iterable of str, optional
        Read only these tensors (the others' bytes are never read). Default: all.

    Returns
    -------
    dict from str to ndarray
        In the file's data order (or the order of ``names``). Each array has
        its file dtype (little-endian), except BF16, which becomes float32
        exactly. Use :func:`read_safetensors_header` for ``__metadata__``.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file breaks a rule of the format (see
        :func:`read_safetensors_header`), changed while being read, or lacks
        one of ``names``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb", buffering=0) as f:
        header = _read_header(f, path)
        if names is None:
            wanted = list(header.tensors)
        else:
            wanted = [names] if isinstance(names, str) else list(names)
            unknown = [name for name in wanted if name not in header.tensors]
            if unknown:
                raise ValueError(f"names: {path} holds no tensor {unknown[0]!r} (it has {len(header.tensors)})")
        return {name: _read_tensor(f, path, name, header.tensors[name], header.data_start) for name in wanted}


def _read_tensor(f: io.FileIO, path: Path, name: str, info: TensorInfo, data_start: int) -> np.ndarray:
    """Read one validated tensor straight into its final array."""
    file_dtype = _DTYPES[info.dtype][0]
    f.seek(data_start + info.begin)
    if info.dtype != "BF16":
        out = _empty(info.shape, file_dtype)
        _read_into(f, path, f"tensor {name!r}", out)
        if info.dtype == "BOOL" and out.size and out.view(np.uint8).max() > 1:
            raise _fail(path, "bool", f"tensor {name!r} holds a byte other than 0 or 1")
        return out
    # bfloat16: read the 16-bit patterns chunk by chunk into the float32 result
    out = _empty(info.shape, np.dtype(np.float32))
    flat = out.reshape(-1).view(np.uint32)  # (n,)
    chunk = np.empty(min(out.size, _CHUNK), np.dtype("<u2"))
    for i in range(0, out.size, _CHUNK):
        part = chunk[: min(_CHUNK, out.size - i)]
        _read_into(f, path, f"tensor {name!r}", part)
        np.left_shift(part, 16, out=flat[i : i + part.size], dtype=np.uint32)
    return out


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised, writable, C-contiguous array that a read fills at full speed.

    Large arrays live in their own anonymous memory map rather than in
    NumPy's allocation: NumPy asks the kernel for transparent huge pages on
    large arrays, and where the kernel then compacts memory on each first
    touch (``defrag=madvise``, a common default) a read into such an array
    runs at a third of the page cache's speed (and varies run to run). Where
    the platform allows, the map's pages are faulted in at once
    (``MAP_POPULATE``). The map is freed with the array.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < _MAPPED_FROM or not hasattr(mmap, "MAP_ANONYMOUS"):  # small, or not a POSIX system
        return np.empty(shape, dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault in at once
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype).reshape(shape)


def _read_into(f: io.FileIO, path: Path, what: str, arr: np.ndarray) -> None:
    """Fill the C-contiguous ``arr`` from ``f``; a short read means the file changed under us."""
    view = arr.reshape(-1).view(np.uint8).data  # the array's own memory, as bytes
    filled = 0
    while filled < len(view):  # one read may return less (at most ~2 GiB on Linux)
        got = f.readinto(view[filled:])
        if not got:
            raise _fail(path, "truncated", f"the file ended inside {what} (it changed while being read)")
        filled += got


# ---------------------------------------------------------------- writing


def safetensors_writer(
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    dtypes: str | Mapping[str, str] | None = None,
) -> Callable[[IO[bytes]], None]:
    """Validate ``tensors`` and return the function that writes them as a safetensors file.

    Everything is checked here, before any file is opened; the returned
    ``write(f)`` streams the header and each tensor's bytes into the binary
    file ``f`` (for :func:`lowrank.io.files.atomic_write`), copying only
    what it must convert, chunk by chunk.

    The bytes are those the ``safetensors`` package writes for the same
    tensors (see the module docstring for the order), except that several
    ``__metadata__`` keys are written sorted, so the same input always gives
    the same file.

    Parameters
    ----------
    tensors : mapping from str to ndarray
        Numeric or bool arrays of any shape (0-d and zero-size included), any
        strides and byte order: stored little-endian in C order. They must
        not change before ``write`` is called.
    metadata : mapping from str to str, optional
        Stored as the header's ``__metadata__``.
    dtypes : str or mapping from str to str, optional
        Store floats in another precision: ``"bfloat16"``, ``"float16"``,
        ``"float32"`` or ``"float64"``. One string applies to every floating
        tensor (integer and bool tensors are kept); a mapping applies to the
        tensors it names. bfloat16 rounds as :func:`bfloat16_bits` does;
        the others as NumPy's cast does (also to nearest, ties to even).

    Returns
    -------
    callable
        ``write(f)`` for a binary file opened for writing.

    Raises
    ------
    TypeError
        A name or metadata entry that is not a str, an array of a dtype the
        format has no type for (complex, object, strings), a ``dtypes`` target
        for a non-float tensor.
    ValueError
        A name the format reserves (``"__metadata__"``) or that is not valid
        UTF-8, an unknown ``dtypes`` target or name.
    """
    plan = _plan(tensors, dtypes)
    header = _header_bytes(plan, metadata)

    def write(f: IO[bytes]) -> None:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for _, arr, stored in plan:
            _write_tensor(f, arr, stored)

    return write


def _plan(
    tensors: Mapping[str, np.ndarray], dtypes: str | Mapping[str, str] | None
) -> list[tuple[str, np.ndarray, str]]:
    """(name, array, format dtype) for each tensor, in the order the file stores them."""
    if dtypes is not None and not isinstance(dtypes, (str, Mapping)):
        raise TypeError(f"dtypes must be a str, a mapping from names to str, or None, got {type(dtypes).__name__}")
    targets = dtypes.values() if isinstance(dtypes, Mapping) else [] if dtypes is None else [dtypes]
    for target in targets:
        if target not in _TARGETS:
            raise ValueError(f"dtypes: the target must be one of {', '.join(_TARGETS)}, got {target!r}")
    if isinstance(dtypes, Mapping):
        for name in dtypes:
            if name not in tensors:
                raise ValueError(f"dtypes names {name!r}, which is not among the tensors")

    plan = []
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__} {name!r}")
        if name == "__metadata__":
            raise ValueError("tensor name '__metadata__' is reserved for the header's metadata")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"tensor name {name!r} is not valid UTF-8 (it holds a lone surrogate)") from None
        arr = np.asarray(arr)
        stored = _NAME_OF.get((arr.dtype.kind, arr.dtype.itemsize))
        if stored is None:
            raise TypeError(f"tensors[{name!r}] must be numeric or bool, got dtype {arr.dtype}")
        precision = dtypes.get(name) if isinstance(dtypes, Mapping) else dtypes
        if precision is not None:  # validated above
            if arr.dtype.kind == "f":
                stored = _TARGETS[precision]
            elif isinstance(dtypes, Mapping):
                raise TypeError(f"dtypes[{name!r}] = {precision!r} needs a float tensor, got dtype {arr.dtype}")
        plan.append((name, arr, stored))
    plan.sort(key=lambda item: (-_DTYPES[item[2]][1], item[0]))
    return plan


def _header_bytes(plan: list[tuple[str, np.ndarray, str]], metadata: Mapping[str, str] | None) -> bytes:
    """The JSON header, compact and padded with spaces to a multiple of 8 bytes."""
    header: dict[str, Any] = {}
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping from str to str, got {type(metadata).__name__}")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, arr, stored in plan:
        nbytes = arr.size * _DTYPES[stored][0].itemsize
        header[name] = {"dtype": stored, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    try:  # ensure_ascii=False and these separators: the package's serde_json output
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("metadata is not valid UTF-8 (it holds a lone surrogate)") from None
    return text + b" " * (-len(text) % 8)


def _write_tensor(f: IO[bytes], arr: np.ndarray, stored: str) -> None:
    """Write ``arr``'s values as the format's ``stored`` dtype, little-endian, C order."""
    file_dtype = _DTYPES[stored][0]
    if stored != "BF16" and arr.dtype == file_dtype and arr.flags.c_contiguous:
        f.write(arr.reshape(-1).data)  # the array's own memory: no copy
        return
    # Anything to convert (byte order, strides, precision) goes by chunks in C order.
    flat = arr.reshape(-1) if arr.flags.c_contiguous else arr.flat
    for i in range(0, arr.size, _CHUNK):
        part = np.asarray(flat[i : i + _CHUNK])  # (chunk,)
        if stored == "BF16":
            part = bfloat16_bits(part).astype("<u2", copy=False)
        else:
            with np.errstate(over="ignore"):  # float64 -> float16 past 65504 is inf, as IEEE rounds
                part = part.astype(file_dtype, copy=False)
        f.write(part.data)
