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
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from lowrank.io.safetensors import read_safetensors, safetensors_writer

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

    Parameters
    ----------
    path : str or os.PathLike
    arrays : mapping of str to ndarray
        Each array, of any shape, is stored as the member ``<name>.npy``.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    TypeError
        If an array has dtype object.
    """
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"arrays[{name!r}] has dtype object, which .npz can only store by pickling")

    def write(f: IO[bytes]) -> None:
        # np.savez's own loop, with the same bytes: np.savez(f, **arrays) would take
        # an array named "file" or "allow_pickle" for its own argument of that name.
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, arr in arrays.items():
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)

    return atomic_write(path, write)


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
        if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy file holds one bare array
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{os.fspath(path)} is not a readable .npz file: {exc}") from None


# ---------------------------------------------------------------- safetensors
# The format itself lives in lowrank.io.safetensors (NumPy alone); here it meets
# the atomic write.


def save_safetensors(
    path: PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    dtypes: str | Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to a ``.safetensors`` file atomically, with NumPy alone.

    The bytes are the ``safetensors`` package's for the same tensors (several
    ``__metadata__`` keys are written sorted). Parameters and errors: see
    :func:`lowrank.io.safetensors.safetensors_writer`; ``dtypes="bfloat16"``
    stores every float tensor rounded to bfloat16.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    return atomic_write(path, safetensors_writer(tensors, metadata, dtypes=dtypes))


def load_safetensors(path: PathLike, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read the tensors of a ``.safetensors`` file as NumPy arrays, with NumPy alone.

    BF16 tensors become float32 exactly; ``names`` reads a subset. See
    :func:`lowrank.io.safetensors.read_safetensors`, and
    :func:`lowrank.io.safetensors.read_safetensors_header` for ``__metadata__``.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is not a readable safetensors file: one line naming the
        file and the rule it breaks (header length, JSON, dtype, shape,
        size, offsets, layout, ...).
    """
    return read_safetensors(path, names)


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

    def write(f: IO[bytes]) -> None:
        f.write(text.encode("utf-8"))

    return atomic_write(path, write)
