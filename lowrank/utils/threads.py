"""Limit the BLAS thread count for a block of small matrix products.

For the demo's tiny matrices (a 128×32 batch through a 32→128→6 MLP) a
second BLAS thread costs more in hand-off than it saves, and on a busy
machine, where the second core is taken, its spin-waiting made the whole
demo 14× slower (58 s against 4 s, measured on this project's 2-core
machine). NumPy has no public switch, so this finds the OpenBLAS that NumPy
loaded and calls its ``set_num_threads``, as threadpoolctl does. Where that
is not possible (another BLAS, another OS) it does nothing: the numbers are
the same either way, only the speed differs.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

_SYMBOLS = (  # NumPy's wheels ship scipy-openblas with a prefix and a 64-bit suffix
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


def _openblas_controls():
    """``(get, set)`` of the OpenBLAS NumPy loaded, or None."""
    import numpy  # noqa: F401  (loads its BLAS, so it shows in the process's maps)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _SYMBOLS:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                return getattr(lib, get_name), getattr(lib, set_name)
    return None


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with at most ``n`` BLAS threads, then restore the previous count."""
    controls = _openblas_controls()
    if controls is None:
        yield
        return
    get, set_ = controls
    previous = get()
    set_(min(n, previous))
    try:
        yield
    finally:
        set_(previous)
