"""What an installed lowrank promises beyond its maths.

The version is declared once and the installed metadata agrees; ``import
lowrank`` loads NumPy and the factorization layer only; the other layers load
on first use; the import paths of earlier releases keep working; and the BLAS
thread limit limits and restores, with threadpoolctl and without it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
import sys

import numpy as np
import pytest

import lowrank
from lowrank.utils.threads import blas_threads


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter and return the JSON it prints."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_version_is_the_installed_distributions_version():
    assert lowrank.__version__ == importlib.metadata.version("lowrank")


def test_import_lowrank_loads_numpy_and_the_factorization_layer_only():
    loaded = _run(
        "import sys, json; before = set(sys.modules); import lowrank; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    stdlib = sys.stdlib_module_names
    third_party = {name.split(".")[0] for name in loaded} - stdlib - {"lowrank", "numpy"}
    cython_runtime = {name for name in third_party if name == "cython_runtime" or name.startswith("_cython_")}
    assert third_party == cython_runtime, third_party  # NumPy's compiled Cython modules register these
    ours = {name for name in loaded if name.split(".")[0] == "lowrank"}
    # the package, its version, the old ``lowrank.als`` path (see lowrank/__init__.py) and two layers
    allowed = ("lowrank", "lowrank._version", "lowrank.als", "lowrank.factor", "lowrank.utils")
    unexpected = {name for name in ours if not any(name == a or name.startswith(a + ".") for a in allowed)}
    assert not unexpected, unexpected
    for heavy in ("scipy", "safetensors", "threadpoolctl", "matplotlib", "torch"):
        assert heavy not in loaded
    assert "numpy.random" not in loaded  # 7 ms, loaded on the first random_state resolved instead


def test_the_other_layers_load_on_first_access():
    loaded = _run(
        "import sys, json, lowrank; before = sorted(m for m in sys.modules if m.startswith('lowrank.')); "
        "f = lowrank.io.load_peft_adapter; "
        "print(json.dumps({'before': before, 'callable': callable(f), 'io': 'lowrank.io' in sys.modules}))"
    )
    for layer in ("nn", "io", "train", "reference"):
        assert not any(m == f"lowrank.{layer}" or m.startswith(f"lowrank.{layer}.") for m in loaded["before"])
    assert loaded["callable"] and loaded["io"]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lowrank.not_a_name  # noqa: B018


def test_old_import_paths_reach_the_moved_objects():
    from lowrank.factor.als import als
    from lowrank.factor.svd import truncated_svd
    from lowrank.reference.gradcheck import check_gradients
    from lowrank.reference.harness import assert_lora_linear_matches
    from lowrank.reference.vectors import check_vectors
    from lowrank.train.data import make_tasks

    assert importlib.import_module("lowrank.svd").truncated_svd is truncated_svd
    assert lowrank.svd.truncated_svd is truncated_svd
    assert importlib.import_module("lowrank.als").als is als
    assert lowrank.vectors.check_vectors is check_vectors
    assert lowrank.testing.assert_lora_linear_matches is assert_lora_linear_matches
    assert lowrank.gradcheck.check_gradients is check_gradients
    assert lowrank.data.make_tasks is make_tasks
    from lowrank.lowrank_matrix import LowRank

    assert LowRank is lowrank.LowRank


def test_lowrank_als_stays_the_function_after_importing_the_old_module():
    out = _run("import json, lowrank.als, lowrank; print(json.dumps(callable(lowrank.als) and lowrank.als.__name__))")
    assert out == "als"
    import lowrank.als  # the old module path, imported in this process too
    from lowrank.factor.als import als

    assert lowrank.als is als
    fit = lowrank.als(np.outer(np.arange(1.0, 4.0), np.arange(1.0, 5.0)), 1, random_state=0)
    assert fit.left.shape == (3, 1)


# ---------------------------------------------------------------- the BLAS thread limit


def _blas_counts(threadpoolctl) -> list[int]:
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads():
    """threadpoolctl, with every BLAS at 2 threads for the test, so a limit to 1 can be seen."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not _blas_counts(threadpoolctl):
        pytest.skip("threadpoolctl sees no BLAS library in this process")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if set(_blas_counts(threadpoolctl)) != {2}:
            pytest.skip("this BLAS does not take 2 threads")
        yield threadpoolctl


def test_blas_threads_limits_then_restores(two_blas_threads):
    with blas_threads(1):
        assert set(_blas_counts(two_blas_threads)) == {1}
        y = np.arange(6.0).reshape(2, 3) @ np.ones((3, 2))  # (2, 2)
    assert set(_blas_counts(two_blas_threads)) == {2}
    np.testing.assert_array_equal(y, [[3.0, 3.0], [12.0, 12.0]])


def test_blas_threads_never_raises_the_count(two_blas_threads):
    with blas_threads(8):
        assert set(_blas_counts(two_blas_threads)) == {2}


def test_blas_threads_restores_the_count_when_the_block_raises(two_blas_threads):
    with pytest.raises(KeyError), blas_threads(1):
        raise KeyError("inside")
    assert set(_blas_counts(two_blas_threads)) == {2}


def test_blas_threads_falls_back_to_openblas_without_threadpoolctl(two_blas_threads, monkeypatch):
    if not any(lib["internal_api"] == "openblas" for lib in two_blas_threads.threadpool_info()):
        pytest.skip("the fallback acts on OpenBLAS only; this NumPy uses another BLAS")
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # `import threadpoolctl` now raises ImportError
    with blas_threads(1):
        openblas = [lib for lib in two_blas_threads.threadpool_info() if lib["internal_api"] == "openblas"]
        numpy_openblas = [lib for lib in openblas if "numpy" in lib["filepath"]] or openblas
        assert {lib["num_threads"] for lib in numpy_openblas} == {1}
    assert set(_blas_counts(two_blas_threads)) == {2}


@pytest.mark.parametrize(("n", "error"), [(0, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)])
def test_blas_threads_refuses_a_bad_count(n, error):
    with pytest.raises(error, match=r"^n must be"), blas_threads(n):
        pass
