"""File primitives: atomic writes, pickle-free ``.npz`` and ``.npy``, JSON and safetensors.

What a user can rely on (``docs/reliability.md`` says how each is tested):

- **Nothing here ever unpickles.** Arrays are read with ``allow_pickle=False``.
- **A write is all or nothing.** :func:`atomic_write` writes a temporary file
  beside the target and moves it onto the target with ``os.replace``, so a
  crash mid-write leaves the old file intact, never a half-written one;
  :func:`atomic_write_folder` does the same for a folder of files.
- **Files look as if written with** ``open(path, "wb")``: a new file gets the
  mode the umask gives, an overwritten file keeps its mode, and writing
  through a symbolic link writes the file it points to (the link stays).
- **Leftovers of a killed write are removed by the next write to the same
  target**: only names of lowrank's own temporary pattern beside that target
  (``.NAME.XXXXXXXX.tmp``, ``.tmpdir``, ``.old``), more than a second old and
  not locked by a live writer (POSIX ``flock``; without ``fcntl``, as on
  Windows, nothing is removed).
- **Reading a hostile file costs memory bounded by its size**: every size a
  header claims is checked against the bytes the file holds before anything
  is allocated, and JSON nesting is bounded by :data:`MAX_JSON_DEPTH`.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from lowrank.io.safetensors import read_safetensors, safetensors_writer

PathLike = str | os.PathLike

MAX_JSON_DEPTH = 64
"""The deepest nesting of lists and objects :func:`load_json` reads (lowrank's own files nest 6 deep)."""

# A temporary name is ".NAME." + 8 characters + a suffix, beside NAME. The
# alphabet is mkstemp's, so leftovers of older lowrank versions match too.
_TEMP_TOKEN = r"[a-z0-9_]{8}"
_TEMP_SUFFIXES = ("tmp", "tmpdir", "old")
# A leftover younger than this is never removed: it covers the instant
# between a writer creating its temporary name and locking it.
_STALE_SECONDS = 1.0


# ---------------------------------------------------------------- output paths


def check_writable(path: PathLike, name: str = "path", *, folder: bool = False) -> Path:
    """Check, before any work, that ``path`` can be written; return it as a Path.

    A symbolic link is followed, as a write through it would be. Call it at
    the start of a command or a training run for every output path, so a
    typo fails in a second rather than after the work.

    Parameters
    ----------
    path : str or os.PathLike
        The file (or, with ``folder=True``, the folder) to be written.
    name : str
        What to call it in messages, e.g. ``"--out"`` or ``"checkpoint"``.
    folder : bool
        True if ``path`` names an output folder (written with
        :func:`atomic_write_folder`): it may then be an existing folder and
        must not be a file.

    Returns
    -------
    pathlib.Path
        ``path``, unresolved.

    Raises
    ------
    TypeError
        If ``path`` is not a str or os.PathLike.
    ValueError
        If ``path`` is empty, or exists and is neither a regular file nor a
        folder (a device, a pipe).
    FileNotFoundError
        If the folder that would hold it does not exist.
    NotADirectoryError
        If that folder is a file, or ``folder=True`` and ``path`` is a file.
    IsADirectoryError
        If ``folder=False`` and ``path`` is an existing folder.
    PermissionError
        If the folder that would hold it is not writable.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    if os.fspath(path) in ("", b""):
        raise ValueError(f"{name} must be a path, got ''")
    given = Path(path)
    target = _follow_link(given)
    parent = target.parent
    what = f"cannot write {name} {os.fspath(given)!r}"
    if not parent.exists():
        raise FileNotFoundError(f"{what}: the folder {os.fspath(parent)!r} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"{what}: {os.fspath(parent)!r} is a file, not a folder")
    if target.is_dir() and not folder:
        raise IsADirectoryError(f"{what}: it is a folder")
    if folder and target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{what}: it is a file, not a folder")
    if target.exists() and not (target.is_file() or target.is_dir()):
        raise ValueError(f"{what}: it is neither a regular file nor a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: the folder {os.fspath(parent)!r} is not writable")
    return given


def _follow_link(path: Path) -> Path:
    """``path``, or the file a symbolic link at ``path`` points to (which may not exist yet)."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops where the links loop
        raise OSError(f"cannot write {os.fspath(path)}: its symbolic links form a loop")
    return target


# ---------------------------------------------------------------- atomic writes


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then move it onto ``path``.

    A crash at any point leaves either the old file or the new one at
    ``path``. The new file has the mode ``open(path, "wb")`` would give it:
    the umask's for a new file, the old file's on overwrite. A symbolic link
    at ``path`` is followed: the file it points to is replaced, the link
    stays. Leftover temporary files of earlier writes to ``path`` that were
    killed are removed (see the module docstring).

    Parameters
    ----------
    path : str or os.PathLike
    write : callable
        Receives the open binary file and writes the whole content.

    Returns
    -------
    pathlib.Path
        The path written (as given, not resolved).

    Raises
    ------
    FileNotFoundError
        If the folder of ``path`` does not exist.
    IsADirectoryError
        If ``path`` is a folder.
    ValueError
        If ``path`` is something else that is not a regular file (a device, a pipe).
    """
    path = Path(path)
    target = _follow_link(path)
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    if target.exists() and not target.is_file():  # os.replace would put a file in place of a device or pipe
        raise ValueError(f"cannot write {path}: it is neither a regular file nor a folder")
    start = time.time()
    mode = stat.S_IMODE(os.stat(target).st_mode) if target.exists() else None
    fd, tmp = _create_temp(target, "tmp", folder=False)
    try:
        with os.fdopen(fd, "wb") as f:
            _lock(f.fileno())  # held until closed, past the replace: a live write is never "stale"
            if mode is not None:
                os.chmod(tmp, mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _remove_stale(target, start)
    return path


def atomic_write_folder(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder of files as a unit: ``write(tmp)`` fills a temporary folder that then replaces ``path``.

    Use it for outputs made of several files that must match (an adapter's
    weights and config, a folder of test vectors and their manifest): a
    reader sees the old set or the new one, never a mix. Entries of an
    existing folder at ``path`` that ``write`` does not create are carried
    over (hard links, or copies where the file system has none), so a
    README beside an adapter survives; the folder keeps its mode.

    On POSIX the swap is two renames, and a crash leaves one of these
    states (the next write to ``path`` removes the leftovers):

    1. before the first rename: the old folder at ``path``, the new one
       complete or partial in ``.NAME.XXXXXXXX.tmpdir``;
    2. between the renames (a few microseconds): nothing at ``path``, the
       old folder complete in ``.NAME.XXXXXXXX.old``, the new one complete
       in the ``.tmpdir``;
    3. after the second rename: the new folder at ``path``, the old one
       (possibly half removed) in the ``.old``.

    A reader may thus find ``path`` missing (state 2), never a mix of the
    two versions after a crash. Writers of the same folder may run at once:
    the renames take turns (a lock on the parent folder), the last swap
    wins. A reader that opens the folder once and reads its files relative
    to it (``dir_fd``) sees one version; one that reads paths one by one
    while another process writes can straddle a swap. A symbolic link at
    ``path`` is followed.

    Parameters
    ----------
    path : str or os.PathLike
        The folder to write; its parent must exist.
    write : callable
        Receives the temporary folder (a pathlib.Path, empty, on the same
        file system) and writes every file of the unit into it. Plain
        ``open`` is enough: nothing else sees the folder before the swap.

    Returns
    -------
    pathlib.Path
        The path written (as given, not resolved).

    Raises
    ------
    FileNotFoundError
        If the parent of ``path`` does not exist.
    NotADirectoryError
        If ``path`` is a file.
    """
    import shutil

    path = Path(path)
    target = _follow_link(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {target.parent} does not exist")
    if not _is_folder_or_missing(target):
        raise NotADirectoryError(f"cannot write the folder {path}: it is a file")
    start = time.time()
    _, tmp = _create_temp(target, "tmpdir", folder=True)
    tmp_lock = _open_locked(tmp)
    try:
        write(tmp)
        try:
            _carry_over(target, tmp)
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        except FileNotFoundError:  # no old folder (or another writer is swapping it): nothing to keep
            pass
        _fsync_tree(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _close(tmp_lock)
    _remove_stale(target, start)
    return path


def _is_folder_or_missing(path: Path) -> bool:
    """True if ``path`` is a folder or nothing (one ``stat``: no window between two questions)."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is renamed away first, then removed.

    The renames hold a lock on the parent folder, so two writers' renames
    never interleave (without it, a second writer could fill the gap
    between the first one's two renames). The folder renamed away stays
    locked until it is removed, so no cleanup takes it for a leftover.
    """
    import shutil

    old_lock, old = -1, None
    try:
        parent_lock = _open_locked(target.parent)
        try:
            if target.exists():
                old_lock = _open_locked(target)
                _, old = _create_temp(target, "old", folder=True)
                os.rename(target, old)  # replaces the empty placeholder folder
            try:
                os.rename(new, target)
            except BaseException:
                if old is not None:
                    os.rename(old, target)
                raise
        finally:
            _close(parent_lock)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        _close(old_lock)


def _carry_over(old: Path, new: Path) -> None:
    """Link (or copy) into ``new`` every entry of ``old`` that ``new`` does not have."""
    import shutil

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in os.scandir(old):
        dst = new / entry.name
        if os.path.lexists(dst):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry.path, os.fspath(dst))


def _fsync_tree(folder: Path) -> None:
    """Flush to disk every regular file under ``folder``, then the folders (where the OS allows it)."""
    for root, _, files in os.walk(folder):
        for name in files:
            file = os.path.join(root, name)
            if os.path.isfile(file) and not os.path.islink(file):
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        try:
            fd = os.open(root, os.O_RDONLY)
        except OSError:  # Windows cannot open a folder
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _create_temp(target: Path, suffix: str, *, folder: bool) -> tuple[int, Path]:
    """Create ``.NAME.XXXXXXXX.suffix`` beside ``target``: an open file (mode 0o666 less the umask) or a folder.

    Unlike ``tempfile.mkstemp`` (always 0o600), the kernel applies the umask
    here, as it does for ``open(path, "wb")``. Returns the descriptor (-1
    for a folder) and the path.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{os.urandom(4).hex()}.{suffix}"
        try:
            if folder:
                os.mkdir(tmp, 0o777)
                return -1, tmp
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot write {target}: no free temporary name beside it")


def _lock(fd: int) -> None:
    """Take an exclusive ``flock`` on ``fd`` (nothing where there is no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(fd, fcntl.LOCK_EX)


def _open_locked(path: Path) -> int:
    """Open ``path`` (a folder) read-only and lock it; -1 where there is no ``fcntl``."""
    try:
        import fcntl
    except ImportError:
        return -1
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _remove_stale(target: Path, start: float) -> None:
    """Remove leftovers of killed writes to ``target``: lowrank's temporary names only, unlocked and old.

    Best effort: a leftover that cannot be removed stays, and the write that
    called this has already succeeded.
    """
    try:
        import fcntl
    except ImportError:  # no way to tell a dead writer from a live one
        return
    import shutil

    pattern = re.compile(rf"\.{re.escape(target.name)}\.{_TEMP_TOKEN}\.(?:{'|'.join(_TEMP_SUFFIXES)})")
    try:
        entries = [e for e in os.scandir(target.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return
    for entry in entries:
        fd = -1
        try:
            st = entry.stat(follow_symlinks=False)
            is_dir = stat.S_ISDIR(st.st_mode)
            if not (is_dir or stat.S_ISREG(st.st_mode)) or st.st_mtime > start - _STALE_SECONDS:
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
            if is_dir:
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        finally:
            _close(fd)


# ---------------------------------------------------------------- .npy and .npz


def _check_npy_header(f: IO[bytes], nbytes: int, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Read a ``.npy`` header from ``f`` and check it against the ``nbytes`` the file holds.

    Nothing is allocated: a header claiming more (or fewer) bytes than the
    file holds, a negative dimension, or a dtype holding Python objects is
    a ValueError naming ``what``. Returns the header's shape, Fortran
    order flag and dtype, with ``f`` at the first byte of data.
    """
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"{what} is .npy format version {version[0]}.{version[1]}; lowrank reads 1.0 and 2.0")
    if dtype.hasobject:
        raise ValueError(f"{what} holds Python objects (dtype {dtype}), which only pickle can read")
    if any(d < 0 for d in shape):
        raise ValueError(f"{what} claims shape {shape}, with a negative dimension")
    claimed = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    held = nbytes - f.tell()
    if claimed != held:
        raise ValueError(f"{what} claims shape {shape} of {dtype} ({claimed:,} bytes) but holds {held:,} bytes")
    return shape, fortran, dtype


# numpy's own read size (numpy.lib.format.BUFFER_SIZE, 256 KiB): 16 MiB reads took
# twice as long for a 72 MB member (244 vs 123 ms), cache misses on the copy.
_CHUNK = 2**18


def _read_npy_data(f: IO[bytes], shape: tuple[int, ...], fortran: bool, dtype: np.dtype) -> np.ndarray:
    """The array whose header :func:`_check_npy_header` checked, read from ``f`` in chunks.

    Reading the data here rather than with ``numpy.lib.format.read_array``
    parses each header once: the parse (``ast.literal_eval``) was half of
    the time to load a 200-member checkpoint.
    """
    array = np.empty(math.prod(shape), dtype)
    if array.nbytes:
        raw = array.view(np.uint8)  # (nbytes,)
        for start in range(0, raw.size, _CHUNK):
            want = min(_CHUNK, raw.size - start)
            chunk = f.read(want)
            if len(chunk) != want:
                raise ValueError(f"the data ends after {start + len(chunk):,} of {raw.size:,} bytes")
            raw[start:start + want] = np.frombuffer(chunk, np.uint8)
    if fortran:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def load_npy(path: PathLike) -> np.ndarray:
    """Read the array of a ``.npy`` file, never unpickling, allocating only what the file holds.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is not a readable ``.npy`` file: bad magic, a header
        whose shape and dtype claim more or fewer bytes than the file
        holds, Python objects, or truncated content.
    """
    with open(path, "rb") as f:
        try:
            _check_npy_header(f, os.fstat(f.fileno()).st_size, "its header")
            f.seek(0)  # numpy reads a real file with fromfile, faster than in chunks
            return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{os.fspath(path)} is not a readable .npy file: {exc}") from None


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
    """Read every array of an ``.npz`` file, never unpickling, allocating only what the file holds.

    The archive is checked before anything is read: it must start with the
    zip marker, every member must be a stored (uncompressed, unencrypted)
    ``<name>.npy`` whose claimed size equals its stored size, the members
    together must fit in the file, and each member's ``.npy`` header must
    claim exactly the bytes it holds. So a zip bomb or a header claiming
    shape ``(2**40,)`` is refused with a ValueError, not read into memory.
    ``numpy.savez`` files pass; ``numpy.savez_compressed`` files do not.

    Raises
    ------
    ValueError
        If the file is not a readable ``.npz`` archive (corrupt, truncated,
        compressed, claiming more than it holds, or holding pickled objects).
    FileNotFoundError
        If there is no such file.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            marker = f.read(4)
            if marker == b"\x93NUM":  # a .npy file holds one bare array
                raise ValueError("it holds a single .npy array, not an .npz archive")
            if marker not in (b"PK\x03\x04", b"PK\x05\x06"):  # a member first, or an empty archive
                raise ValueError(f"it does not start with the zip marker (starts with {marker!r})")
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                return _read_members(archive, size)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{os.fspath(path)} is not a readable .npz file: {exc}") from None


def _read_members(archive: zipfile.ZipFile, size: int) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` archive of ``size`` bytes, each claim checked before it is read."""
    infos = archive.infolist()
    claimed = 0
    for info in infos:
        what = f"member {info.filename!r}"
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{what} is compressed (zip method {info.compress_type}); lowrank writes "
                             "uncompressed members")
        if info.flag_bits & 0x1:
            raise ValueError(f"{what} is encrypted")
        if info.file_size != info.compress_size:
            raise ValueError(f"{what} claims {info.file_size:,} bytes but stores {info.compress_size:,}")
        if not info.filename.endswith(".npy"):
            raise ValueError(f"{what} is not a .npy array")
        claimed += info.compress_size
    if claimed > size:
        raise ValueError(f"its members claim {claimed:,} bytes but the file holds {size:,}")
    arrays: dict[str, np.ndarray] = {}
    for info in infos:
        name = info.filename[: -len(".npy")]
        if name in arrays:
            raise ValueError(f"member {info.filename!r} appears twice")
        with archive.open(info) as member:
            header = _check_npy_header(member, info.file_size, f"member {info.filename!r}")
            arrays[name] = _read_npy_data(member, *header)
    return arrays


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


# ---------------------------------------------------------------- JSON

# One token each: a whole string (escapes included), a bracket, or the quote of
# a string that never ends. One left-to-right pass, linear in the text.
_JSON_TOKENS = re.compile(r'(?P<string>"(?:[^"\\]|\\.)*")|(?P<open>[\[{])|(?P<close>[\]}])|(?P<unterminated>")',
                          re.DOTALL)


def _json_nesting_exceeds(text: str, limit: int) -> bool:
    """True if the lists and objects of ``text`` nest deeper than ``limit`` (strings are skipped)."""
    depth = 0
    for token in _JSON_TOKENS.finditer(text):
        kind = token.lastgroup
        if kind == "open":
            depth += 1
            if depth > limit:
                return True
        elif kind == "close":
            depth -= 1
        elif kind == "unterminated":  # the parser stops there too
            return False
    return False


def load_json(path: PathLike) -> Any:
    """Read a JSON file; a corrupt, truncated or too deeply nested one is a one-line ValueError.

    Lists and objects may nest at most :data:`MAX_JSON_DEPTH` deep, which
    keeps a hostile file from exhausting the parser's recursion.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is not UTF-8 JSON, or nests too deep; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if _json_nesting_exceeds(text, MAX_JSON_DEPTH):
            raise ValueError(f"it nests lists and objects deeper than {MAX_JSON_DEPTH} levels")
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not a readable JSON file: {exc}") from None


def save_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically (the same object gives the same bytes)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"

    def write(f: IO[bytes]) -> None:
        f.write(text.encode("utf-8"))

    return atomic_write(path, write)
