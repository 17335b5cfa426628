"""lowrank.io.safetensors: the format by hand, against the safetensors package, PyTorch and hand-built bytes."""

from __future__ import annotations

import bisect
import json
import math
import re
import struct
import subprocess
import sys
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import METADATA, TENSOR_NAMES, TENSORS, bfloat16_patterns, every_float, stored_arrays

from lowrank.io import load_safetensors, save_safetensors
from lowrank.io.safetensors import (
    MAX_HEADER_BYTES,
    bfloat16_bits,
    bfloat16_to_float32,
    read_safetensors_header,
)


def little_endian_bytes(arr: np.ndarray) -> bytes:
    """What the file must hold for ``arr``: its values, little-endian, C order."""
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C").tobytes()


def header_of(data: bytes) -> tuple[int, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8 : 8 + n]


# ---------------------------------------------------------------- round trip


@given(TENSORS, st.none() | METADATA)
def test_round_trip_keeps_every_bit_dtype_shape_and_metadata(tmp_path_factory, tensors, metadata):
    path = save_safetensors(tmp_path_factory.mktemp("st") / "t.safetensors", tensors, metadata)
    back = load_safetensors(path)
    assert set(back) == set(tensors)
    for name, arr in tensors.items():
        assert back[name].shape == arr.shape
        assert back[name].dtype == arr.dtype.newbyteorder("<")
        assert back[name].tobytes() == little_endian_bytes(arr)  # bit-exact, NaN payloads included
    assert read_safetensors_header(path).metadata == (metadata or {})
    names = sorted(tensors)[::-1][:2]  # a subset (empty when tensors is), in the order asked
    assert list(load_safetensors(path, names=names)) == names


def test_the_file_is_the_format_built_by_hand(tmp_path):
    # Independent of both writers: the bytes spelled out from the format's definition.
    path = save_safetensors(
        tmp_path / "t.safetensors",
        {"b": np.array([1.5, -2.0], ">f4"), "a": np.array([[1], [2]], np.int64), "m": np.array(True)},
        {"format": "pt"},
    )
    header = (
        b'{"__metadata__":{"format":"pt"},'
        b'"a":{"dtype":"I64","shape":[2,1],"data_offsets":[0,16]},'
        b'"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]},'
        b'"m":{"dtype":"BOOL","shape":[],"data_offsets":[24,25]}}'
    )
    header += b" " * (-len(header) % 8)
    data = struct.pack("<qq", 1, 2) + struct.pack("<ff", 1.5, -2.0) + b"\x01"
    assert path.read_bytes() == struct.pack("<Q", len(header)) + header + data


# ---------------------------------------------------------------- the safetensors package


@given(TENSORS, st.none() | st.dictionaries(TENSOR_NAMES, TENSOR_NAMES, max_size=1))
def test_files_are_byte_for_byte_the_packages(tmp_path_factory, tensors, metadata):
    st_numpy = pytest.importorskip("safetensors.numpy")
    # safetensors 0.8 writes invalid JSON for no tensors with metadata ('{},"__metadata__":{}}').
    assume(tensors or metadata is None)
    folder = tmp_path_factory.mktemp("st")
    ours = save_safetensors(folder / "ours.safetensors", tensors, metadata)
    contiguous = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # the package ignores strides
    theirs = folder / "theirs.safetensors"
    st_numpy.save_file(contiguous, theirs, metadata=metadata)
    assert ours.read_bytes() == theirs.read_bytes()
    read_by_them, read_by_us = st_numpy.load_file(ours), load_safetensors(theirs)
    for name, arr in tensors.items():
        assert read_by_them[name].tobytes() == read_by_us[name].tobytes() == little_endian_bytes(arr)
        assert read_by_them[name].shape == read_by_us[name].shape == arr.shape


@given(
    st.dictionaries(TENSOR_NAMES, stored_arrays(), min_size=1, max_size=3),
    st.dictionaries(TENSOR_NAMES, TENSOR_NAMES, min_size=2, max_size=5),
)
def test_several_metadata_keys_give_the_packages_header_up_to_key_order(tmp_path_factory, tensors, metadata):
    # The package orders __metadata__ keys differently from run to run; lowrank sorts them.
    st_numpy = pytest.importorskip("safetensors.numpy")
    ours = save_safetensors(tmp_path_factory.mktemp("st") / "t.safetensors", tensors, metadata).read_bytes()
    theirs = st_numpy.save({k: np.asarray(v, order="C") for k, v in tensors.items()}, metadata=metadata)
    (n, ours_header), (m, theirs_header) = header_of(ours), header_of(theirs)
    assert n == m and ours[8 + n :] == theirs[8 + m :]
    assert json.loads(ours_header) == json.loads(theirs_header)
    assert list(json.loads(ours_header)["__metadata__"]) == sorted(metadata)


@given(
    st.dictionaries(TENSOR_NAMES, stored_arrays(st.just("<f4"), st.floats(width=32, allow_nan=False)), max_size=3),
    st.dictionaries(TENSOR_NAMES, stored_arrays(st.just("<i4")), max_size=2),
)
def test_bfloat16_files_are_byte_for_byte_torchs(tmp_path_factory, floats, ints):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    tensors = {**ints, **floats}
    path = save_safetensors(tmp_path_factory.mktemp("st") / "t.safetensors", tensors, dtypes="bfloat16")
    as_torch = {k: torch.from_numpy(np.array(v, order="C")) for k, v in tensors.items()}
    as_torch = {k: v.to(torch.bfloat16) if k in floats else v for k, v in as_torch.items()}
    assert path.read_bytes() == st_torch.save(as_torch)
    back = load_safetensors(path)
    for name in floats:
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], as_torch[name].float().numpy())


# ---------------------------------------------------------------- bfloat16 rounding


def _bf16_value(bits: int) -> float:
    """The value of a bfloat16 bit pattern, by definition: the top half of a float32."""
    return struct.unpack(">f", struct.pack(">HH", bits, 0))[0]


# Non-negative bfloat16 values in bit order (bits are monotone in value); 0x7F80 stands for
# 2**128, the next step after the largest finite value: reaching it by rounding means +inf.
_GRID = [Fraction(_bf16_value(b)) for b in range(0x7F80)] + [Fraction(2) ** 128]


def reference_bfloat16(x: float) -> int | None:
    """Correctly rounded bfloat16 bits of the exact value of ``x`` (nearest, ties to even); None for NaN."""
    if math.isnan(x):
        return None
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0
    if math.isinf(x):
        return sign | 0x7F80
    a = Fraction(abs(x))
    i = bisect.bisect_left(_GRID, a)
    if i == len(_GRID):
        return sign | 0x7F80
    if _GRID[i] == a:
        return sign | i
    below, above = a - _GRID[i - 1], _GRID[i] - a
    nearest = i - 1 if below < above or (below == above and (i - 1) % 2 == 0) else i
    return sign | nearest


HAND_PICKED = [
    (1.0, 0x3F80),
    (-2.0, 0xC000),
    (0.0, 0x0000),
    (-0.0, 0x8000),
    (1 + 2**-8, 0x3F80),  # a tie: to the even 1.0
    (1 + 3 * 2**-8, 0x3F82),  # a tie: to the even 1 + 2**-6
    (1 + 2**-8 + 2**-30, 0x3F81),  # just above a tie, in float64: rounding via float32 would give 0x3F80
    (2**-133, 0x0001),  # the smallest subnormal
    (2**-134, 0x0000),  # half of it: a tie, to the even 0
    (3 * 2**-134, 0x0002),  # a subnormal tie, to the even 2 * 2**-133
    (_bf16_value(0x7F7F), 0x7F7F),  # the largest finite value
    (2**128 - 2**119, 0x7F80),  # max + half a unit: the tie goes to inf, as IEEE says
    (2**128 - 2**119 - 2**100, 0x7F7F),
    (3.4028234663852886e38, 0x7F80),  # float32's max rounds to inf
    (1e300, 0x7F80),
    (-math.inf, 0xFF80),
]


def _exactly_float32(x: float) -> bool:
    return math.isinf(x) or (abs(x) <= 3.4028234663852886e38 and struct.unpack("<f", struct.pack("<f", x))[0] == x)


@pytest.mark.parametrize(
    ("x", "bits", "dtype"),
    [(x, b, np.float64) for x, b in HAND_PICKED] + [(x, b, np.float32) for x, b in HAND_PICKED if _exactly_float32(x)],
)
def test_bfloat16_rounding_of_hand_picked_values(x, bits, dtype):
    assert reference_bfloat16(x) == bits  # the reference agrees with the hand-written answer
    assert int(bfloat16_bits(np.array([x], dtype))[0]) == bits


def test_bfloat16_nan_stays_a_quiet_nan_with_its_sign():
    bits = np.array([0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FA12345], np.uint32)  # quiet, -quiet, signalling
    out = bfloat16_bits(bits.view(np.float32))
    assert list(out) == [0x7FC0, 0xFFC0, 0x7FC0, 0x7FE1]
    assert np.isnan(bfloat16_to_float32(out)).all()
    assert np.isnan(bfloat16_to_float32(bfloat16_bits(np.array([np.nan, -np.nan])))).all()


@pytest.mark.parametrize("width", [64, 32, 16])
@given(data=st.data())
def test_bfloat16_rounding_equals_the_exact_reference(width, data):
    values = data.draw(every_float(width, max_size=40))
    got = bfloat16_bits(values)
    assert got.dtype == np.uint16 and got.shape == values.shape
    for x, bits in zip(values.tolist(), got.tolist(), strict=True):
        want = reference_bfloat16(x)
        if want is None:
            assert (bits & 0x7F80) == 0x7F80 and (bits & 0x0040), f"NaN -> {bits:#06x}, not a quiet NaN"
        else:
            assert bits == want, f"{x!r} -> {bits:#06x}, exact rounding gives {want:#06x}"


@given(every_float(32))
def test_bfloat16_rounding_equals_torch(values):
    torch = pytest.importorskip("torch")
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ours = bfloat16_bits(values)
    nan = np.isnan(values)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bfloat16_to_float32(ours[nan])).all()  # torch's NaN pattern differs by path


@given(bfloat16_patterns())
def test_bfloat16_reads_exactly_and_rounds_back_to_itself(bits):
    values = bfloat16_to_float32(bits)
    for b, v in zip(bits.tolist(), values.tolist(), strict=True):
        assert math.isnan(v) or v == _bf16_value(b)
    finite_or_inf = ~np.isnan(values)
    np.testing.assert_array_equal(bfloat16_bits(values)[finite_or_inf], bits[finite_or_inf])


def test_bfloat16_refuses_what_it_cannot_round():
    with pytest.raises(TypeError, match="x must hold float16, float32 or float64 values, got dtype int64"):
        bfloat16_bits(np.arange(3))
    with pytest.raises(TypeError, match="bits must be a 16-bit integer array, got dtype float32"):
        bfloat16_to_float32(np.ones(2, np.float32))


# ---------------------------------------------------------------- dtypes= on writing


def test_dtypes_choose_the_stored_precision(tmp_path):
    x = np.array([1 + 2**-8 + 2**-30, 1 / 3, 70000.0])
    tensors = {"x": x, "y": x.astype(np.float32), "n": np.arange(3)}
    path = save_safetensors(tmp_path / "t.safetensors", tensors, dtypes="bfloat16")
    header = read_safetensors_header(path)
    assert {k: v.dtype for k, v in header.tensors.items()} == {"x": "BF16", "y": "BF16", "n": "I64"}
    back = load_safetensors(path)
    np.testing.assert_array_equal(back["x"], [_bf16_value(reference_bfloat16(v)) for v in x.tolist()])
    np.testing.assert_array_equal(back["n"], np.arange(3))

    path = save_safetensors(tmp_path / "u.safetensors", tensors, dtypes={"x": "float16", "y": "float64"})
    back = load_safetensors(path)
    assert back["x"].dtype == np.float16 and back["y"].dtype == np.float64
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(back["x"], x.astype(np.float16))  # 70000 -> inf, as IEEE rounds
    np.testing.assert_array_equal(back["y"], tensors["y"])


def test_writing_refuses_bad_input(tmp_path):
    target = tmp_path / "t.safetensors"
    cases = [
        (TypeError, r"tensors\['c'\] must be numeric or bool, got dtype complex128", {"c": np.ones(2, complex)}, {}),
        (
            TypeError,
            r"tensors\['q'\] must be numeric or bool, got dtype float128",
            {"q": np.ones(2, np.longdouble)},
            {},
        ),
        (TypeError, "tensor names must be str, got int 3", {3: np.ones(1)}, {}),
        (ValueError, "tensor name '__metadata__' is reserved", {"__metadata__": np.ones(1)}, {}),
        (ValueError, "is not valid UTF-8", {"\ud800": np.ones(1)}, {}),
        (TypeError, "metadata must map str to str, got 'a': 1", {"x": np.ones(1)}, {"metadata": {"a": 1}}),
        (
            ValueError,
            "dtypes: the target must be one of bfloat16, float16, float32, float64, got 'int8'",
            {"x": np.ones(1)},
            {"dtypes": "int8"},
        ),
        (
            ValueError,
            "dtypes names 'z', which is not among the tensors",
            {"x": np.ones(1)},
            {"dtypes": {"z": "float16"}},
        ),
        (
            TypeError,
            r"dtypes\['n'\] = 'bfloat16' needs a float tensor, got dtype int64",
            {"n": np.arange(2)},
            {"dtypes": {"n": "bfloat16"}},
        ),
    ]
    for error, message, tensors, kwargs in cases:
        if np.dtype(np.longdouble).itemsize == 8 and "float128" in message:
            continue  # longdouble is float64 on this platform
        with pytest.raises(error, match=message):
            save_safetensors(target, tensors, **kwargs)
        assert not target.exists()


# ---------------------------------------------------------------- hostile files, one rule each


def _file(tmp_path, header, data=b"", length=None):
    """A file built by hand: ``length`` (default: the header's) as u64, the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    "short file": (b"", None, b"", "header length: the file has 0 bytes"),
    "header beyond the cap": (b"{}", MAX_HEADER_BYTES + 1, b"", "header length: 100,000,001 bytes claimed, more than"),
    "header beyond the file": (b"{}", 4096, b"", "header length: 4,096 bytes claimed, but only 2 follow"),
    "not UTF-8": (b'{"\xff":1}', None, b"", "header encoding: not UTF-8"),
    "malformed JSON": (b'{"a":', None, b"", "header JSON: malformed"),
    "JSON constant": (b'{"a": NaN}', None, b"", "header JSON: malformed"),
    "not an object": (b"[1, 2]", None, b"", "header JSON: the header must be a JSON object, got list"),
    "duplicate name": (
        b'{"a":' + json.dumps(_entry()).encode() + b',"a":' + json.dumps(_entry()).encode() + b"}",
        None,
        bytes(8),
        "duplicate key: 'a' appears twice",
    ),
    "metadata": ({"__metadata__": {"k": 1}}, None, b"", "metadata: __metadata__ must map strings to strings"),
    "entry": ({"a": {"dtype": "F32", "shape": [2]}}, None, bytes(8), "entry: tensor 'a' must be an object"),
    "dtype": ({"a": _entry(dtype="F8_E4M3")}, None, bytes(8), "dtype: tensor 'a' has dtype 'F8_E4M3', not one of"),
    "negative shape": ({"a": _entry(shape=(-2,))}, None, bytes(8), "shape: tensor 'a' has shape [-2]"),
    "float shape": ({"a": _entry(shape=(2.0,))}, None, bytes(8), "shape: tensor 'a' has shape [2.0]"),
    "bool shape": ({"a": _entry(shape=(True, 2))}, None, bytes(8), "shape: tensor 'a' has shape [True, 2]"),
    "offsets reversed": ({"a": _entry(offsets=(8, 0))}, None, bytes(8), "data_offsets: tensor 'a' has data_offsets"),
    "offsets not a pair": ({"a": _entry(offsets=(0,))}, None, bytes(8), "data_offsets: tensor 'a' has data_offsets"),
    "size": ({"a": _entry(shape=(3,))}, None, bytes(8), "size: tensor 'a' of shape (3,) and dtype F32 needs 12"),
    "past the data": ({"a": _entry(offsets=(8, 16))}, None, bytes(8), "data_offsets: tensor 'a' ends at byte 16"),
    "overlap": (
        {"a": _entry(), "b": _entry(offsets=(4, 12))},
        None,
        bytes(12),
        "layout: tensor 'b' starts at byte 4, the previous one ends at 8: it overlaps",
    ),
    "gap": (
        {"a": _entry(), "b": _entry(offsets=(12, 20))},
        None,
        bytes(20),
        "layout: tensor 'b' starts at byte 12, the previous one ends at 8: it leaves a gap",
    ),
    "gap at the start": (
        {"a": _entry(offsets=(4, 12))},
        None,
        bytes(12),
        "layout: tensor 'a' starts at byte 4, the previous one ends at 0",
    ),
    "bytes after the last": ({"a": _entry()}, None, bytes(12), "layout: the tensors end at byte 8 of a 12-byte"),
    "bool bytes": ({"a": _entry("BOOL", (2,), (0, 2))}, None, b"\x01\x02", "bool: tensor 'a' holds a byte other"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_each_lie_of_a_hostile_file_is_a_one_line_value_error(tmp_path, case):
    header, length, data, message = HOSTILE[case]
    path = _file(tmp_path, header, data, length) if header or length else tmp_path / "bad.safetensors"
    if case == "short file":
        path.write_bytes(b"\x01\x02")
        message = "header length: the file has 2 bytes"
    with pytest.raises(ValueError) as info:
        load_safetensors(path)
    text = str(info.value)
    assert text.startswith(f"{path} is not a readable .safetensors file: "), text
    assert message in text and "\n" not in text, text


def test_a_huge_claimed_shape_is_refused_without_allocating(tmp_path):
    # 2**62 float64 values (2**65 bytes): consistent shape and span, but past the file's end
    huge = _file(tmp_path, {"a": _entry("F64", (2**31, 2**31), (0, 2**65))}, bytes(8))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="data_offsets: tensor 'a' ends at byte 36,893,488,147,419,103,232"):
            load_safetensors(huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes traced while refusing"
    small_span = _file(tmp_path, {"a": _entry("F64", (2**40, 2**40), (0, 8))}, bytes(8))
    with pytest.raises(ValueError, match=r"size: tensor 'a' of shape \(1099511627776, 1099511627776\)"):
        load_safetensors(small_span)


def test_reading_errors_for_missing_files_and_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_safetensors_header(tmp_path / "missing.safetensors")
    path = save_safetensors(tmp_path / "t.safetensors", {"a": np.ones(2)})
    with pytest.raises(ValueError, match=re.escape(f"names: {path} holds no tensor 'b'")):
        load_safetensors(path, names=["a", "b"])


# ---------------------------------------------------------------- NumPy alone


def test_reading_and_writing_need_numpy_alone(tmp_path):
    code = (
        "import sys; sys.modules['safetensors'] = None; sys.modules['torch'] = None\n"
        "import numpy as np; from lowrank.io import load_safetensors, save_safetensors\n"
        f"p = save_safetensors({str(tmp_path / 't.safetensors')!r}, {{'w': np.ones(3)}}, dtypes='bfloat16')\n"
        "print(load_safetensors(p)['w'].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[1.0, 1.0, 1.0]"


@given(tensors=TENSORS, data=st.data())
def test_every_truncation_of_a_safetensors_file_is_a_value_error(tmp_path_factory, tensors, data):
    """A file cut short anywhere (a crash of a writer that was not atomic, a partial copy)
    is refused with a one-line ValueError naming it, never read short or as a MemoryError."""
    path = tmp_path_factory.mktemp("cut") / "t.safetensors"
    save_safetensors(path, tensors)
    whole = path.read_bytes()
    cut = data.draw(st.integers(0, len(whole) - 1), label="bytes kept")
    path.write_bytes(whole[:cut])
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        load_safetensors(path)
    assert "\n" not in str(info.value)


def test_large_tensors_read_into_writable_arrays_that_hold_the_files_values(tmp_path):
    # above 4 MiB a tensor is read into a memory map of its own (not NumPy's allocator): the
    # arrays must still be ordinary writable C-contiguous arrays with the file's exact values
    rng = np.random.default_rng(0)
    big = rng.standard_normal((1100, 1024)).astype(np.float32)  # 4.3 MiB, over the threshold
    bits = rng.integers(0, 2**16, size=(1100, 1024), dtype=np.uint16)
    bits[(bits & 0x7F80) == 0x7F80] = 0  # no NaN/inf patterns: compare values with ==
    as_float = (bits.astype(np.uint32) << 16).view(np.float32)  # the exact bfloat16 values
    path = tmp_path / "big.safetensors"
    save_safetensors(path, {"f32": big, "bf16": as_float}, dtypes={"bf16": "bfloat16"})
    got = load_safetensors(path)
    for name, want in (("f32", big), ("bf16", as_float)):
        assert got[name].dtype == np.float32 and got[name].shape == want.shape
        assert got[name].flags.c_contiguous and got[name].flags.writeable
        np.testing.assert_array_equal(got[name], want)
        got[name][0, 0] = 7.0  # writable memory of its own
        assert got[name][0, 0] == 7.0
