"""``lowrank demo``, ``gradcheck`` and ``vectors`` through the command line."""

import json
import sys

import numpy as np
import pytest

from lowrank.cli import main


@pytest.fixture(scope="module")
def demo_json():
    """One quick demo run, shared by the tests that read its JSON."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--quick", "--json", "--seed", "3"])
    assert code == 0
    return json.loads(out.getvalue())  # stdout holds the JSON and nothing else


def test_demo_json_has_the_documented_fields(demo_json):
    for key in ("seed", "quick", "nine_by_nine", "completion", "gpt3", "adaptation", "seconds"):
        assert key in demo_json
    a = demo_json["adaptation"]
    for key in ("layer_sizes", "planted_rank", "labels_changed", "pretrain", "before_adaptation",
                "finetune_epochs", "methods", "delta_w"):
        assert key in a
    assert [row["method"] for row in a["methods"]] == ["full", "lora r=1", "lora r=2", "lora r=4", "lora r=8"]
    for key in ("energy_top", "similarity_lora8_vs_full", "similarity_full_vs_planted", "singular_values"):
        assert key in a["delta_w"]
    for key in ("planted_rank", "labels_changed", "before_adaptation", "methods", "energy_top"):
        assert key in a["contrast"]
    assert [row["method"] for row in a["contrast"]["methods"]] == [row["method"] for row in a["methods"]]


def test_demo_numbers_follow_from_the_formulas(demo_json):
    assert demo_json["seed"] == 3 and demo_json["quick"] is True
    nine = demo_json["nine_by_nine"]
    assert nine["dense_params"] == 81
    assert [row["params"] for row in nine["ranks"]] == [r * 18 for r in range(1, 10)]
    assert demo_json["gpt3"]["trainable"] == 2 * 96 * 1 * (12288 + 12288)
    assert round(demo_json["gpt3"]["trainable_percent"], 4) == 0.0027

    a = demo_json["adaptation"]
    d_in, hidden, d_out = a["layer_sizes"]
    full = hidden * d_in + hidden + d_out * hidden + d_out
    rows = {row["method"]: row for row in a["methods"]}
    assert rows["full"]["trainable_params"] == full
    for r in (1, 2, 4, 8):
        row = rows[f"lora r={r}"]
        assert row["trainable_params"] == r * (d_in + hidden) + r * (hidden + d_out)
        assert row["percent_of_full"] == pytest.approx(100 * row["trainable_params"] / full)
    for row in a["methods"]:
        assert 0.0 <= row["val_acc"] <= 1.0 and np.isfinite(row["val_loss"])
        assert len(row["val_loss_curve"]) == a["finetune_epochs"]

    energy = [a["delta_w"]["energy_top"][k] for k in ("1", "2", "4", "8")]
    assert all(0 <= e <= 1 for e in energy) and energy == sorted(energy)
    s = np.asarray(a["delta_w"]["singular_values"])
    assert energy[1] == pytest.approx(np.sum(s[:2] ** 2) / np.sum(s**2))
    d = a["delta_w"]
    for value in [*d["similarity_lora8_vs_full"].values(), *d["similarity_full_vs_planted"].values()]:
        assert -1e-12 <= value <= 1 + 1e-12


def test_demo_adaptation_tells_the_story(demo_json):
    """LoRA at small rank recovers task B about as well as full fine-tuning, and ΔW is low-rank."""
    a = demo_json["adaptation"]
    rows = {row["method"]: row for row in a["methods"]}
    assert rows["lora r=2"]["val_acc"] > a["before_adaptation"]["val_acc"] + 0.05
    assert rows["lora r=2"]["val_acc"] > rows["full"]["val_acc"] - 0.05
    assert a["delta_w"]["energy_top"]["2"] > 0.5  # a rank-2 change: most energy in 2 directions

    c = a["contrast"]  # a full-rank change of the same size: rank 1 no longer suffices
    contrast = {row["method"]: row for row in c["methods"]}
    assert c["planted_rank"] > a["planted_rank"]
    assert contrast["lora r=1"]["val_acc"] < contrast["full"]["val_acc"] - 0.03
    assert c["energy_top"]["2"] < a["delta_w"]["energy_top"]["2"]


def test_subspace_similarity_is_the_papers_measure():
    from lowrank.demo import subspace_similarity

    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    assert subspace_similarity(Q[:, :2].T, Q[:, :5].T) == pytest.approx(1.0)  # contained
    assert subspace_similarity(Q[:, :2].T, Q[:, 2:4].T) == pytest.approx(0.0, abs=1e-12)  # orthogonal
    # one shared direction out of two: ‖U_iᵀ U_j‖² = 1, divided by min(2, 2)
    assert subspace_similarity(Q[:, :2].T, Q[:, 1:3].T) == pytest.approx(0.5)


def _one_line_error(capsys, code):
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("lowrank: error:") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_demo_plot_without_matplotlib_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = _one_line_error(capsys, main(["demo", "--quick", "--plot", str(tmp_path / "x.png")]))
    assert "lowrank[plot]" in err


def test_demo_plot_to_an_unwritable_path_fails_before_running(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    err = _one_line_error(capsys, main(["demo", "--quick", "--plot", str(tmp_path / "no" / "x.png")]))
    assert "x.png" in err


def test_gradcheck_command_passes_and_prints_a_table(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "lora_A" in out and "all passed" in out


def test_vectors_commands_write_check_and_fail(capsys, tmp_path):
    pytest.importorskip("safetensors")
    from lowrank.io import load_safetensors, save_safetensors

    ref = tmp_path / "ref"
    assert main(["vectors", "write", str(ref)]) == 0
    assert main(["vectors", "check", str(ref), str(ref)]) == 0
    capsys.readouterr()

    cand = tmp_path / "cand"
    cand.mkdir()
    for file in ref.iterdir():
        (cand / file.name).write_bytes(file.read_bytes())
    case = next(c for c in json.loads((ref / "manifest.json").read_text())["cases"] if c["kind"] == "lora_linear")
    target = cand / case["file"]
    tensors = load_safetensors(target)
    tensors["dA"] = tensors["dA"] + np.asarray(1e-2, dtype=tensors["dA"].dtype)  # a wrong gradient
    save_safetensors(target, tensors)
    assert main(["vectors", "check", str(ref), str(cand)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out
    failing = [line for line in out.splitlines() if line.startswith(case["name"]) and " dA " in line]
    assert failing and "ok" not in failing[0].split()

    _one_line_error(capsys, main(["vectors", "check", str(ref), str(tmp_path / "missing")]))
