"""The course in docs/ is held to the code: its examples run, its commands work, its numbers are recomputed.

- every ```python block of a course page runs, in order, in one namespace
  per page (a learner's session); the worked examples are ``assert``
  statements in those blocks, so a formula in the docs that disagrees with
  the code fails here;
- every command of a ```bash block on a course page runs as written from
  the repository root and exits 0 (lines marked ``# not run in tests`` are
  skipped: installs, minutes-long benchmarks, rewriting committed figures);
- the init experiment of docs/lora.md shows what the page says, and the
  table printed there is what the script prints;
- docs/README.md lists every page, and the course's links and figures exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COURSE = ["README.md", "lowrank_approximation.md", "backprop.md", "lora.md", "optimizers.md", "why_lora.md",
          "performance.md"]
PENDING = {"dora.md", "attention.md", "gpt2.md"}  # pages other work adds; linked from the map already
SKIP = "# not run in tests"


def blocks(page: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("page", [p for p in COURSE if blocks(p, "python")])
def test_python_blocks_run_in_order(page):
    namespace: dict = {}
    for i, code in enumerate(blocks(page, "python")):
        exec(compile(code, f"{page} python block {i}", "exec"), namespace)


def commands() -> list[str]:
    seen: list[str] = []
    for page in COURSE:
        for block in blocks(page, "bash"):
            for line in block.splitlines():
                line = line.strip()
                if line and not line.startswith("#") and SKIP not in line and line not in seen:
                    seen.append(line.split(" #")[0].strip())
    return seen


def test_the_course_has_commands_to_run():
    assert "lowrank demo --quick" in commands() and "python docs/examples/lora_init.py" in commands()


@pytest.mark.parametrize("command", commands())
def test_each_command_runs_as_written(command):
    words = shlex.split(command)
    if words[0] == "lowrank":
        argv = [sys.executable, "-m", "lowrank", *words[1:]]
    elif words[0] == "python":
        argv = [sys.executable, *words[1:]]
    else:
        pytest.fail(f"a course command must start with lowrank or python (or be marked {SKIP!r}): {command}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command} exited {done.returncode}: {done.stderr[-2000:]}"


# ---------------------------------------------------------------- the init experiment of lora.md


def lora_init():
    spec = importlib.util.spec_from_file_location("lora_init", DOCS / "examples" / "lora_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_one_sided_zero_starts_train_and_the_two_sided_one_does_not():
    ex = lora_init()
    x, y, _ = ex.task()
    for start, moves in (("A random, B = 0", "B"), ("A = 0, B random", "A")):
        layer = ex.adapter(start)
        assert np.array_equal(layer(x), x @ layer.weight.data.T)  # ΔW = 0 at step 0
        losses, dA, dB = ex.train(start, "sgd", 0.5)
        assert (dA > 0, dB > 0) == (moves == "A", moves == "B"), start  # the first step moves one factor
        assert losses[-1] < 1e-3 * losses[0], start
    # dA ≠ 0 from A = 0 and B random, by the formula dA = scaling * (dy @ B).T @ x, written out here
    layer = ex.adapter("A = 0, B random")
    dy = 2 * (layer(x) - y) / y.size
    assert np.linalg.norm(layer.scaling * (dy @ layer.B.data).T @ x) > 0.1
    losses, dA, dB = ex.train("A = 0, B = 0", "adam", 1e-2)
    assert dA == dB == 0 and losses[-1] == losses[0]


def test_lora_md_shows_what_the_experiment_prints(capsys):
    lora_init().main()
    printed = capsys.readouterr().out.splitlines()[1:]
    page = (DOCS / "lora.md").read_text(encoding="utf-8")
    for line in printed:
        fields = re.split(r"\s{2,}", line.strip())
        # start, optimizer, |dA|, |dB|, loss 0 and loss 20 to the digits shown; the tiny last loss is
        # rounding noise that another BLAS may change
        shown = [row for row in page.splitlines() if row.startswith(fields[0]) and fields[1] in row]
        assert shown, f"lora.md lacks the row {line!r}"
        assert re.split(r"\s{2,}", shown[0].strip())[:6] == fields[:6]


# ---------------------------------------------------------------- the map, links and figures


def test_the_map_lists_every_page():
    readme = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name})" in readme, f"docs/README.md does not list {page.name}"


@pytest.mark.parametrize("page", COURSE)
def test_links_and_figures_of_the_course_exist(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target or target in PENDING:
            continue
        assert (DOCS / target).exists(), f"{page} links to {target}, which does not exist"


def test_the_figure_script_draws_the_figures(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("make_figures", DOCS / "figures" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.lora_paths(tmp_path / "lora_paths.svg")
    module.spectrum(tmp_path / "spectrum.svg")
    tops = ["1", "2"]
    results = {"adaptation": {  # the shape of run_demo's results, with made-up numbers
        "planted_rank": 2,
        "methods": [{"method": "full", "val_loss_curve": [1.0, 0.5]}],
        "delta_w": {"layer": "0.weight", "singular_values": [3.0, 2.0, 0.1],
                    "similarity_lora8_vs_full": {f"{i},{j}": 0.5 for i in tops for j in tops}},
    }}
    module.demo_figures(tmp_path, results)
    for name in module.FIGURES:
        assert (tmp_path / name).read_text(encoding="utf-8").lstrip().startswith("<?xml")
        assert (DOCS / "figures" / name).exists()  # and the committed one is there
