"""Limit the BLAS thread count for a block of small matrix products.

For the demo's tiny matrices (a 128×32 batch through a 32→128→6 MLP) a
second BLAS thread costs more in hand-off than it saves, and on a busy
machine, where the second core is taken, its spin-waiting made the whole
demo 14× slower (58 s against 4 s, measured on this project's 2-core
machine). NumPy has no public switch. When threadpoolctl is installed it
does the job for whichever BLAS NumPy loaded (OpenBLAS, MKL, BLIS,
Accelerate); otherwise this finds the OpenBLAS that NumPy loaded and calls
its ``set_num_threads``, as threadpoolctl does for OpenBLAS. Either way the
numbers are the same, only the speed differs.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator

from lowrank.utils.validation import check_int

_SYMBOLS = (  # NumPy's wheels ship scipy-openblas with a prefix and a 64-bit suffix
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with at most ``n`` BLAS threads, then restore the previous count.

    Uses threadpoolctl's ``threadpool_limits`` when threadpoolctl is
    installed, which covers every BLAS it knows. Without it, the fallback
    sets the thread count of the OpenBLAS that NumPy loaded (found through
    ``/proc/self/maps``, so on Linux only); on MKL, Accelerate or another
    OS the fallback is a no-op and the block runs with the BLAS's own count.
    The count is never raised: ``n`` above the current count changes nothing.

    Parameters
    ----------
    n : int
        The largest number of BLAS threads the block may use, at least 1.

    Examples
    --------
    >>> import numpy as np
    >>> with blas_threads(1):
    ...     y = np.ones((64, 64)) @ np.ones((64, 64))
    >>> float(y[0, 0])
    64.0
    """
    n = check_int(n, "n", low=1)
    try:
        import threadpoolctl
    except ImportError:  # also when sys.modules["threadpoolctl"] is None
        threadpoolctl = None
    if threadpoolctl is None:
        with _openblas_limit(n):
            yield
        return
    import numpy  # noqa: F401  (loads its BLAS: threadpoolctl sees only loaded libraries)

    counts = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    with threadpoolctl.threadpool_limits(limits=min([n, *counts]), user_api="blas"):
        yield


@contextlib.contextmanager
def _openblas_limit(n: int) -> Iterator[None]:
    """Set the loaded OpenBLAS's thread count to ``min(n, count)`` for the block; without one, do nothing."""
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


def _openblas_controls() -> tuple[Callable[[], int], Callable[[int], None]] | None:
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
