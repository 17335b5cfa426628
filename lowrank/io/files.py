"""File primitives: atomic writes, pickle-free ``.npz``, JSON and safetensors.

Nothing here ever unpickles: arrays are read with ``allow_pickle=False``, and
every write goes to a temporary file in the target's folder that then
replaces the target with ``os.replace``, so a crash mid-write leaves the old
file intact, never a half-written one.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

PathLike = str | os.PathLike


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then move it onto ``path``.

    Parameters
    ----------
    path : str or os.PathLike
    write : callable
        Receives the open binary file and writes the whole content.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_npz(path: PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` to an uncompressed ``.npz`` file atomically.

    Object arrays are refused, since reading them back would need pickle.
    """
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"arrays[{name!r}] has dtype object, which .npz can only store by pickling")
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file, never unpickling.

    Raises
    ------
    ValueError
        If the file is not a readable ``.npz`` archive (corrupt, truncated,
        or holding pickled objects).
    FileNotFoundError
        If there is no such file.
    """
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, Mapping):  # a .npy file holds one bare array
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{os.fspath(path)} is not a readable .npz file: {exc}") from None


# ---------------------------------------------------------------- safetensors
# The `io` extra. safetensors is imported inside the functions that need it,
# so `import lowrank` (and this module) keeps depending on NumPy alone.

_IO_EXTRA = "pip install 'lowrank[io]'"


def _safetensors_numpy() -> Any:
    """``safetensors.numpy``, or an ImportError that names the extra to install."""
    try:
        import safetensors.numpy as st_numpy
    except ImportError:
        raise ImportError(
            f"reading and writing .safetensors files needs the safetensors package: {_IO_EXTRA}"
        ) from None
    return st_numpy


def save_safetensors(
    path: PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` to a ``.safetensors`` file atomically (needs the ``io`` extra).

    Parameters
    ----------
    path : str or os.PathLike
    tensors : mapping from str to ndarray
        Numeric or bool arrays (0-d allowed); stored C-contiguous.
    metadata : mapping from str to str, optional
        Stored in the file's header (``__metadata__``). With at most one key
        the same tensors give byte-identical files; safetensors may order
        several keys differently from run to run.
    """
    st_numpy = _safetensors_numpy()
    arrays = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr, order="C")  # ascontiguousarray would make 0-d 1-d
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"tensors[{name!r}] must be numeric or bool, got dtype {arr.dtype}")
        arrays[name] = arr
    data = st_numpy.save(arrays, metadata=None if metadata is None else dict(metadata))
    return atomic_write(path, lambda f: f.write(data))


def load_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` file as NumPy arrays (needs the ``io`` extra).

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is not a readable safetensors file (corrupt, truncated,
        or holding a dtype NumPy has no type for, such as bfloat16).
    """
    st_numpy = _safetensors_numpy()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    data = path.read_bytes()
    try:
        return dict(st_numpy.load(data))
    except Exception as exc:  # a foreign parser: whatever it raises, the file is unreadable
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is not a readable .safetensors file: {reason}") from None


def load_json(path: PathLike) -> Any:
    """Read a JSON file; a corrupt or truncated one is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable JSON file: {exc}") from None


def save_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically (the same object gives the same bytes)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
