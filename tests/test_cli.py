"""The ``factorize`` and ``params`` commands, through ``lowrank.cli.main(argv)``, and once through ``python -m``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from strategies import planted, with_spectrum

from lowrank.cli import main

ROOT = Path(__file__).resolve().parents[1]
FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def run(argv, capsys):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse may exit directly; the code is what matters
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def numbers_on_line(text: str, word: str) -> list[float]:
    """Every number printed on the first line that contains ``word``."""
    for line in text.splitlines():
        if word in line.lower():
            return [float(x) for x in re.findall(FLOAT, line.replace(",", ""))]
    raise AssertionError(f"no line mentions {word!r} in:\n{text}")


def assert_one_line_error(code, out, err):
    assert code == 2, f"exit code {code}"  # 2: the command could not run (1 is a failed check)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("lowrank: error:"), lines[0]


@pytest.fixture
def matrix_file(tmp_path):
    """A 12x10 float64 matrix with a known spectrum, saved as .npy; (path, M, s)."""
    s = np.array([5.0, 4.0, 3.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01])
    M = with_spectrum(12, 10, s, seed=0)
    path = tmp_path / "m.npy"
    np.save(path, M)
    return path, M, s


# ---------------------------------------------------------------- params


def test_params_of_a_factorization(capsys):
    code, out, err = run(["params", "--shape", "9x9", "--rank", "1"], capsys)
    assert code == 0 and err == ""
    assert "81" in out and "18" in out
    assert 81.0 in numbers_on_line(out, "dense")
    assert 18.0 in numbers_on_line(out, "low-rank")


@pytest.mark.parametrize("m, n, r", [(9, 9, 1), (4096, 4096, 8), (100, 30, 5)])
def test_params_counts_follow_the_formula(capsys, m, n, r):
    code, out, _ = run(["params", "--shape", f"{m}x{n}", "--rank", str(r)], capsys)
    assert code == 0
    assert float(m * n) in numbers_on_line(out, "dense")
    assert float(r * (m + n)) in numbers_on_line(out, "low-rank")


def test_params_of_the_gpt3_lora_budget(capsys):
    argv = ["params", "--d-model", "12288", "--layers", "96", "--matrices", "2", "--rank", "1",
            "--total", "175255.8e6"]
    code, out, err = run(argv, capsys)
    assert code == 0 and err == ""
    assert "4,718,592" in out
    assert "0.0027" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["params", "--shape", "9x9", "--rank", "10"],
        ["params", "--shape", "9x9", "--rank", "0"],
        ["params", "--shape", "9by9", "--rank", "1"],
        ["params", "--shape", "0x9", "--rank", "1"],
        ["params", "--d-model", "12288", "--layers", "96", "--rank", "1", "--total", "0"],
        ["params", "--d-model", "0", "--layers", "96"],
        ["params"],
    ],
)
def test_params_bad_input_is_one_line(capsys, argv):
    assert_one_line_error(*run(argv, capsys))


# ---------------------------------------------------------------- factorize


def test_factorize_prints_shapes_counts_error_and_bound(capsys, matrix_file):
    path, _, s = matrix_file
    code, out, err = run(["factorize", str(path), "--rank", "3"], capsys)
    assert code == 0 and err == ""
    assert "12" in out and "10" in out
    assert 120.0 in numbers_on_line(out, "dense")  # 12 * 10
    assert 66.0 in numbers_on_line(out, "dense")  # 3 * (12 + 10)
    optimum = np.sqrt(np.sum(s[3:] ** 2)) / np.linalg.norm(s)  # relative Eckart–Young bound
    assert any(abs(x - optimum) <= 1e-5 * optimum for x in numbers_on_line(out, "error")), out
    assert any(abs(x - optimum) <= 1e-5 * optimum for x in numbers_on_line(out, "bound")), out


def test_factorize_by_energy_picks_the_rank(capsys, matrix_file):
    path, _, s = matrix_file
    kept = np.cumsum(s**2) / np.sum(s**2)
    energy = (kept[3] + kept[4]) / 2  # strictly between: rank 5 is the smallest that keeps it
    code, out, _ = run(["factorize", str(path), "--energy", f"{energy:.12f}"], capsys)
    assert code == 0
    assert 5 * (12 + 10) in numbers_on_line(out, "dense")
    optimum = np.sqrt(np.sum(s[5:] ** 2)) / np.linalg.norm(s)
    assert any(abs(x - optimum) <= 1e-5 * optimum for x in numbers_on_line(out, "bound"))


@pytest.mark.parametrize("method", ["svd", "randomized", "als"])
def test_factorize_methods_and_out_file(capsys, tmp_path, method):
    M = planted(15, 11, 2, seed=3)
    path = tmp_path / "planted.npy"
    np.save(path, M)
    out_path = tmp_path / "factors.npz"
    code, out, err = run(
        ["factorize", str(path), "--rank", "2", "--method", method, "--out", str(out_path), "--seed", "4"],
        capsys,
    )
    assert code == 0, err
    with np.load(out_path, allow_pickle=False) as data:
        left, right = data["left"], data["right"]
        assert left.shape == (15, 2) and right.shape == (2, 11)
        np.testing.assert_allclose(left @ right, M, atol=1e-8)
        if method == "als":
            assert sorted(data.files) == ["left", "right"]  # ALS has no singular values to write
        else:
            np.testing.assert_allclose(data["s"], np.linalg.svd(M, compute_uv=False)[:2], rtol=1e-10)
    # written atomically: nothing else is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors.npz", "planted.npy"]
    # rank 2 of a rank-2 matrix: the relative error printed is ~0
    assert min(abs(x) for x in numbers_on_line(out, "error")) < 1e-8


def test_factorize_same_seed_same_output(capsys, matrix_file):
    path, _, _ = matrix_file
    first = run(["factorize", str(path), "--rank", "2", "--method", "randomized", "--seed", "7"], capsys)
    second = run(["factorize", str(path), "--rank", "2", "--method", "randomized", "--seed", "7"], capsys)
    assert first == second


def test_factorize_accepts_integer_matrices(capsys, tmp_path):
    path = tmp_path / "ints.npy"
    np.save(path, np.arange(20).reshape(4, 5) % 7)
    code, out, _ = run(["factorize", str(path), "--rank", "2"], capsys)
    assert code == 0
    assert 20.0 in numbers_on_line(out, "dense")


@pytest.mark.parametrize("scale", [1e300, 1e-300, 2.0**-1000])
def test_factorize_reports_relative_errors_at_the_limits_of_float64(capsys, tmp_path, matrix_file, scale):
    """The report's ratios do not depend on M's scale: no overflow to inf or nan, no underflow to 0."""
    _, M, s = matrix_file
    path = tmp_path / "scaled.npy"
    np.save(path, M * scale)
    code, out, err = run(["factorize", str(path), "--rank", "3"], capsys)
    assert code == 0 and err == ""
    tail = np.sqrt(np.sum(s[3:] ** 2)) / np.sqrt(np.sum(s**2))  # Eckart–Young, from the planted spectrum
    assert numbers_on_line(out, "/ ‖m‖_f =")[-1] == pytest.approx(tail, rel=1e-5)
    assert numbers_on_line(out, "optimum at rank 3")[-2] == pytest.approx(tail, rel=1e-5)


@pytest.mark.parametrize("method", ["svd", "randomized", "als"])
@pytest.mark.parametrize("scale, dtype", [(1e-170, np.float64), (1e160, np.float64), (1e-30, np.float32)])
def test_factorize_reports_the_same_errors_at_extreme_scales(capsys, tmp_path, matrix_file, method, scale, dtype):
    """Every method, and --energy: the report at scale c is the report at scale 1 (ALS printed 1.0 and 'ratio inf')."""
    _, M, s = matrix_file
    reports = []
    for factor in (1.0, scale):
        path = tmp_path / f"m{factor:g}.npy"
        np.save(path, (M * factor).astype(dtype))
        for how in (["--rank", "3"], ["--energy", "0.999"]):
            code, out, err = run(["factorize", str(path), *how, "--method", method, "--seed", "1"], capsys)
            assert code == 0 and err == "", err
            reports.append((numbers_on_line(out, "/ ‖m‖_f =")[-1], numbers_on_line(out, "optimum at rank")))
    (error, bound), (error_e, bound_e), (big, big_bound), (big_e, big_bound_e) = reports
    rtol = 1e-5 if dtype == np.float64 else 1e-3
    assert big == pytest.approx(error, rel=rtol) and big_e == pytest.approx(error_e, rel=rtol)
    assert big_bound == pytest.approx(bound, rel=rtol) and big_bound_e == pytest.approx(bound_e, rel=rtol)
    tail = np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2))  # Eckart–Young at rank 3, by hand
    assert error == pytest.approx(tail, rel=rtol) and big == pytest.approx(tail, rel=rtol)
    kept = np.cumsum(s**2) / np.sum(s**2)
    assert big_bound_e[0] == int(np.argmax(kept >= 0.999)) + 1  # the rank --energy picked


# ---------------------------------------------------------------- factorize: one-line errors


def _bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "bad.npy"
    if kind == "missing":
        return tmp_path / "nope.npy"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path = tmp_path / "m.txt"
        path.write_text("1 2\n3 4\n")
    elif kind == "text-named-npy":
        path.write_text("1 2\n3 4\n")
    elif kind == "npz":
        path = tmp_path / "m.npz"
        np.savez(path, M=np.ones((3, 3)))
    elif kind == "truncated":
        np.save(path, np.ones((50, 50)))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "empty-file":
        path.write_bytes(b"")
    elif kind == "strings":
        np.save(path, np.array([["a", "b"], ["c", "d"]]))
    elif kind == "object":
        np.save(path, np.array([[1, "x"], [None, 2.0]], dtype=object), allow_pickle=True)
    elif kind == "complex":
        np.save(path, np.ones((3, 3), dtype=complex))
    elif kind == "1-D":
        np.save(path, np.ones(5))
    elif kind == "3-D":
        np.save(path, np.ones((2, 3, 4)))
    elif kind == "empty":
        np.save(path, np.ones((0, 4)))
    elif kind == "nan":
        M = np.ones((3, 3))
        M[1, 1] = np.nan
        np.save(path, M)
    return path


@pytest.mark.parametrize(
    "kind",
    ["missing", "directory", "text", "text-named-npy", "npz", "truncated", "empty-file",
     "strings", "object", "complex", "1-D", "3-D", "empty", "nan"],
)
def test_factorize_bad_files_are_one_line_errors(capsys, tmp_path, kind):
    path = _bad_file(tmp_path, kind)
    assert_one_line_error(*run(["factorize", str(path), "--rank", "1"], capsys))


@pytest.mark.parametrize(
    "extra",
    [
        ["--rank", "0"],
        ["--rank", "11"],
        ["--rank", "2.5"],
        ["--energy", "0"],
        ["--energy", "1.5"],
        ["--rank", "2", "--energy", "0.9"],
        [],
        ["--rank", "2", "--method", "qr"],
    ],
)
def test_factorize_bad_options_are_one_line_errors(capsys, matrix_file, extra):
    path, _, _ = matrix_file
    assert_one_line_error(*run(["factorize", str(path), *extra], capsys))


def test_factorize_out_into_a_missing_folder_is_a_one_line_error(capsys, matrix_file, tmp_path):
    path, _, _ = matrix_file
    code, out, err = run(
        ["factorize", str(path), "--rank", "2", "--out", str(tmp_path / "no" / "such" / "f.npz")], capsys
    )
    assert_one_line_error(code, out, err)


def test_unknown_command_is_a_one_line_error(capsys):
    assert_one_line_error(*run(["factorise", "x.npy"], capsys))


# ---------------------------------------------------------------- as a program


def test_python_dash_m_lowrank(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    ok = subprocess.run(
        [sys.executable, "-m", "lowrank", "params", "--shape", "9x9", "--rank", "1"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "81" in ok.stdout and "18" in ok.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "lowrank", "factorize", str(tmp_path / "missing.npy"), "--rank", "1"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert_one_line_error(bad.returncode, bad.stdout, bad.stderr)


def test_review_findings_each_get_a_one_line_error(capsys, tmp_path):
    cases = [
        (["demo", "--quick", "--seed", "-1"], "seed must be in [0, inf], got -1"),
        (["factorize", str(tmp_path), "--rank", "1"], "it is a folder"),
        (["params", "--d-model", "12288", "--layers", "96", "--rank", "1", "--total", "100"], "at least the 4,718,592"),
        (["params", "--d-model", "12288", "--layers", "96", "--rank", "1", "--total", "nan"], "got nan"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing printed before the refusal
        assert captured.err.startswith("lowrank: error:") and captured.err.count("\n") == 1
        assert message in captured.err


def test_params_refuses_a_shape_beside_a_lora_budget(capsys):
    """--shape and --d-model describe two different questions: refused as a conflict, not one ignored."""
    assert main(["params", "--shape", "9x9", "--d-model", "12", "--layers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--shape" in err and "--d-model, --layers" in err
