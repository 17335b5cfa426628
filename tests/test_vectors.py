"""Reference vectors: an independent candidate following the manifest's words passes; anything wrong fails.

The candidate below is written from the manifest's conventions, not from
lowrank.reference.vectors: SVD through numpy.linalg.svd, ALS sweeps and the Adam step by
hand, LoRA merge in float64. Only the layer kernels come from lowrank.nn
(the torch crosscheck recomputes those with autograd).
"""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("safetensors")

from lowrank import nn
from lowrank.io import load_safetensors, save_safetensors
from lowrank.nn import functional as F
from lowrank.reference.vectors import MANIFEST_NAME, TOLERANCES, check_vectors, read_manifest, write_vectors


def _scaling(params: dict) -> float:
    return params["alpha"] / (math.sqrt(params["r"]) if params["use_rslora"] else params["r"])


def _als_by_hand(M, mask, right, reg, sweeps):
    """ALS sweeps written from the manifest: per row, then per column, regularized normal equations."""
    m, n = M.shape
    r = right.shape[0]
    losses = []
    for _ in range(sweeps):
        left = np.stack([np.linalg.solve(right[:, mask[i]] @ right[:, mask[i]].T + reg * np.eye(r),
                                         right[:, mask[i]] @ M[i, mask[i]]) for i in range(m)])
        right = np.stack([np.linalg.solve(left[mask[:, j]].T @ left[mask[:, j]] + reg * np.eye(r),
                                          left[mask[:, j]].T @ M[mask[:, j], j]) for j in range(n)], axis=1)
        resid = np.where(mask, M - left @ right, 0.0)
        losses.append(np.sum(resid**2) + reg * (np.sum(left**2) + np.sum(right**2)))
    return left @ right, np.array(losses)


def _compute(case: dict, t: dict) -> dict:
    """Outputs of one case, computed from its inputs and the manifest's description."""
    kind, p = case["kind"], case["params"]
    if kind == "linear":
        y, cache = F.linear(t["x"], t["weight"], t.get("bias"))
        g = F.linear_backward(t["dy"], cache)
        out = {"y": y, "dx": g.x, "dweight": g.weight, "dbias": g.bias}
    elif kind == "lora_linear":
        assert p["scaling"] == _scaling(p)
        y, cache = F.lora_linear(t["x"], t["weight"], t.get("bias"), t["A"], t["B"], _scaling(p),
                                 dropout_mask=t.get("dropout_mask"))
        g = F.lora_linear_backward(t["dy"], cache, base_trainable=True)
        out = {"y": y, "dx": g.x, "dA": g.A, "dB": g.B, "dweight": g.weight, "dbias": g.bias}
    elif kind == "lora_merge":
        W, A, B = (t[k].astype(np.float64) for k in ("weight", "A", "B"))
        out = {"merged_weight": (W + _scaling(p) * B @ A).astype(t["weight"].dtype)}
    elif kind == "dropout":
        out = {"y": t["x"] * t["mask"], "dx": t["dy"] * t["mask"]}
    elif kind in ("relu", "tanh", "sigmoid", "gelu", "gelu_tanh"):
        fwd = {"relu": F.relu, "tanh": F.tanh, "sigmoid": F.sigmoid, "gelu": F.gelu,
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[kind]
        bwd = {"relu": F.relu_backward, "tanh": F.tanh_backward, "sigmoid": F.sigmoid_backward}.get(
            kind, F.gelu_backward)
        y, cache = fwd(t["x"])
        out = {"y": y, "dx": bwd(t["dy"], cache)}
    elif kind in ("mse_loss", "cross_entropy", "binary_cross_entropy_with_logits"):
        fn = getattr(F, kind)
        pred = t["pred"] if kind == "mse_loss" else t["logits"]
        loss, grad = fn(pred, t["target"])
        out = {"loss": np.float64(loss), "dpred" if kind == "mse_loss" else "dlogits": grad}
    elif kind == "mlp_lora_adam_step":
        dtype = t["x"].dtype
        model = nn.Sequential(nn.Linear(4, 8, dtype=dtype), nn.ReLU(), nn.Linear(8, 3, dtype=dtype))
        model[0] = nn.LoRALinear(model[0], r=p["r"], alpha=p["alpha"])
        model[2] = nn.LoRALinear(model[2], r=p["r"], alpha=p["alpha"])
        model.load_state_dict({k[len("param."):]: v for k, v in t.items() if k.startswith("param.")})
        pred = model(t["x"])
        loss, dpred = F.mse_loss(pred, t["target"])
        model.backward(dpred)
        out = {"pred": pred, "loss": np.float64(loss)}
        (b1, b2), lr, eps = p["betas"], p["lr"], p["eps"]
        for key, param in model.named_parameters():
            if param.trainable:  # Adam's first step, by hand: m = (1-b1) g, v = (1-b2) g²
                g = param.grad
                m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
                out[f"grad.{key}"] = g
                out[f"updated.{key}"] = (param.data - lr * m_hat / (np.sqrt(v_hat) + eps)).astype(dtype)
    elif kind == "truncated_svd":
        U, s, Vt = np.linalg.svd(t["M"].astype(np.float64))
        k = p["rank"]
        out = {"s": s[:k], "reconstruction": (U[:, :k] * s[:k]) @ Vt[:k]}
        out = {name: v.astype(t["M"].dtype) for name, v in out.items()}
    elif kind == "als":
        product, losses = _als_by_hand(t["M"], t["mask"], t["right_init"], p["reg"], p["sweeps"])
        out = {"product": product, "losses": losses}
    else:
        raise AssertionError(f"unknown kind {kind}")
    return {k: v for k, v in out.items() if v is not None}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    names = write_vectors(folder)
    assert len(names) == len(set(names)) > 30
    return folder


@pytest.fixture(scope="module")
def candidate(ref, tmp_path_factory):
    """Outputs computed independently from the reference inputs, one file per case."""
    folder = tmp_path_factory.mktemp("candidate")
    for case in read_manifest(ref)["cases"]:
        tensors = load_safetensors(ref / case["file"])
        inputs = {k: tensors[k] for k in case["inputs"]}
        save_safetensors(folder / case["file"], _compute(case, inputs))
    return folder


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_round_trip_independent_candidate_passes(ref, candidate):
    report = check_vectors(ref, candidate)
    assert report.passed, report.format()
    manifest = read_manifest(ref)
    assert len(report.rows) == sum(len(c["outputs"]) for c in manifest["cases"])
    assert report.format().splitlines()[-1].startswith("PASSED")


def test_manifest_covers_the_issue(ref):
    manifest = json.loads((ref / MANIFEST_NAME).read_text())
    kinds = {c["kind"] for c in manifest["cases"]}
    assert {"linear", "lora_linear", "lora_merge", "relu", "tanh", "sigmoid", "gelu", "dropout", "mse_loss",
            "cross_entropy", "binary_cross_entropy_with_logits", "mlp_lora_adam_step", "truncated_svd",
            "als"} <= kinds
    lora = [c for c in manifest["cases"] if c["kind"] == "lora_linear"]
    assert {c["dtype"] for c in lora} == {"float32", "float64"}
    assert len({(c["params"]["r"], c["params"]["alpha"]) for c in lora}) >= 4
    assert any(c["params"]["use_rslora"] for c in lora)
    assert any("dropout_mask" in c["inputs"] for c in lora)
    assert any(len(c["inputs"]["x"]["shape"]) >= 3 for c in lora)  # two leading batch dims
    assert any("bias" not in c["inputs"] for c in lora) and any("bias" in c["inputs"] for c in lora)
    for c in manifest["cases"]:
        assert (c["rtol"], c["atol"]) == tuple(TOLERANCES[c["dtype"]].values())
        for spec in {**c["inputs"], **c["outputs"]}.values():
            assert spec["description"]
    for topic in ("shapes", "scaling", "dropout", "reduction", "adam", "als", "comparison"):
        assert manifest["conventions"][topic]


def test_same_seed_same_bytes_other_seed_other_values(ref, tmp_path):
    write_vectors(tmp_path / "again")
    for path in sorted(ref.iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    write_vectors(tmp_path / "other", random_state=1)
    a = load_safetensors(ref / "lora_linear_r1_alpha1_f64.safetensors")
    b = load_safetensors(tmp_path / "other" / "lora_linear_r1_alpha1_f64.safetensors")
    assert not np.array_equal(a["x"], b["x"])


@pytest.mark.parametrize(("case", "tensor", "dtype"), [
    ("lora_linear_r2_alpha8_dropout_f64", "dA", np.float64),
    ("lora_linear_r4_alpha16_rslora_f32", "dx", np.float32),
    ("mlp_lora_adam_step_f64", "updated.2.lora_B.weight", np.float64),
    ("als_f64", "product", np.float64),
])  # fmt: skip
def test_perturbed_candidate_fails_naming_the_tensor(ref, candidate, tmp_path, case, tensor, dtype):
    bad = _copy(candidate, tmp_path / "bad")
    tensors = load_safetensors(bad / f"{case}.safetensors")
    rtol = TOLERANCES[np.dtype(dtype).name]["rtol"]
    tensors[tensor] = tensors[tensor].copy()
    tensors[tensor].flat[0] += 20 * rtol * (1 + abs(tensors[tensor].flat[0]))  # just outside the tolerance
    save_safetensors(bad / f"{case}.safetensors", tensors)
    report = check_vectors(ref, bad)
    assert not report.passed
    assert [(r.case, r.tensor) for r in report.failures] == [(case, tensor)]
    assert report.failures[0].max_abs > 0
    assert f"{tensor}" in report.format() and "FAIL" in report.format()


def test_missing_file_and_missing_tensor_and_wrong_shape_fail(ref, candidate, tmp_path):
    bad = _copy(candidate, tmp_path / "bad")
    (bad / "relu_f64.safetensors").unlink()
    tensors = load_safetensors(bad / "linear_bias_f32.safetensors")
    del tensors["dbias"]
    tensors["dx"] = tensors["dx"][..., :-1]
    save_safetensors(bad / "linear_bias_f32.safetensors", tensors)
    report = check_vectors(ref, bad)
    failures = {(r.case, r.tensor): r.note for r in report.failures}
    assert failures == {
        ("relu_f64", "*"): "missing file relu_f64.safetensors",
        ("linear_bias_f32", "dbias"): "missing tensor",
        ("linear_bias_f32", "dx"): "shape (2, 3, 4), expected (2, 3, 5)",
    }


def test_nan_in_candidate_fails(ref, candidate, tmp_path):
    bad = _copy(candidate, tmp_path / "bad")
    tensors = load_safetensors(bad / "tanh_f32.safetensors")
    tensors["y"] = tensors["y"].copy()
    tensors["y"][0, 0] = np.nan
    save_safetensors(bad / "tanh_f32.safetensors", tensors)
    report = check_vectors(ref, bad)
    assert [(r.case, r.tensor, r.note) for r in report.failures] == [("tanh_f32", "y", "non-finite values")]


def test_wrong_dtype_is_noted_and_fails_when_outside_tolerance(ref, candidate, tmp_path):
    bad = _copy(candidate, tmp_path / "bad")
    tensors = load_safetensors(bad / "gelu_f64.safetensors")
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}  # float32 rounding >> float64 rtol
    save_safetensors(bad / "gelu_f64.safetensors", tensors)
    failures = check_vectors(ref, bad).failures
    assert {r.tensor for r in failures} == {"y", "dx"}
    assert all("dtype float32, expected float64" in r.note for r in failures)


def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_corrupt_or_truncated_files_give_one_line_errors(ref, candidate, tmp_path):
    # candidate safetensors truncated
    bad = _copy(candidate, tmp_path / "bad")
    path = bad / "sigmoid_f32.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    _one_line_error(lambda: check_vectors(ref, bad), "sigmoid_f32.safetensors is not a readable .safetensors")
    path.write_bytes(b"\x00" * 3)
    _one_line_error(lambda: check_vectors(ref, bad), "sigmoid_f32.safetensors is not a readable .safetensors")

    # reference safetensors edited or truncated: caught by the manifest's sha256
    broken = _copy(ref, tmp_path / "broken")
    path = broken / "als_f64.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    _one_line_error(lambda: check_vectors(broken, candidate), "als_f64.safetensors does not match its sha256")
    path.unlink()
    _one_line_error(lambda: check_vectors(broken, candidate), "reference file .*als_f64.safetensors is missing")

    # manifest truncated, not a manifest, missing; folders missing
    manifest = broken / MANIFEST_NAME
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    _one_line_error(lambda: check_vectors(broken, candidate), "is not a readable JSON file")
    manifest.write_text(json.dumps({"format": "something else"}))
    _one_line_error(lambda: check_vectors(broken, candidate), "'format' must be 'lowrank-vectors'")
    manifest.write_text(json.dumps({"format": "lowrank-vectors", "version": 1, "cases": [{"name": "x"}]}))
    _one_line_error(lambda: check_vectors(broken, candidate), "case 0 lacks")
    manifest.unlink()
    _one_line_error(lambda: check_vectors(broken, candidate), "holds no manifest.json")
    _one_line_error(lambda: check_vectors(tmp_path / "nowhere", candidate), "no such vectors folder")
    _one_line_error(lambda: check_vectors(ref, tmp_path / "nowhere"), "no such candidate folder")


def test_missing_io_extra_names_it(ref, candidate, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"pip install 'lowrank\[io\]'"):
        write_vectors(tmp_path / "v")
    with pytest.raises(ImportError, match=r"pip install 'lowrank\[io\]'"):
        check_vectors(ref, candidate)
