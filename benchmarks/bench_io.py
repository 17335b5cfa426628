"""Reading and writing a large safetensors file: lowrank's NumPy code vs the safetensors package.

Both sides write the same tensors (a few float32 matrices, 1 GiB in all by
default) and read the same file. Time is measured in this process, the two
sides taking turns repetition by repetition, with ``os.sync()`` before each
timed call so that no side pays for the other's dirty pages, and each write
to a path that does not exist yet (deleted untimed); reads find the file in
the page cache (warm). Peak memory is measured in a fresh
subprocess per case with ``resource.getrusage(...).ru_maxrss``, since the
package allocates outside Python where tracemalloc cannot see.

Writing, lowrank is atomic (a temporary file, ``fsync``, ``os.replace``);
``safetensors.numpy.save_file`` writes in place and does not ``fsync``. So
the package is timed twice: as it is, and followed by an ``fsync`` of the
file (the same durability), and the ratio is printed against both.

Goal (issue 9): at most 1.2x the package's time and 1.1x its peak memory.

    python benchmarks/bench_io.py                 # 1 GiB, 5 repetitions
    python benchmarks/bench_io.py --quick         # 128 MiB
    python benchmarks/bench_io.py --size-mib 512 --reps 7 --dir /var/tmp
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script lives in

from lowrank.io import load_safetensors, save_safetensors  # noqa: E402

N_TENSORS = 4
COLUMNS = 4096


def make_tensors(size_mib: int) -> dict[str, np.ndarray]:
    """``N_TENSORS`` float32 matrices of ``COLUMNS`` columns, ``size_mib`` MiB in all (pages touched)."""
    rows = max(1, size_mib * 2**20 // (4 * COLUMNS * N_TENSORS))
    return {f"layer{i}.weight": np.full((rows, COLUMNS), i + 0.5, np.float32) for i in range(N_TENSORS)}


def package_write(tensors, path, fsync=False):
    import safetensors.numpy

    safetensors.numpy.save_file(tensors, path)
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def package_read(path):
    import safetensors.numpy

    return safetensors.numpy.load_file(path)


# ---------------------------------------------------------------- time


def timed(fn, remove: Path | None = None) -> float:
    """Seconds ``fn()`` takes, after deleting ``remove`` and flushing earlier writes, untimed."""
    if remove is not None:
        remove.unlink(missing_ok=True)
    os.sync()
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    del result
    return elapsed


def bench_time(tensors, folder: Path, reps: int) -> dict[str, list[float]]:
    # Each write goes to a path that does not exist: replacing or truncating a 1 GiB file
    # frees its blocks and cached pages (0.2 s here), a cost of the old file, not of writing.
    target, read_me = folder / "written.safetensors", folder / "read.safetensors"
    save_safetensors(read_me, tensors)
    cases = {
        "write lowrank": (lambda: save_safetensors(target, tensors), target),
        "write package": (lambda: package_write(tensors, target), target),
        "write package+fsync": (lambda: package_write(tensors, target, fsync=True), target),
        "read lowrank": (lambda: load_safetensors(read_me), None),
        "read package": (lambda: package_read(read_me), None),
    }
    for fn, remove in cases.values():  # warm-up: imports, page cache
        timed(fn, remove)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, (fn, remove) in cases.items():
            times[name].append(timed(fn, remove))
    return times


# ---------------------------------------------------------------- peak memory

MEMORY_SCRIPT = """
import resource, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
import numpy as np
import bench_io
from lowrank.io import load_safetensors, save_safetensors
import safetensors.numpy
case, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
tensors = bench_io.make_tensors(size) if case.startswith("write") else None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if case == "write lowrank":
    save_safetensors(path, tensors)
elif case == "write package":
    bench_io.package_write(tensors, path)
elif case == "read lowrank":
    out = load_safetensors(path)
elif case == "read package":
    out = bench_io.package_read(path)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, peak)
"""


def bench_memory(case: str, path: Path, size_mib: int) -> tuple[float, float]:
    """(peak MiB of the whole process, MiB the operation added to the peak), from a fresh process."""
    script = MEMORY_SCRIPT.format(root=str(ROOT), here=str(Path(__file__).resolve().parent))
    out = subprocess.run(
        [sys.executable, "-c", script, case, str(path), str(size_mib)], capture_output=True, text=True, check=True
    )
    base, peak = (int(v) / 1024 for v in out.stdout.split())  # ru_maxrss is in KiB on Linux
    return peak, peak - base


def hugepages() -> str:
    """The transparent-huge-page setting, which decided how fast fresh NumPy arrays fill.

    NumPy asks for huge pages on large arrays (madvise). With the kernel's
    ``defrag`` on ``madvise``, each first touch may compact memory, and a read
    into such an array ran at a third of the page cache's speed, varying from
    run to run. lowrank's reader therefore reads large tensors into anonymous
    memory maps of their own (``lowrank.io.safetensors._empty``), which NumPy
    does not madvise; the line is printed so a surprising run can be explained.
    """
    try:
        enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        enabled = "unknown"
    madvise = os.environ.get("NUMPY_MADVISE_HUGEPAGE", "default (on for Linux >= 4.6)")
    return f"transparent huge pages: {enabled}; NUMPY_MADVISE_HUGEPAGE: {madvise}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="total tensor size (default 1024 MiB)")
    parser.add_argument("--quick", action="store_true", help="128 MiB")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions, median reported (default 5)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go (default the temp folder)")
    args = parser.parse_args()
    size = 128 if args.quick else args.size_mib
    try:
        import safetensors

        version = safetensors.__version__
    except ImportError:
        print("skipped: pip install safetensors (the peer this benchmark compares against)")
        return
    free_mib = shutil.disk_usage(args.dir).free / 2**20
    if free_mib < 3 * size:
        sys.exit(f"{args.dir} has {free_mib:,.0f} MiB free; this run needs about {3 * size:,} MiB")

    folder = Path(tempfile.mkdtemp(prefix="bench_io.", dir=args.dir))
    try:
        print(hugepages())
        print(
            f"{N_TENSORS} float32 tensors, {size:,} MiB in all; safetensors {version}, NumPy {np.__version__}; "
            f"files in {folder}; load average {os.getloadavg()[0]:.2f}"
        )

        # Memory first, while this process is small: Linux carries a parent's peak RSS at
        # fork over into the child's ru_maxrss, so a large parent would mask the children's.
        print("\npeak memory (ru_maxrss of a fresh process; 'added' = peak minus the peak before the call):")
        print(f"  {'case':<22}{'peak MiB':>10}{'added MiB':>11}")
        mem = {}
        for case, name in (
            ("write lowrank", "mem.safetensors"),
            ("write package", "mem_package.safetensors"),
            ("read lowrank", "mem.safetensors"),
            ("read package", "mem.safetensors"),
        ):
            mem[case] = bench_memory(case, folder / name, size)
            print(f"  {case:<22}{mem[case][0]:>10,.0f}{mem[case][1]:>11,.0f}")
        for op in ("write", "read"):
            ours, theirs = mem[op + " lowrank"], mem[op + " package"]
            print(
                f"  ratio {op:<5} lowrank / package: peak {ours[0] / theirs[0]:.2f} "
                f"(added {ours[1]:,.0f} MiB vs {theirs[1]:,.0f} MiB)"
            )
        for name in ("mem.safetensors", "mem_package.safetensors"):
            (folder / name).unlink()

        tensors = make_tensors(size)
        nbytes = sum(t.nbytes for t in tensors.values())
        times = bench_time(tensors, folder, args.reps)
        del tensors
        t = {name: statistics.median(v) for name, v in times.items()}
        print(f"\ntime, median of {args.reps} (the two sides taking turns; min and max show the spread):")
        print(f"  {'case':<22}{'median s':>9}{'GiB/s':>8}{'min s':>8}{'max s':>8}")
        for name, seconds in t.items():
            spread = f"{min(times[name]):>8.3f}{max(times[name]):>8.3f}"
            print(f"  {name:<22}{seconds:>9.3f}{nbytes / 2**30 / seconds:>8.2f}{spread}")
        print(f"  ratio write lowrank / package        {t['write lowrank'] / t['write package']:.2f}")
        print(f"  ratio write lowrank / package+fsync  {t['write lowrank'] / t['write package+fsync']:.2f}")
        print(f"  ratio read  lowrank / package        {t['read lowrank'] / t['read package']:.2f}")
        print("  (ratios of medians; under load the write times spread several-fold: rerun on an idle machine)")
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
