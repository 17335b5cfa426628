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


SEED = 3  # the demo_json fixture's --seed


def test_nine_by_nine_errors_are_the_eckart_young_tail_sums(demo_json):
    """The table rebuilt here from the documented recipe, its errors from np.linalg.svd: sqrt(sum s[r:]²) / ‖M‖_F."""
    rng = np.random.default_rng(SEED)
    k = np.arange(1.0, 10.0)
    M = np.outer(k, k) + 0.5 * rng.standard_normal((9, 9))
    s = np.linalg.svd(M, compute_uv=False)
    nine = demo_json["nine_by_nine"]
    assert nine["dense_params"] == 9 * 9
    assert [row["rank"] for row in nine["ranks"]] == list(range(1, 10))
    for row in nine["ranks"]:
        r = row["rank"]
        tail = np.sqrt(np.sum(s[r:] ** 2)) / np.sqrt(np.sum(s**2))
        assert row["params"] == r * (9 + 9)
        assert row["eckart_young"] == pytest.approx(tail, rel=1e-9, abs=1e-15)
        assert row["relative_error"] == pytest.approx(tail, rel=1e-9, abs=1e-13)


def test_nine_by_nine_randomized_and_als_are_never_below_the_optimum(demo_json):
    """Eckart–Young is a floor: every rank-r factorization's error is at least the tail of np.linalg.svd's s."""
    rng = np.random.default_rng(SEED)
    k = np.arange(1.0, 10.0)
    M = np.outer(k, k) + 0.5 * rng.standard_normal((9, 9))
    s = np.linalg.svd(M, compute_uv=False)
    for row in demo_json["nine_by_nine"]["ranks"]:
        floor = np.sqrt(np.sum(s[row["rank"]:] ** 2)) / np.linalg.norm(M)
        for key in ("randomized_q0", "randomized_q1", "als"):
            assert row[key] >= floor * (1 - 1e-9) - 1e-12, (key, row)
            assert row[key] <= 1.0  # a fit never worse than the zero matrix here
        assert 1 <= row["als_sweeps"] <= 200


def test_every_demo_part_ends_with_a_take_away(demo_json):
    """Each numbered part of the text report ends with one 'Take-away:' sentence."""
    from lowrank.demo import format_report

    text = format_report(demo_json)
    parts = [p for p in text.split("\n\n") if p[:2].rstrip(".").isdigit()]
    numbered = {p.split(".")[0] for p in parts}
    assert {"1", "2", "3", "4", "6"} <= numbered
    for number in numbered:
        block = text[text.index(f"{number}. "):]
        nxt = [text.index(f"\n{m}. ") for m in numbered if int(m) > int(number) and f"\n{m}. " in text]
        block = text[text.index(f"{number}. "):min(nxt)] if nxt else block
        assert "Take-away:" in block, f"part {number} has no take-away"


def test_completion_recovers_the_hidden_entries_of_the_planted_matrix(demo_json):
    c = demo_json["completion"]
    m, n, rank = 60, 40, 3  # --quick sizes
    rng = np.random.default_rng(SEED)
    rng.standard_normal((m, rank)), rng.standard_normal((rank, n))  # the factors, drawn first
    mask = rng.random((m, n)) < 0.4
    assert c["shape"] == [m, n] and c["rank"] == rank
    assert c["observed_fraction"] == mask.mean()
    assert c["relative_error_hidden"] < 1e-6 and 1 <= c["sweeps"] <= 300


def test_gpt3_budget_follows_the_formula(demo_json):
    g = demo_json["gpt3"]
    trainable = 2 * 96 * 1 * (12288 + 12288)  # W_q and W_v, 96 layers, r = 1: r·(d + d) each
    assert g["trainable"] == trainable == 4_718_592
    assert g["total"] == 175_255.8e6
    assert g["trainable_percent"] == pytest.approx(100 * trainable / 175_255.8e6, rel=1e-12)
    assert round(g["trainable_percent"], 4) == 0.0027


def test_adaptation_parameter_counts_follow_r_times_in_plus_out(demo_json):
    a = demo_json["adaptation"]
    d_in, hidden, d_out = a["layer_sizes"]
    assert a["layer_sizes"] == [32, 128, 6]  # the demo's network: n_features -> 128 -> n_classes
    full = hidden * d_in + hidden + d_out * hidden + d_out  # two Linear layers with bias
    for rows in (a["methods"], a["contrast"]["methods"]):
        assert [row["method"] for row in rows] == [
            "full", "lora r=1", "lora r=2", "lora r=4", "lora r=8", "dora r=1", "dora r=2", "dora r=4", "dora r=8"
        ]  # fmt: skip
        counts = {row["method"]: row["trainable_params"] for row in rows}
        assert counts["full"] == full
        for r in (1, 2, 4, 8):
            assert counts[f"lora r={r}"] == r * (d_in + hidden) + r * (hidden + d_out)
            assert counts[f"dora r={r}"] == counts[f"lora r={r}"] + hidden + d_out  # and a magnitude per output
        for row in rows:
            assert row["percent_of_full"] == pytest.approx(100 * row["trainable_params"] / full, rel=1e-12)
            assert len(row["val_loss_curve"]) == a["finetune_epochs"] == 6  # --quick
            assert row["val_loss"] == row["val_loss_curve"][-1]
            assert 0.0 <= row["val_acc"] <= 1.0
    assert len(a["pretrain"]["val_loss_curve"]) == a["pretrain"]["epochs"] == 4


def test_delta_w_analysis_follows_from_its_singular_values(demo_json):
    a = demo_json["adaptation"]
    d = a["delta_w"]
    assert d["layer"] == "0.weight"  # torch-style name of the MLP's first Linear layer
    s = np.asarray(d["singular_values"])
    d_in, hidden, _ = a["layer_sizes"]
    assert s.shape == (min(d_in, hidden),) and np.all(s >= 0) and np.all(np.diff(s) <= 0)
    for k in ("1", "2", "4", "8"):  # energy kept by the top k directions: sum(s[:k]²) / sum(s²)
        assert d["energy_top"][k] == pytest.approx(np.sum(s[: int(k)] ** 2) / np.sum(s**2), rel=1e-9)
    top = (1, 2, 4, 8)
    phi = d["similarity_lora8_vs_full"]
    assert sorted(phi) == sorted(f"{i},{j}" for i in top for j in top)
    for value in [*phi.values(), *d["similarity_full_vs_planted"].values()]:
        assert -1e-12 <= value <= 1 + 1e-12
    # the top-k singular directions are nested (top 1 ⊂ top 2 ⊂ …), so the overlap ‖U_iᵀ U_j‖²_F = φ(i, j)·min(i, j)
    # can only grow with i and with j; the same for the overlap with the planted change (rank a["planted_rank"])
    overlap = np.array([[phi[f"{i},{j}"] * min(i, j) for j in top] for i in top])
    assert np.all(np.diff(overlap, axis=0) >= -1e-9) and np.all(np.diff(overlap, axis=1) >= -1e-9)
    planted = [d["similarity_full_vs_planted"][str(k)] * min(k, a["planted_rank"]) for k in top]
    assert np.all(np.diff(planted) >= -1e-9)


def test_demo_adaptation_tells_the_story(demo_json):
    """LoRA at small rank recovers task B about as well as full fine-tuning, and ΔW is low-rank."""
    a = demo_json["adaptation"]
    rows = {row["method"]: row for row in a["methods"]}
    assert rows["lora r=2"]["val_acc"] > a["before_adaptation"]["val_acc"] + 0.05
    assert rows["lora r=2"]["val_acc"] > rows["full"]["val_acc"] - 0.05
    assert rows["dora r=2"]["val_acc"] > a["before_adaptation"]["val_acc"] + 0.05  # DoRA adapts as well
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


def test_linear_layer_names_follow_the_torch_style_indices():
    from lowrank import nn
    from lowrank.demo import linear_layer_names

    mlp = nn.MLP([4, 8, 8, 2], activation="tanh", random_state=0)  # Linear, Tanh, Linear, Tanh, Linear
    assert linear_layer_names(mlp) == ["0", "2", "4"]
    assert linear_layer_names(nn.inject_lora(mlp, r=2, alpha=4, random_state=0)) == ["0", "2", "4"]
    assert linear_layer_names(nn.Sequential(nn.ReLU(), nn.Linear(3, 3))) == ["1"]


def test_gpt2_part_counts_follow_the_lora_formulas(demo_json):
    g = demo_json["gpt2"]
    z = g["sizes"]
    c, v, t, n_layer, r = z["n_embd"], z["vocab_size"], z["T"], z["n_layer"], g["rank"]
    per_block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    assert z["n_params"] == v * c + t * c + n_layer * per_block + 2 * c  # the head tied to wte: counted once
    counts = {row["method"]: row["trainable_params"] for row in g["methods"]}
    assert list(counts) == ["full", "lora W_q,W_v", "lora c_attn", "lora all proj"]
    assert counts["full"] == z["n_params"]
    # loralib's MergedLinear: A (2r, C) and B (2C, r) for the two enabled blocks of c_attn (C -> 3C)
    assert counts["lora W_q,W_v"] == n_layer * (2 * r * c + 2 * c * r)
    assert counts["lora c_attn"] == n_layer * r * (c + 3 * c)
    assert counts["lora all proj"] == n_layer * r * ((c + 3 * c) + (c + c) + (c + 4 * c) + (4 * c + c))
    for row in g["methods"]:
        assert row["percent_of_full"] == pytest.approx(100 * row["trainable_params"] / z["n_params"], rel=1e-12)
        assert row["val_loss"] == row["val_loss_curve"][-1] and len(row["val_loss_curve"]) == g["finetune_epochs"]


def test_gpt2_part_delta_qv_spectra(demo_json):
    g = demo_json["gpt2"]
    c, r = g["sizes"]["n_embd"], g["rank"]
    assert sorted(g["delta_qv"]) == ["full", "lora W_q,W_v"]
    for method, layers in g["delta_qv"].items():
        assert sorted(layers) == [f"transformer.h.{i}" for i in range(g["sizes"]["n_layer"])]
        for ws in layers.values():
            for d in ws.values():
                s = np.asarray(d["singular_values"])
                assert s.shape == (c,) and np.all(np.diff(s) <= 0) and s[-1] >= 0
                for k in ("1", "2", "4"):
                    assert d["energy_top"][k] == pytest.approx(np.sum(s[: int(k)] ** 2) / np.sum(s**2), rel=1e-9)
                if method != "full":
                    assert d["numerical_rank"] <= r  # ΔW = scaling * B_j @ A_j has rank at most r


def test_gpt2_part_tells_the_story(demo_json):
    """Every method learns the new strides, which the pretrained model gets wrong; LoRA W_q,W_v among them."""
    g = demo_json["gpt2"]
    before = g["before_adaptation"]["val_acc"]
    assert before < 0.2
    for row in g["methods"]:
        assert row["val_acc"] > before + 0.3, row["method"]
