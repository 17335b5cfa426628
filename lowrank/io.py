"""Files: atomic ``.npz`` writes and pickle-free reads.

Nothing here ever unpickles: arrays are read with ``allow_pickle=False``, and
every write goes to a temporary file in the target's folder that then
replaces the target with ``os.replace``, so a crash mid-write leaves the old
file intact, never a half-written one.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

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
