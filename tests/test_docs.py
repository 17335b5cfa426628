"""The course in docs/ is held to the code: its examples run, its commands work, its numbers are recomputed.

- every ```python block of a course page runs, in order, in one namespace
  per page (a learner's session); the worked examples are ``assert``
  statements in those blocks, so a formula in the docs that disagrees with
  the code fails here (a block whose first line is marked
  ``# not run in tests`` is skipped: it needs Spark, ``implicit`` or a
  transformers model);
- every command of a ```bash block on a course page runs as written from
  the repository root and exits 0 (lines marked ``# not run in tests`` are
  skipped: installs, minutes-long benchmarks, rewriting committed figures);
- the init experiment of docs/lora.md shows what the page says, and the
  table printed there is what the script prints;
- docs/README.md lists every page, and the course's links and figures exist.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COURSE = ["README.md", "lowrank_approximation.md", "backprop.md", "lora.md", "optimizers.md", "why_lora.md",
          "performance.md", "dora.md", "attention.md", "lora_variants.md", "gpt2.md", "factorization.md",
          "precision.md"]
SKIP = "# not run in tests"


def blocks(page: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("page", [p for p in COURSE if blocks(p, "python")])
def test_python_blocks_run_in_order(page):
    namespace: dict = {}
    for i, code in enumerate(blocks(page, "python")):
        if SKIP not in code.split("\n", 1)[0]:
            exec(compile(code, f"{page} python block {i}", "exec"), namespace)


@pytest.mark.parametrize("page", [p for p in COURSE if p not in ("README.md", "performance.md")])
def test_each_page_with_formulas_holds_one_to_the_code(page):
    """A page that derives formulas has a block that runs and asserts (a skipped block does not count)."""
    run = [code for code in blocks(page, "python") if SKIP not in code.split("\n", 1)[0]]
    assert any("assert " in code for code in run), f"{page} has no worked example that checks the code"


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
def test_each_command_runs_as_written(command, capsys, monkeypatch):
    """In this process, from the repository root: ``lowrank ...`` through the CLI's main, scripts by runpy."""
    import runpy

    from lowrank.cli import main

    words = shlex.split(command)
    monkeypatch.chdir(ROOT)
    if words[0] == "lowrank":
        try:
            code = main(words[1:])
        except SystemExit as exit_:  # --help exits through argparse
            code = exit_.code
        assert code in (0, None), f"{command} exited {code}: {capsys.readouterr().err[-2000:]}"
    elif words[0] == "python":
        monkeypatch.setattr(sys, "argv", words[1:])
        runpy.run_path(str(ROOT / words[1]), run_name="__main__")
    else:
        pytest.fail(f"a course command must start with lowrank or python (or be marked {SKIP!r}): {command}")
    assert capsys.readouterr().out  # every command prints something


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
        if "://" in target:
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


# ---------------------------------------------------------------- the docs' formulas, evaluated


def section(page: str, heading: str) -> str:
    text = (DOCS / page).read_text(encoding="utf-8")
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def plain_blocks(text: str) -> list[str]:
    return re.findall(r"```\n(.*?)```", text, flags=re.S)


def arrow_formulas(text: str) -> list[str]:
    """The code forms ``name = expr`` after the last arrow of the ``… → name = expr  # shape`` lines."""
    return [line.rsplit("→", 1)[1].split("#", 1)[0].strip()
            for block in plain_blocks(text) for line in block.splitlines() if "→" in line]


def test_lora_md_forward_and_backward_formulas_are_the_kernels():
    """Evaluate the page's own lines with NumPy and hold them against F.lora_linear and its backward."""
    from lowrank.nn import functional as F

    rng = np.random.default_rng(5)
    ns = {"np": np, "x": rng.standard_normal((6, 5)), "W": rng.standard_normal((4, 5)), "b": rng.standard_normal(4),
          "A": rng.standard_normal((3, 5)), "B": rng.standard_normal((4, 3)), "scaling": 1.5,
          "mask": F.dropout_mask((6, 5), 0.3, random_state=2), "dy": rng.standard_normal((6, 4))}
    forward = plain_blocks(section("lora.md", "## Forward"))[0]
    for line in forward.splitlines():
        exec(line.split("#", 1)[0], ns)
    backward = arrow_formulas(section("lora.md", "## Backward, step by step"))
    assert [f.split(" =")[0] for f in backward] == ["dB", "dxa", "dA", "dxm", "dx", "dW", "db"]
    for formula in backward:
        exec(formula, ns)
    y, cache = F.lora_linear(ns["x"], ns["W"], ns["b"], ns["A"], ns["B"], ns["scaling"], ns["mask"])
    g = F.lora_linear_backward(ns["dy"], cache, base_trainable=True)
    np.testing.assert_allclose(ns["y"], y, rtol=1e-12)
    for name, got in (("dB", g.B), ("dA", g.A), ("dx", g.x), ("dW", g.weight), ("db", g.bias)):
        np.testing.assert_allclose(ns[name], got, rtol=1e-12, err_msg=name)


def test_backprop_md_linear_and_activation_formulas_are_the_kernels():
    import math

    from lowrank.nn import functional as F

    rng = np.random.default_rng(6)
    x, W, dy = rng.standard_normal((5, 3)), rng.standard_normal((2, 3)), rng.standard_normal((5, 2))
    ns = {"np": np, "x": x, "W": W, "dy": dy}
    linear = arrow_formulas(section("backprop.md", "## Linear: Y = X Wᵀ, the rule every product follows"))
    assert [f.split(" =")[0] for f in linear] == ["dx", "dW", "db"]
    for formula in linear:
        exec(formula, ns)
    g = F.linear_backward(dy, F.linear(x, W, np.zeros(2))[1])
    for name, got in (("dx", g.x), ("dW", g.weight), ("db", g.bias)):
        np.testing.assert_allclose(ns[name], got, rtol=1e-12, err_msg=name)

    table = section("backprop.md", "## Activations (elementwise)")
    rules = re.findall(r"^\|[^|]*\|[^|]*\| `(dx = [^`]*)` \|$", table, flags=re.M)
    assert len(rules) == 4
    z = rng.standard_normal((4, 3)) * 2
    dz = rng.standard_normal((4, 3))
    cdf = 0.5 * np.vectorize(math.erfc)(-z / math.sqrt(2))
    kernels = [(F.relu, F.relu_backward), (F.tanh, F.tanh_backward), (F.sigmoid, F.sigmoid_backward),
               (F.gelu, F.gelu_backward)]
    for rule, (forward, backward) in zip(rules, kernels, strict=True):
        y, cache = forward(z)
        ns = {"np": np, "x": z, "y": y, "dy": dz, "cdf": cdf, "dcdf": np.exp(-z * z / 2) / math.sqrt(2 * math.pi)}
        exec(rule, ns)
        np.testing.assert_allclose(ns["dx"], backward(dz, cache), rtol=1e-12, atol=1e-15, err_msg=rule)
