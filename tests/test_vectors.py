"""Reference vectors: an independent candidate following the manifest's words passes; anything wrong fails.

The candidate below is written from the manifest's conventions alone, in
float64 NumPy, and never calls a lowrank kernel or module: the linear and LoRA
layers and their gradients, every activation and loss, the merge, the LoRA MLP
and its Adam step are formulas written out here; the SVD comes from
numpy.linalg.svd; the ALS sweeps solve the normal equations row by row.
Float32 cases are computed in float64 from their float32 inputs and rounded
once at the end.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import shutil
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import as_layout, float_arrays

from lowrank.cli import main
from lowrank.io import load_safetensors, save_safetensors
from lowrank.io.safetensors import read_safetensors_header
from lowrank.reference.cases import CONV1D_CASES, DORA_CASES, LINEAR_CASES, LORA_CASES
from lowrank.reference.compare import compare
from lowrank.reference.vectors import MANIFEST_NAME, TOLERANCES, check_vectors, read_manifest, write_vectors

# ---------------------------------------------------------------- the candidate, by hand


def _scaling(params: dict) -> float:
    return params["alpha"] / (math.sqrt(params["r"]) if params["use_rslora"] else params["r"])


def _lora_by_hand(x, W, b, A, B, s, mask):
    """y = x W^T + b + s ((x*mask) A^T) B^T and its gradients for upstream dy, all batch dims flattened."""
    xm = x if mask is None else x * mask  # (..., in)
    y = x @ W.T + s * (xm @ A.T) @ B.T + (0.0 if b is None else b)  # (..., out)

    def backward(dy):
        n_in = x.shape[-1]
        x2, xm2, dy2 = x.reshape(-1, n_in), xm.reshape(-1, n_in), dy.reshape(-1, dy.shape[-1])  # (N, .)
        dxa = s * dy2 @ B  # (N, r): gradient at xm @ A.T
        dxm = (dxa @ A).reshape(x.shape)  # (..., in)
        return {
            "dx": dy @ W + (dxm if mask is None else dxm * mask),
            "dA": dxa.T @ xm2,  # (r, in)
            "dB": s * dy2.T @ (xm2 @ A.T),  # (out, r)
            "dweight": dy2.T @ x2,  # (out, in)
            "dbias": None if b is None else dy2.sum(axis=0),
        }

    return y, backward


def _dora_by_hand(x, W, b, A, B, m, s, mask, exact):
    """PEFT's DoRA forward written out, and its gradients with the norm held constant or differentiated.

    V = W + s B A, n = row norms of V, c = m / n, xm = x * mask, u = xm V^T, and
    y = x W^T + b + (c - 1) (xm W^T) + c s (xm A^T) B^T = x W^T + b + c u - xm W^T.
    """
    xm = x if mask is None else x * mask  # (..., in)
    V = W + s * B @ A  # (out, in)
    n = np.sqrt(np.sum(V * V, axis=1))  # (out,)
    c = m / n  # (out,)
    y = x @ W.T + (c - 1.0) * (xm @ W.T) + c * (s * (xm @ A.T) @ B.T) + (0.0 if b is None else b)

    def backward(dy):
        n_in, n_out = x.shape[-1], W.shape[0]
        x2, xm2, dy2 = x.reshape(-1, n_in), xm.reshape(-1, n_in), dy.reshape(-1, n_out)  # (N, .)
        u = xm2 @ V.T  # (N, out)
        du = dy2 * c  # (N, out)
        dxm = du @ V - dy2 @ W  # (N, in)
        dc = np.sum(dy2 * u, axis=0)  # (out,)
        dV = du.T @ xm2  # (out, in): through u, c held fixed
        if exact:  # through n as well: dn = -m / n^2 dc, and dn/dV_i = V_i / n_i
            dV = dV - (m * dc / n**3)[:, None] * V
        return {
            "dx": dy @ W + (dxm.reshape(x.shape) if mask is None else dxm.reshape(x.shape) * mask),
            "dA": s * B.T @ dV,  # (r, in)
            "dB": s * dV @ A.T,  # (out, r)
            "dmagnitude": dc / n,  # (out,)
            "dweight": dy2.T @ x2 - dy2.T @ xm2 + dV,  # (out, in)
            "dbias": None if b is None else dy2.sum(axis=0),
        }

    return y, backward


_PHI = np.vectorize(lambda v: 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))))  # standard normal CDF
_GELU_C = math.sqrt(2.0 / math.pi)


def _activation_by_hand(kind, x):
    """(y, dy/dx) elementwise, from the formulas."""
    if kind == "relu":
        return np.maximum(x, 0.0), (x > 0).astype(np.float64)
    if kind == "tanh":
        return np.tanh(x), 1.0 - np.tanh(x) ** 2
    if kind == "sigmoid":
        sig = 1.0 / (1.0 + np.exp(-x))
        return sig, sig * (1.0 - sig)
    if kind == "gelu":  # x Phi(x); derivative Phi(x) + x phi(x)
        pdf = np.exp(-0.5 * x**2) / math.sqrt(2.0 * math.pi)
        return x * _PHI(x), _PHI(x) + x * pdf
    if kind == "gelu_tanh":  # x (1 + tanh(u)) / 2 with u = c (x + 0.044715 x^3)
        t = np.tanh(_GELU_C * (x + 0.044715 * x**3))
        du = _GELU_C * (1.0 + 3 * 0.044715 * x**2)
        return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du
    raise AssertionError(kind)


def _loss_by_hand(kind, z, target):
    """(mean loss, dloss/dz)."""
    if kind == "mse_loss":
        return np.mean((z - target) ** 2), 2.0 * (z - target) / z.size
    if kind == "cross_entropy":  # classes on the last axis, mean over positions
        shifted = z - z.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (..., 1)
        logp = shifted - lse
        onehot = np.eye(z.shape[-1])[target]  # (..., C)
        n = target.size
        return -np.sum(logp * onehot) / n, (np.exp(logp) - onehot) / n
    if kind == "binary_cross_entropy_with_logits":
        loss = np.maximum(z, 0.0) - z * target + np.log1p(np.exp(-np.abs(z)))
        return loss.mean(), (1.0 / (1.0 + np.exp(-z)) - target) / z.size
    raise AssertionError(kind)


def _mlp_adam_by_hand(t, p):
    """LoRA(Linear(4, 8)) -> ReLU -> LoRA(Linear(8, 3)), mse, backward, one Adam step on the factors."""
    s = _scaling(p)
    P = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    x, target = t["x"], t["target"]
    h, back0 = _lora_by_hand(x, P["0.weight"], P["0.bias"], P["0.lora_A.weight"], P["0.lora_B.weight"], s, None)
    a = np.maximum(h, 0.0)  # (6, 8)
    pred, back2 = _lora_by_hand(a, P["2.weight"], P["2.bias"], P["2.lora_A.weight"], P["2.lora_B.weight"], s, None)
    loss, dpred = _loss_by_hand("mse_loss", pred, target)
    g2 = back2(dpred)
    g0 = back0(g2["dx"] * (h > 0))
    grads = {"0.lora_A.weight": g0["dA"], "0.lora_B.weight": g0["dB"],
             "2.lora_A.weight": g2["dA"], "2.lora_B.weight": g2["dB"]}  # fmt: skip
    out = {"pred": pred, "loss": loss}
    (b1, b2), lr, eps = p["betas"], p["lr"], p["eps"]
    for key, g in grads.items():  # Adam's first step: m_hat = g, v_hat = g^2
        m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
        out[f"grad.{key}"] = g
        out[f"updated.{key}"] = P[key] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return out


def _svd_by_hand(M, k):
    """numpy.linalg.svd with signs made canonical: the largest-magnitude entry of each column of U positive."""
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    rows = np.argmax(np.abs(U), axis=0)
    signs = np.sign(U[rows, np.arange(U.shape[1])])
    U, Vt = U * signs, Vt * signs[:, None]
    return {"s": s[:k], "reconstruction": (U[:, :k] * s[:k]) @ Vt[:k]}


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


def _lora_embedding_by_hand(idx, W, A, B, s, dy, bug=None):
    """y = W[idx] + s A^T[idx] B^T; each position's gradient added into its row, one position at a time."""
    flat, dim = idx.reshape(-1), W.shape[1]
    y = W[flat] + s * A.T[flat] @ B.T  # (N, dim)
    dy2 = dy.reshape(-1, dim)  # (N, dim)
    dA, dW = np.zeros_like(A), np.zeros_like(W)
    for n, i in enumerate(flat):
        if bug == "embedding_not_summed":  # a scatter that overwrites: the last repeat wins
            dA[:, i] = s * dy2[n] @ B
            dW[i] = dy2[n]
        else:
            dA[:, i] += s * dy2[n] @ B  # (r,)
            dW[i] += dy2[n]
    return {"y": y.reshape(*idx.shape, dim), "dA": dA, "dB": s * dy2.T @ A.T[flat], "dweight": dW}


def _merged_by_hand(x, W, b, A, B, s, enable, mask, dy):
    """loralib's MergedLinear: the full update dW (out, in) built block by block, then LoRA's rules."""
    d, r = W.shape[0] // len(enable), B.shape[1]
    delta = np.zeros_like(W)  # (out, in)
    blocks = [g for g, on in enumerate(enable) if on]
    for j, g in enumerate(blocks):
        delta[g * d:(g + 1) * d] = B[j * d:(j + 1) * d] @ A[j * r:(j + 1) * r]
    xm = x if mask is None else x * mask
    n_in, n_out = x.shape[-1], W.shape[0]
    x2, xm2, dy2 = x.reshape(-1, n_in), xm.reshape(-1, n_in), dy.reshape(-1, n_out)
    dA, dB = np.zeros_like(A), np.zeros_like(B)
    for j, g in enumerate(blocks):
        dy_j, A_j, B_j = dy2[:, g * d:(g + 1) * d], A[j * r:(j + 1) * r], B[j * d:(j + 1) * d]
        dB[j * d:(j + 1) * d] = s * dy_j.T @ (xm2 @ A_j.T)
        dA[j * r:(j + 1) * r] = s * (dy_j @ B_j).T @ xm2
    dxm = s * dy @ delta
    return {"y": x @ W.T + b + s * xm @ delta.T, "dx": dy @ W + (dxm if mask is None else dxm * mask),
            "dA": dA, "dB": dB, "dweight": dy2.T @ x2, "dbias": dy2.sum(axis=0)}  # fmt: skip


def _softmax_jacobian(p):
    """(..., C, C): d p_i / d z_j = p_i (delta_ij - p_j)."""
    return p[..., :, None] * (np.eye(p.shape[-1]) - p[..., None, :])


def _softmax_by_hand(z, dy):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return p, np.einsum("...ji,...j->...i", _softmax_jacobian(p), dy)  # dx = J^T dy


def _layer_norm_by_hand(x, w, b, eps, dy):
    """y = xhat * w + b; dx through the per-row Jacobian of xhat, rstd (I - 1/D - xhat xhat^T / D)."""
    D = x.shape[-1]
    mu = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = (x - mu) * rstd
    J = rstd[..., None] * (np.eye(D) - 1.0 / D - xhat[..., :, None] * xhat[..., None, :] / D)  # (..., D, D)
    lead = tuple(range(x.ndim - 1))
    return {"y": xhat * w + b, "dx": np.einsum("...ji,...j->...i", J, dy * w),
            "dweight": (dy * xhat).sum(axis=lead), "dbias": dy.sum(axis=lead)}  # fmt: skip


def _attention_by_hand(q, k, v, scale, causal, attn_mask, dmask, dy):
    T, S = q.shape[-2], k.shape[-2]
    allowed = np.ones((T, S), dtype=bool)
    if causal:
        allowed &= np.arange(S)[None, :] <= np.arange(T)[:, None]
    if attn_mask is not None:
        allowed &= attn_mask
    scores = np.where(allowed, scale * q @ np.swapaxes(k, -1, -2), -np.inf)  # (..., T, S)
    p, _ = _softmax_by_hand(scores, np.zeros_like(scores))
    m = 1.0 if dmask is None else dmask
    dp = (dy @ np.swapaxes(v, -1, -2)) * m
    ds = np.einsum("...ji,...j->...i", _softmax_jacobian(p), dp)
    return {"y": (p * m) @ v, "dq": scale * ds @ k, "dk": scale * np.swapaxes(ds, -1, -2) @ q,
            "dv": np.swapaxes(p * m, -1, -2) @ dy}  # fmt: skip


def _cross_entropy_ignore_by_hand(z, target, ignore):
    kept = target != ignore  # (...)
    logp = z - z.max(axis=-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    onehot = np.eye(z.shape[-1])[np.where(kept, target, 0)] * kept[..., None]  # (..., C), 0 rows where ignored
    n = kept.sum()
    return -np.sum(logp * onehot) / n, (np.exp(logp) * kept[..., None] - onehot) / n


def _compute_new_kinds(case: dict, t: dict, bug: str | None = None) -> dict | None:
    """The Conv1D, Embedding, MergedLinear and attention-family kinds by hand; None for another kind."""
    kind, p = case["kind"], case["params"]
    if kind == "lora_conv1d":
        assert p["fan_in_fan_out"] and p["scaling"] == _scaling(p)
        square = t["weight"].shape[0] == t["weight"].shape[1]  # the bug reads (in, out) as (out, in): only fits there
        W = t["weight"] if bug == "conv1d_transposed" and square else t["weight"].T
        y, backward = _lora_by_hand(t["x"], W, t.get("bias"), t["A"], t["B"], _scaling(p), t.get("dropout_mask"))
        g = backward(t["dy"])
        return {"y": y, **g, "dweight": g["dweight"].T}
    if kind == "lora_embedding":
        return _lora_embedding_by_hand(t["idx"], t["weight"], t["A"], t["B"], _scaling(p), t["dy"], bug)
    if kind == "lora_merged_linear":
        return _merged_by_hand(t["x"], t["weight"], t["bias"], t["A"], t["B"], _scaling(p), p["enable_lora"],
                               t.get("dropout_mask"), t["dy"])  # fmt: skip
    if kind == "layer_norm":
        return _layer_norm_by_hand(t["x"], t["weight"], t["bias"], p["eps"], t["dy"])
    if kind == "softmax":
        y, dx = _softmax_by_hand(t["x"], t["dy"])
        return {"y": y, "dx": dx}
    if kind == "scaled_dot_product_attention":
        causal = p["is_causal"] and bug != "not_causal"
        return _attention_by_hand(t["q"], t["k"], t["v"], p["scale"], causal, t.get("attn_mask"),
                                  t.get("dropout_mask"), t["dy"])  # fmt: skip
    if kind == "cross_entropy" and "ignore_index" in p:
        loss, grad = _cross_entropy_ignore_by_hand(t["logits"], t["target"], p["ignore_index"])
        return {"loss": loss, "dlogits": grad}
    return None


def _compute64(case: dict, tensors: dict, bug: str | None = None) -> dict:
    """Outputs of one case, computed in float64 from its inputs and the manifest's description, not rounded."""
    kind, p = case["kind"], case["params"]
    t = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    out = _compute_new_kinds(case, t, bug)
    if out is not None:
        pass
    elif kind == "linear":
        y, backward = _lora_by_hand(t["x"], t["weight"], t.get("bias"), np.zeros((1, t["x"].shape[-1])),
                                    np.zeros((t["weight"].shape[0], 1)), 0.0, None)  # fmt: skip
        g = backward(t["dy"])
        out = {"y": y, "dx": g["dx"], "dweight": g["dweight"], "dbias": g["dbias"]}
    elif kind == "lora_linear":
        assert p["scaling"] == _scaling(p)
        y, backward = _lora_by_hand(t["x"], t["weight"], t.get("bias"), t["A"], t["B"], _scaling(p),
                                    t.get("dropout_mask"))  # fmt: skip
        out = {"y": y, **backward(t["dy"])}
    elif kind == "lora_merge":
        out = {"merged_weight": t["weight"] + _scaling(p) * t["B"] @ t["A"]}
    elif kind in ("dora_linear", "dora_linear_exact"):
        assert p["scaling"] == _scaling(p) and p["detach_norm"] == (kind == "dora_linear")
        y, backward = _dora_by_hand(t["x"], t["weight"], t.get("bias"), t["A"], t["B"], t["magnitude"],
                                    _scaling(p), t.get("dropout_mask"), exact=kind == "dora_linear_exact")  # fmt: skip
        out = {"y": y, **backward(t["dy"])}
    elif kind == "dora_merge":
        V = t["weight"] + _scaling(p) * t["B"] @ t["A"]
        out = {"merged_weight": (t["magnitude"] / np.linalg.norm(V, axis=1))[:, None] * V}
    elif kind == "dropout":
        out = {"y": t["x"] * t["mask"], "dx": t["dy"] * t["mask"]}
    elif kind in ("relu", "tanh", "sigmoid", "gelu", "gelu_tanh"):
        y, dydx = _activation_by_hand(kind, t["x"])
        out = {"y": y, "dx": t["dy"] * dydx}
    elif kind in ("mse_loss", "cross_entropy", "binary_cross_entropy_with_logits"):
        pred = t["pred"] if kind == "mse_loss" else t["logits"]
        loss, grad = _loss_by_hand(kind, pred, t["target"])
        out = {"loss": loss, "dpred" if kind == "mse_loss" else "dlogits": grad}
    elif kind == "mlp_lora_adam_step":
        out = _mlp_adam_by_hand(t, p)
    elif kind == "truncated_svd":
        out = _svd_by_hand(t["M"], p["rank"])
    elif kind == "als":
        product, losses = _als_by_hand(t["M"], t["mask"], t["right_init"], p["reg"], p["sweeps"])
        out = {"product": product, "losses": losses}
    else:
        raise AssertionError(f"unknown kind {kind}")
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items() if v is not None}


def _compute(case: dict, tensors: dict, bug: str | None = None) -> dict:
    """Outputs of one case in float64, rounded once to the dtype the manifest gives each output."""
    out = _compute64(case, tensors, bug)
    return {k: v.astype(case["outputs"][k]["dtype"]) for k, v in out.items()}


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


def test_wrong_dtype_or_kind_fails_with_the_reason_whatever_the_values(ref, candidate, tmp_path):
    """A reference is strict: the candidate's dtype must be the reference's, even where the values agree."""
    bad = _copy(candidate, tmp_path / "bad")
    # float64 outputs for a float32 case, holding exactly the reference's values: within any tolerance
    want = load_safetensors(ref / "lora_linear_r1_alpha1_f32.safetensors")
    save_safetensors(bad / "lora_linear_r1_alpha1_f32.safetensors", {
        "y": want["y"].astype(np.float64), "dx": want["dx"].astype(np.float64)})  # fmt: skip
    # a float32 gelu for a float64 case; a complex tanh; an integer linear dbias
    tensors = load_safetensors(bad / "gelu_f64.safetensors")
    save_safetensors(bad / "gelu_f64.safetensors", {"y": tensors["y"].astype(np.float32), "dx": tensors["dx"]})
    tensors = load_safetensors(bad / "linear_bias_f64.safetensors")
    tensors["dbias"] = np.rint(tensors["dbias"]).astype(np.int64)
    save_safetensors(bad / "linear_bias_f64.safetensors", tensors)
    report = check_vectors(ref, bad, kinds="linear,gelu,lora_linear")
    notes = {(r.case, r.tensor): r.note for r in report.failures}
    assert notes.pop(("lora_linear_r1_alpha1_f32", "y")) == "dtype float64, expected float32"
    assert notes.pop(("lora_linear_r1_alpha1_f32", "dx")) == "dtype float64, expected float32"
    assert notes.pop(("gelu_f64", "y")) == "dtype float32, expected float64"
    assert notes.pop(("linear_bias_f64", "dbias")) == "dtype int64, expected float64"
    assert set(notes.values()) == {"missing tensor"}  # the r1 case's dA, dB, ... were left out
    by_row = {(r.case, r.tensor): r for r in report.rows}
    assert by_row["lora_linear_r1_alpha1_f32", "y"].max_abs == 0.0  # same values: failed on the dtype alone
    assert by_row["gelu_f64", "dx"].ok
    assert main(["vectors", "check", str(ref), str(bad), "--cases", "gelu_f64"]) == 1


def test_complex_string_and_bool_tensors_fail_naming_the_dtype():
    want = np.array([1.0, -2.0])
    for got, note in [(want + 0j, "dtype complex128 (complex, not real), expected float64"),
                      (want + 1j, "dtype complex128 (complex, not real), expected float64"),
                      (np.array(["1.0", "-2.0"]), "dtype <U4 (not a real number type), expected float64"),
                      (want.astype(object), "dtype object (not a real number type), expected float64"),
                      (np.array([True, False]), "dtype bool, expected float64")]:  # fmt: skip
        c = compare(got, want, rtol=1.0, atol=1.0)
        assert not c.ok and c.note == note, (got, c)


@pytest.mark.parametrize(("where", "value", "shown"), [
    ("case", True, "True"), ("case", "1e-9", "'1e-9'"), ("case", -1.0, "-1.0"), ("case", None, "None"),
    ("table", True, "True"), ("table", [1e-9], "[1e-09]"),
])  # fmt: skip
def test_a_manifest_whose_tolerances_are_not_real_numbers_cannot_be_read(ref, candidate, tmp_path, capsys,
                                                                         where, value, shown):
    broken = _copy(ref, tmp_path / "broken")
    manifest = json.loads((broken / MANIFEST_NAME).read_text())
    if where == "case":
        manifest["cases"][3]["rtol"] = value
        match = rf"case 3 \('{manifest['cases'][3]['name']}'\): 'rtol' must be a real number, .* got {re.escape(shown)}"
    else:
        manifest["tolerances"]["float32"]["atol"] = value
        match = rf"'tolerances' 'float32' 'atol' must be a real number, .* got {re.escape(shown)}"
    (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
    _one_line_error(lambda: check_vectors(broken, candidate), match)
    assert main(["vectors", "check", str(broken), str(candidate)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("'rtol'" in err or "'atol'" in err) and "Traceback" not in err


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


def test_no_safetensors_package_needed(ref, candidate, monkeypatch, tmp_path):
    """The files are read and written with NumPy alone; the package would only be an accelerator."""
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    write_vectors(tmp_path / "v")
    assert (tmp_path / "v" / "lora_linear_r1_alpha1_f64.safetensors").read_bytes() == (
        ref / "lora_linear_r1_alpha1_f64.safetensors"
    ).read_bytes()
    assert check_vectors(ref, candidate).passed


# ---------------------------------------------------------------- the float32 expectations


def test_every_float32_expectation_is_the_float64_result_rounded_once(ref):
    """Each float32 output is the float32 number nearest the by-hand float64 result, whatever its shape.

    Allowed: half a float32 unit in the last place of the stored value, plus 1e-12 of the tensor's scale
    for the two float64 computations' own rounding. A float32 kernel's output (what the reference
    held before) is off by a unit or more in the last place on some entries of nearly every case.
    """
    checked = 0
    for case in read_manifest(ref)["cases"]:
        if case["dtype"] != "float32":
            continue
        tensors = load_safetensors(ref / case["file"])
        exact = _compute64(case, {k: tensors[k] for k in case["inputs"]})
        for name, spec in case["outputs"].items():
            stored = tensors[name]
            assert stored.dtype.name == spec["dtype"]
            if stored.dtype != np.float32:  # the losses: 0-d float64 by the manifest's reduction rule
                assert name == "loss" and stored.shape == ()
                continue
            half_ulp = 0.5 * np.spacing(np.abs(stored)).astype(np.float64)
            slack = 1e-12 * np.abs(exact[name]).max()
            error = np.abs(stored.astype(np.float64) - exact[name])
            assert np.all(error <= half_ulp + slack), (case["name"], name, (error / (half_ulp + slack)).max())
            checked += 1
    assert checked > 50


def test_the_manifest_says_how_the_expectations_are_computed(ref):
    text = read_manifest(ref)["conventions"]["expected_values"]
    assert "computed in float64" in text and "rounded once" in text and "exactly" in text
    comparison = read_manifest(ref)["conventions"]["comparison"]
    assert "dtype" in comparison and "'tolerances'" in comparison


# ---------------------------------------------------------------- the catalogue


def test_the_linear_and_lora_files_are_the_catalogue_cases(ref):
    """Every catalogue case is written in both dtypes with its shapes, scaling and mask, nothing else."""
    cases = {c["name"]: c for c in read_manifest(ref)["cases"]}
    written = {n for n, c in cases.items() if c["kind"] in ("linear", "lora_linear")}
    expected = {f"linear_{c.name}_{sfx}" for c in LINEAR_CASES for sfx in ("f32", "f64")}
    expected |= {f"lora_linear_{c.name}_{sfx}" for c in LORA_CASES for sfx in ("f32", "f64")}
    assert written == expected
    for spec in LORA_CASES:
        for sfx, dtype in (("f32", np.float32), ("f64", np.float64)):
            case = cases[f"lora_linear_{spec.name}_{sfx}"]
            t = load_safetensors(ref / case["file"])
            assert t["x"].shape == (*spec.batch, spec.in_features) and t["x"].dtype == dtype
            assert t["A"].shape == (spec.r, spec.in_features) and t["B"].shape == (spec.out_features, spec.r)
            assert ("bias" in t) == spec.bias
            # the scaling, from alpha and r by the documented formula
            r, alpha = case["params"]["r"], case["params"]["alpha"]
            assert case["params"]["scaling"] == (alpha / math.sqrt(r) if spec.use_rslora else alpha / r)
            if spec.dropout == "none":
                assert "dropout_mask" not in t
            else:  # inverted dropout with p = 1/2: every entry 0 or 2, both present
                mask = t["dropout_mask"]
                full = (*spec.batch, spec.in_features)
                assert mask.shape == (full if spec.dropout == "full" else (spec.in_features,))
                assert set(np.unique(mask)) == {0.0, 2.0}


# ---------------------------------------------------------------- the comparison rule


def test_the_rule_scales_the_absolute_floor_by_the_tensor():
    rtol, atol = TOLERANCES["float64"]["rtol"], TOLERANCES["float64"]["atol"]
    want = np.array([1000.0, 0.0, -3.0])
    floor = atol * 1000.0  # atol * max|want|, the allowance of the entry that is 0
    assert compare(want + np.array([0.0, 0.9 * floor, 0.0]), want, rtol=rtol, atol=atol).ok
    bad = compare(want + np.array([0.0, 1.1 * floor, 0.0]), want, rtol=rtol, atol=atol)
    assert not bad.ok and bad.worst_index == (1,) and bad.max_abs == pytest.approx(1.1 * floor)
    # the same data in other units gets the same verdict (powers of two scale exactly)
    for k in (2.0**-30, 2.0**30):
        assert compare(k * (want + np.array([0.0, 0.9 * floor, 0.0])), k * want, rtol=rtol, atol=atol).ok
        assert not compare(k * (want + np.array([0.0, 1.1 * floor, 0.0])), k * want, rtol=rtol, atol=atol).ok
    # relative part: 3 * rtol on the entry -3, plus the floor
    assert compare(want + np.array([0.0, 0.0, 3 * rtol]), want, rtol=rtol, atol=atol).ok
    assert not compare(want + np.array([0.0, 0.0, 3 * rtol + 2 * floor]), want, rtol=rtol, atol=atol).ok


def test_the_rule_integers_exact_nan_fails_shape_and_dtype_fail():
    ints = np.array([0, 2, 1])
    assert compare(ints, ints, rtol=1.0, atol=1.0).ok
    assert not compare(ints + np.array([0, 1, 0]), ints, rtol=1.0, atol=1.0).ok  # tolerances ignored
    nan = compare(np.array([1.0, np.nan]), np.array([1.0, 2.0]), rtol=1.0, atol=1.0)
    assert not nan.ok and nan.note == "non-finite values" and np.isnan(nan.max_abs)
    shape = compare(np.zeros(2), np.zeros(3), rtol=1.0, atol=1.0)
    assert not shape.ok and shape.note == "shape (2,), expected (3,)"
    f32 = compare(np.ones(2, np.float32), np.ones(2), rtol=1e-9, atol=0.0)
    assert not f32.ok and f32.note == "dtype float32, expected float64" and f32.worst_index is None
    assert compare(np.ones(2, ">f8"), np.ones(2), rtol=0.0, atol=0.0).ok  # byte order is not a dtype
    assert not compare(np.array(["a", "b"]), np.zeros(2), rtol=1.0, atol=1.0).ok


@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]))
def test_the_rule_passes_rounding_and_fails_a_tolerance_sized_error(data, dtype):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
    # magnitudes float32 holds as normal numbers: below ~1e-38 one rounding to float32 loses
    # relative precision (7.8e-282 becomes 0), which no tolerance scaled by the tensor can allow
    want = data.draw(float_arrays(np.float64, shape, bound=100.0, min_magnitude=1e-30))
    got = data.draw(as_layout(want.astype(dtype).astype(np.float64)))  # one rounding to dtype
    rtol, atol = TOLERANCES[np.dtype(dtype).name].values()
    assert compare(got, want, rtol=rtol, atol=atol).ok
    i = data.draw(st.integers(0, want.size - 1))
    worse = want.copy()
    worse.flat[i] += 2 * (atol * np.abs(want).max() + rtol * abs(want.flat[i])) + 1e-300
    assert not compare(data.draw(as_layout(worse)), want, rtol=rtol, atol=atol).ok


def test_old_import_paths_reexport_the_table_and_the_statistics():
    import lowrank.reference.compare as compare_module
    import lowrank.vectors

    assert lowrank.vectors.TOLERANCES is compare_module.TOLERANCES
    assert lowrank.vectors.error_stats is compare_module.error_stats
    diff, max_abs, max_rel = lowrank.vectors.error_stats(np.array([1.0, 2.5, 0.1]), np.array([1.0, 2.0, 0.0]))
    np.testing.assert_array_equal(diff, [0.0, 0.5, 0.1])
    assert max_abs == 0.5 and max_rel == 0.25  # over nonzero want only


# ---------------------------------------------------------------- partial implementations


@pytest.fixture(scope="module")
def partial(ref, tmp_path_factory):
    """A candidate that implements only the linear and LoRA layers, by hand in float64 (_lora_by_hand)."""
    folder = tmp_path_factory.mktemp("partial")
    for case in read_manifest(ref)["cases"]:
        if case["kind"] in ("linear", "lora_linear"):
            tensors = load_safetensors(ref / case["file"])
            save_safetensors(folder / case["file"], _compute(case, {k: tensors[k] for k in case["inputs"]}))
    return folder


def test_a_partial_candidate_passes_on_the_kinds_it_implements(ref, partial, capsys):
    names = {c["name"]: c["kind"] for c in read_manifest(ref)["cases"]}
    mine = sorted(n for n, k in names.items() if k in ("linear", "lora_linear"))
    assert len(mine) == 18

    assert main(["vectors", "check", str(ref), str(partial), "--kinds", "linear,lora_linear"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (f"PASSED: {out.count(' ok')} of {out.count(' ok')} tensors match "
                                    f"in 18 selected cases ({len(names) - 18} skipped)")  # fmt: skip
    assert "relu_f64" not in out and "missing" not in out

    assert main(["vectors", "check", str(ref), str(partial)]) == 1  # everything else is missing
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("FAILED") and f"in {len(names)} selected cases (0 skipped)" in out
    assert "missing file relu_f64.safetensors" in out

    report = check_vectors(ref, partial, kinds=["lora_linear", "linear"])
    assert report.passed and sorted(report.selected) == mine and len(report.skipped) == len(names) - 18
    assert {r.case for r in report.rows} == set(mine)


def test_cases_selects_by_glob_and_combines_with_kinds(ref, partial, capsys):
    report = check_vectors(ref, partial, cases="lora_linear_*_f32")
    assert report.passed and len(report.selected) == len(LORA_CASES)
    assert all(n.startswith("lora_linear_") and n.endswith("_f32") for n in report.selected)
    report = check_vectors(ref, partial, kinds="linear", cases="*_f64")
    assert report.selected == ("linear_bias_f64", "linear_nobias_f64")
    assert check_vectors(ref, partial, cases="linear_[bn]*_f3?").selected == ("linear_bias_f32", "linear_nobias_f32")
    assert not check_vectors(ref, partial, cases="*_f32").passed  # relu_f32 & co are missing
    assert main(["vectors", "check", str(ref), str(partial), "--cases", "*LINEAR*"]) == 2  # case-sensitive
    assert "no case of the reference matches the selection" in capsys.readouterr().err


def test_a_skipped_case_is_not_read_on_either_side(ref, partial, tmp_path):
    broken = _copy(ref, tmp_path / "broken")
    (broken / "als_f64.safetensors").write_bytes(b"garbage")  # would fail its sha256
    cand = _copy(partial, tmp_path / "cand")
    (cand / "relu_f64.safetensors").write_bytes(b"\x00" * 3)  # would be unreadable
    assert check_vectors(broken, cand, kinds="linear,lora_linear").passed
    _one_line_error(lambda: check_vectors(broken, cand, kinds="als"), "does not match its sha256")


def test_an_unknown_kind_is_refused_listing_the_kinds_there_are(ref, partial, capsys):
    _one_line_error(lambda: check_vectors(ref, partial, kinds="linear,lora"),
                    r"kinds: no case of kind 'lora' in the reference; its kinds are linear, lora_linear, ")
    assert main(["vectors", "check", str(ref), str(partial), "--kinds", "lora,dora", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "'lora', 'dora'" in captured.err and "mlp_lora_adam_step" in captured.err
    _one_line_error(lambda: check_vectors(ref, partial, kinds="linear,,relu"), "no empty one")
    with pytest.raises(TypeError, match="kinds must be"):
        check_vectors(ref, partial, kinds=[1, 2])
    with pytest.raises(TypeError, match="cases must be a glob pattern string"):
        check_vectors(ref, partial, cases=["linear_*"])


def test_json_prints_one_object_and_nothing_else(ref, partial, capsys):
    assert main(["vectors", "check", str(ref), str(partial), "--kinds", "linear", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON document
    assert report["passed"] is True and report["n_failed"] == 0
    assert report["selection"] == {"kinds": ["linear"], "cases": None}
    assert len(report["selected"]) == 4
    assert len(report["rows"]) == report["n_tensors"] == 2 * 4 + 2 * 3  # dbias in the bias cases only
    assert report["summary"].startswith("PASSED")

    assert main(["vectors", "check", str(ref), str(partial), "--cases", "relu_*", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["selected"] == ["relu_f32", "relu_f64"]
    assert report["rows"][0] == {"case": "relu_f32", "tensor": "*", "max_abs": None, "max_rel": None,
                                 "ok": False, "note": "missing file relu_f32.safetensors"}  # fmt: skip


# ---------------------------------------------------------------- the command line


def test_vectors_check_exit_codes(ref, candidate, tmp_path, capsys):
    assert main(["vectors", "check", str(ref), str(candidate)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("PASSED")
    bad = _copy(candidate, tmp_path / "bad")
    (bad / "relu_f64.safetensors").unlink()
    assert main(["vectors", "check", str(ref), str(bad)]) == 1
    assert "FAILED" in capsys.readouterr().out
    for broken in ([str(tmp_path / "nowhere"), str(candidate)], [str(ref), str(tmp_path / "nowhere")]):
        assert main(["vectors", "check", *broken]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lowrank: error: vectors check could not run:") and err.count("\n") == 1
        assert "Traceback" not in err


def test_a_failed_write_leaves_the_previous_folder_whole(tmp_path, monkeypatch):
    """The folder is one unit: a write that fails half-way (here, at the manifest)
    leaves the previous run's files and manifest exactly as they were."""
    import lowrank.reference.vectors as vectors

    folder = tmp_path / "ref"
    write_vectors(folder, random_state=0)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(path, obj):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(vectors, "save_json", crash)
    with pytest.raises(OSError, match="simulated"):
        write_vectors(folder, random_state=1)  # other inputs: every case file would change
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ref"]  # no temporary folder left behind


# ---------------------------------------------------------------- DoRA


def test_dora_cases_cover_the_issue_in_both_gradient_modes(ref):
    manifest = read_manifest(ref)
    cases = {c["name"]: c for c in manifest["cases"]}
    for spec in DORA_CASES:
        for sfx, dtype in (("f32", "float32"), ("f64", "float64")):
            detached, exact = cases[f"dora_linear_{spec.name}_{sfx}"], cases[f"dora_linear_exact_{spec.name}_{sfx}"]
            assert (detached["kind"], exact["kind"]) == ("dora_linear", "dora_linear_exact")
            assert detached["params"]["detach_norm"] is True and exact["params"]["detach_norm"] is False
            assert detached["dtype"] == exact["dtype"] == dtype
            assert detached["inputs"] == exact["inputs"]
            a, b = load_safetensors(ref / detached["file"]), load_safetensors(ref / exact["file"])
            for name in detached["inputs"]:  # both modes of a case share their inputs
                np.testing.assert_array_equal(a[name], b[name])
            assert a["magnitude"].shape == (spec.out_features,)
            assert set(detached["outputs"]) == {"y", "dx", "dA", "dB", "dmagnitude", "dweight"} | (
                {"dbias"} if spec.bias else set()
            )
    dora = [c for c in manifest["cases"] if c["kind"] == "dora_linear"]
    assert any(c["params"]["use_rslora"] for c in dora) and any("dropout_mask" in c["inputs"] for c in dora)
    assert any(len(c["inputs"]["x"]["shape"]) >= 3 for c in dora)
    assert any("bias" in c["inputs"] for c in dora) and any("bias" not in c["inputs"] for c in dora)
    assert {c["dtype"] for c in manifest["cases"] if c["kind"] == "dora_merge"} == {"float32", "float64"}
    text = manifest["conventions"]["dora"]
    assert "'dora_linear'" in text and "'dora_linear_exact'" in text and "constant" in text


def test_the_dora_modes_agree_on_dx_dmagnitude_dbias_and_differ_on_the_factors(ref):
    """Where the norm does not enter (x, m, bias) the modes agree; on A, B and weight they differ by a projection."""
    for spec in DORA_CASES:
        a = load_safetensors(ref / f"dora_linear_{spec.name}_f64.safetensors")
        b = load_safetensors(ref / f"dora_linear_exact_{spec.name}_f64.safetensors")
        for name in ("y", "dx", "dmagnitude", *(("dbias",) if spec.bias else ())):
            np.testing.assert_array_equal(a[name], b[name])
        s = spec.scaling
        V = a["weight"] + s * a["B"] @ a["A"]  # (out, in)
        diff = b["dweight"] - a["dweight"]  # exact - detached: a multiple of each row of V
        coef = np.sum(diff * V, axis=1) / np.sum(V * V, axis=1)
        np.testing.assert_allclose(diff, coef[:, None] * V, rtol=1e-9, atol=1e-12 * np.abs(diff).max())
        assert np.abs(diff).max() > 1e-6 * np.abs(a["dweight"]).max()  # and the modes do differ
        np.testing.assert_allclose(b["dA"] - a["dA"], s * a["B"].T @ diff, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b["dB"] - a["dB"], s * diff @ a["A"].T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("case", "tensor"), [
    ("dora_linear_exact_r2_alpha8_dropout_f64", "dA"),
    ("dora_linear_r4_alpha16_rslora_f32", "dmagnitude"),
    ("dora_merge_f64", "merged_weight"),
])  # fmt: skip
def test_a_dora_candidate_off_by_a_tolerance_fails(ref, candidate, tmp_path, case, tensor):
    bad = _copy(candidate, tmp_path / "bad")
    t = load_safetensors(bad / f"{case}.safetensors")
    t[tensor] = (t[tensor] * (1 + 1e-3)).astype(t[tensor].dtype)
    save_safetensors(bad / f"{case}.safetensors", t)
    report = check_vectors(ref, bad, kinds="dora_linear,dora_linear_exact,dora_merge")
    assert [(r.case, r.tensor) for r in report.failures] == [(case, tensor)]


def test_a_candidate_with_the_other_gradient_mode_fails_on_the_factors_only(ref, candidate, tmp_path):
    """PEFT's detached gradient handed in as the exact one fails on dA, dB and dweight, nowhere else."""
    bad = _copy(candidate, tmp_path / "swapped")
    for spec in DORA_CASES:
        for sfx in ("f32", "f64"):
            shutil.copy(candidate / f"dora_linear_{spec.name}_{sfx}.safetensors",
                        bad / f"dora_linear_exact_{spec.name}_{sfx}.safetensors")  # fmt: skip
    report = check_vectors(ref, bad, kinds="dora_linear_exact")
    assert {r.tensor for r in report.failures} == {"dA", "dB", "dweight"}
    every_case = {f"dora_linear_exact_{s.name}_{x}" for s in DORA_CASES for x in ("f32", "f64")}
    assert {r.case for r in report.failures} == every_case


# ---------------------------------------------------------------- half precision


def _round_half(x, fmt):
    """float64/float32 values -> the nearest value of fmt (ties to even), as float64, written out here.

    bfloat16: 8 significant bits by frexp/rint, subnormals on the 2**-133 grid; float16: NumPy's own cast.
    """
    x = np.asarray(x, np.float64)
    if fmt == "float16":
        return x.astype(np.float16).astype(np.float64)
    mantissa, exponent = np.frexp(x)
    normal = np.ldexp(np.rint(mantissa * 256.0), exponent - 8)
    return np.where(np.abs(x) < 2.0**-126, np.rint(x * 2.0**133) * 2.0**-133, normal)


def _half_candidate(case, t, *, accumulate_in_format=False, merge_unmerge=False, norm_of_w=False):
    """A 16-bit implementation as PyTorch runs one: inputs in the format, float32 sums, each result rounded."""
    fmt, p = case["dtype"], case["params"]

    def R(v):
        return _round_half(v, fmt).astype(np.float32)

    g = {k: v.astype(np.float32) for k, v in t.items()}

    def linear(x, W, b):
        if accumulate_in_format:  # the running sum rounded to the format after every term
            acc = np.zeros((*x.shape[:-1], W.shape[0]), np.float32)
            for j in range(W.shape[1]):
                acc = R(acc + R(x[..., j : j + 1] * W[:, j]))
            return acc if b is None else R(acc + b)
        return R(x @ W.T + (0 if b is None else b))  # float32 accumulation, one rounding

    if case["kind"] == "linear":
        return {"y": linear(g["x"], g["weight"], g.get("bias"))}
    s = np.float32(p["scaling"])
    if case["kind"] == "dora_linear":  # PEFT's DoraLinearLayer in a 16-bit model, eval mode, operation by operation
        base = linear(g["x"], g["weight"], g.get("bias"))  # (..., out)
        V = g["weight"] if norm_of_w else R(g["weight"] + R(s * R(g["B"] @ g["A"])))  # (out, in)
        n = R(np.sqrt(np.sum(V * V, axis=1, dtype=np.float32)))  # (out,)
        c = R(g["magnitude"] / n)  # (out,)
        z = base if "bias" not in g else R(base - g["bias"])  # x W^T
        lora = R(R(g["x"] @ g["A"].T) @ g["B"].T)  # (..., out)
        return {"y": R(base + R(R(R(c - 1) * z) + R(R(c * lora) * s)))}
    delta = R(s * R(g["B"] @ g["A"]))  # (out, in)
    if case["kind"] == "lora_merge":
        return {"merged_weight": R(g["weight"] + delta)}
    W = R(R(g["weight"] + delta) - delta) if merge_unmerge else g["weight"]  # a merge and unmerge in the format
    v = R(s * R(R(g["x"] @ g["A"].T) @ g["B"].T))
    return {"y": R(linear(g["x"], W, g.get("bias")) + v), "y_base": linear(g["x"], W, g.get("bias"))}


@pytest.fixture(scope="module")
def half_ref(tmp_path_factory):
    folder = tmp_path_factory.mktemp("half_ref")
    write_vectors(folder, dtypes="bfloat16,float16")
    return folder


def _half_cases(ref):
    return [c for c in read_manifest(ref)["cases"] if c["dtype"] in ("bfloat16", "float16")]


def _write_half_candidate(ref, folder, **bug):
    folder.mkdir()
    for case in _half_cases(ref):
        tensors = load_safetensors(ref / case["file"])
        out = _half_candidate(case, {k: tensors[k] for k in case["inputs"]}, **bug)
        fmt = case["dtype"]
        save_safetensors(folder / case["file"], {k: v.astype(np.float32 if fmt == "bfloat16" else np.float16)
                                                 for k, v in out.items()}, dtypes=dict.fromkeys(out, fmt))  # fmt: skip
    return folder


def test_half_cases_store_their_format_and_expect_the_float64_result_rounded_once(half_ref, ref):
    cases = _half_cases(half_ref)
    assert {c["kind"] for c in cases} == {"linear", "lora_linear", "lora_merge", "dora_linear"}
    assert {c["dtype"] for c in cases} == {"bfloat16", "float16"}
    for case in cases:
        fmt = case["dtype"]
        header = read_safetensors_header(half_ref / case["file"])
        stored = {"bfloat16": "BF16", "float16": "F16"}[fmt]
        for name in [*case["inputs"], *case["outputs"]]:
            assert header.tensors[name].dtype == stored and case["inputs" if name in case["inputs"] else
                                                                "outputs"][name]["dtype"] == fmt  # fmt: skip
        t = {k: v.astype(np.float64) for k, v in load_safetensors(half_ref / case["file"]).items()}
        x, W, b, A, B = (t.get(k) for k in ("x", "weight", "bias", "A", "B"))
        if case["kind"] == "lora_merge":
            exact = {"merged_weight": W + case["params"]["scaling"] * B @ A}
        elif case["kind"] == "dora_linear":
            s = case["params"]["scaling"]
            c = t["magnitude"] / np.linalg.norm(W + s * B @ A, axis=1)  # (out,)
            exact = {"y": x @ W.T + (0.0 if b is None else b) + (c - 1) * (x @ W.T) + c * (s * (x @ A.T) @ B.T)}
        else:
            base = x @ W.T + (0.0 if b is None else b)
            lora = {} if case["kind"] == "linear" else {"y_base": base}
            exact = {"y": base if case["kind"] == "linear" else base + case["params"]["scaling"] * (x @ A.T) @ B.T,
                     **lora}  # fmt: skip
        assert set(case["elementwise_tolerance"]) == set(case["outputs"])
        for name in case["outputs"]:
            np.testing.assert_array_equal(t[name].astype(np.float64), _round_half(exact[name], fmt))
            tol = t[case["elementwise_tolerance"][name]]
            assert tol.dtype == np.float64 and tol.shape == t[name].shape
            assert np.all(tol >= np.abs(t[name].astype(np.float64) - exact[name]))  # the rounding is inside
            # and it is the documented bound: to first order in u (the format's) and v = 2**-24 (float32's),
            # (4u + (k+2)v)(|x||W|^T + |b|) + (7u + (k+r+3)v)|s|(|x||A|^T)|B|^T for y, within 1.5x
            # (the rounding of the stored value and second-order terms); 8u(|W| + |s||B||A|) for the merge
            u, v, s = (2.0**-8 if fmt == "bfloat16" else 2.0**-11), 2.0**-24, abs(case["params"].get("scaling", 0))
            if case["kind"] == "dora_linear":  # no first-order formula written out: the crosscheck measures it
                continue
            if case["kind"] == "lora_merge":
                first = 8 * u * (np.abs(W) + s * np.abs(B) @ np.abs(A))
            else:
                k = W.shape[1]
                first = (4 * u + (k + 2) * v) * (np.abs(x) @ np.abs(W).T + (0.0 if b is None else np.abs(b)))
                if name == "y" and case["kind"] == "lora_linear":
                    r = A.shape[0]
                    first = first + (7 * u + (k + r + 3) * v) * s * (np.abs(x) @ np.abs(A).T) @ np.abs(B).T
            assert np.all(tol <= 1.5 * first), (case["name"], name, float((tol / first).max()))
    # the float cases are the same bytes with or without half-precision cases
    for name in ("lora_linear_r1_alpha1_f32.safetensors", "dora_merge_f64.safetensors", "als_f64.safetensors"):
        assert (half_ref / name).read_bytes() == (ref / name).read_bytes()
    assert "half_precision" in read_manifest(half_ref)["conventions"]


def test_a_correct_16_bit_candidate_passes_the_half_cases(half_ref, tmp_path):
    report = check_vectors(half_ref, _write_half_candidate(half_ref, tmp_path / "good"), cases="*16")
    assert report.passed, report.format()
    assert len(report.selected) == 28


def test_a_dora_candidate_whose_norm_leaves_out_the_update_is_caught(half_ref, tmp_path):
    report = check_vectors(half_ref, _write_half_candidate(half_ref, tmp_path / "norm", norm_of_w=True),
                           kinds="dora_linear", cases="*16")  # fmt: skip
    assert {r.case for r in report.failures} == {c["name"] for c in _half_cases(half_ref) if c["kind"] == "dora_linear"}


def test_a_candidate_accumulating_in_the_format_is_caught(half_ref, tmp_path):
    report = check_vectors(half_ref, _write_half_candidate(half_ref, tmp_path / "acc", accumulate_in_format=True),
                           cases="*16")  # fmt: skip
    failed = {(r.case, r.tensor) for r in report.failures}
    assert {("linear_positive_k512_bf16", "y"), ("linear_positive_k512_f16", "y")} <= failed
    assert all("past their bound" in r.note for r in report.failures)


def test_a_candidate_whose_base_weight_drifted_through_merge_and_unmerge_is_caught(half_ref, tmp_path):
    report = check_vectors(half_ref, _write_half_candidate(half_ref, tmp_path / "drift", merge_unmerge=True),
                           cases="*16")  # fmt: skip
    failed = {(r.case, r.tensor) for r in report.failures}
    assert {(f"lora_linear_r2_alpha64_large_update_{sfx}", "y_base") for sfx in ("bf16", "f16")} <= failed


def test_a_half_candidate_that_never_rounds_to_the_format_fails_whatever_its_error(half_ref, tmp_path):
    case = "lora_merge_bf16"
    folder = tmp_path / "unrounded"
    folder.mkdir()
    t = load_safetensors(half_ref / f"{case}.safetensors")
    exact = t["weight"].astype(np.float64) + 2.0 * t["B"].astype(np.float64) @ t["A"].astype(np.float64)
    save_safetensors(folder / f"{case}.safetensors", {"merged_weight": exact.astype(np.float32)})  # F32, unrounded
    report = check_vectors(half_ref, folder, cases=case)
    assert not report.passed and "not representable in bfloat16" in report.failures[0].note
    save_safetensors(folder / f"{case}.safetensors", {"merged_weight": exact.astype(np.float16)})  # F16 for BF16
    assert "dtype float16, expected float32" in check_vectors(half_ref, folder, cases=case).failures[0].note


def test_vectors_write_dtypes_on_the_command_line(tmp_path, capsys):
    assert main(["vectors", "write", str(tmp_path / "v"), "--dtypes", "float16"]) == 0
    names = {c["name"] for c in read_manifest(tmp_path / "v")["cases"]}
    assert "lora_merge_f16" in names and "lora_merge_bf16" not in names
    assert main(["vectors", "write", str(tmp_path / "w"), "--dtypes", "float8"]) == 2
    err = capsys.readouterr().err
    assert "dtypes must name formats among bfloat16, float16, got 'float8'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_a_manifest_with_a_bad_elementwise_tolerance_cannot_be_read(half_ref, tmp_path):
    for change, words in [
        (lambda c: c.update(elementwise_tolerance={"nope": "y.tolerance"}), "'elementwise_tolerance' must map outputs"),
        (lambda c: c.update(elementwise_tolerance=["y"]), "'elementwise_tolerance' must map outputs"),
        (lambda c: c.update(dtype="float32"), "in a case of dtype bfloat16 or float16"),
    ]:
        folder = _copy(half_ref, tmp_path / f"m{len(list(tmp_path.iterdir()))}")
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        change(next(c for c in manifest["cases"] if c["name"] == "linear_bias_bf16"))
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match=re.escape(words)):
            read_manifest(folder)
    folder = _copy(half_ref, tmp_path / "renamed")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    next(c for c in manifest["cases"] if c["name"] == "linear_bias_bf16")["elementwise_tolerance"]["y"] = "y.bound"
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lacks its output 'y' or its tolerance"):
        check_vectors(folder, folder, cases="linear_bias_bf16")


# ---------------------------------------------------------------- Conv1D, Embedding, MergedLinear, attention family

_NEW_KINDS = ("lora_conv1d", "lora_embedding", "lora_merged_linear", "layer_norm", "softmax",
              "scaled_dot_product_attention")  # fmt: skip


def test_the_variant_and_attention_kinds_are_written_with_their_conventions(ref):
    manifest = read_manifest(ref)
    by_kind: dict = {}
    for c in manifest["cases"]:
        by_kind.setdefault(c["kind"], []).append(c)
    for kind in _NEW_KINDS:
        assert {c["dtype"] for c in by_kind[kind]} == {"float32", "float64"}, kind
        assert manifest["conventions"][kind]
    conv = by_kind["lora_conv1d"]
    for c in conv:  # the Conv1D layout: weight (in, out), and its gradient in that layout
        n_in, n_out = c["params"]["in_features"], c["params"]["out_features"]
        assert c["inputs"]["weight"]["shape"] == c["outputs"]["dweight"]["shape"] == [n_in, n_out]
    assert any(c["params"]["in_features"] == c["params"]["out_features"] for c in conv)  # a transpose would fit
    assert {c["name"] for c in conv} == {f"lora_conv1d_{c.name}_{sfx}" for c in CONV1D_CASES for sfx in ("f32", "f64")}
    assert any("dropout_mask" in c["inputs"] for c in conv) and any("bias" not in c["inputs"] for c in conv)
    for c in by_kind["lora_embedding"]:
        idx = load_safetensors(ref / c["file"])["idx"]
        assert idx.dtype == np.int64 and len(np.unique(idx)) < idx.size  # integer ids, with repeats
        assert c["inputs"]["A"]["shape"] == [c["params"]["r"], c["params"]["num_embeddings"]]
        assert c["inputs"]["B"]["shape"] == [c["params"]["embedding_dim"], c["params"]["r"]]
    assert all(c["params"]["enable_lora"] == [True, False, True] for c in by_kind["lora_merged_linear"])
    sdpa = {c["name"][len("scaled_dot_product_attention_"):]: c for c in by_kind["scaled_dot_product_attention"]}
    assert sdpa["causal_f64"]["params"]["is_causal"] and "attn_mask" not in sdpa["causal_f64"]["inputs"]
    mask = load_safetensors(ref / sdpa["bool_mask_f32"]["file"])["attn_mask"]
    assert mask.dtype == bool and not mask.all() and mask.any(axis=-1).all()
    dmask = load_safetensors(ref / sdpa["dropout_causal_f32"]["file"])["dropout_mask"]
    assert set(np.unique(dmask)) == {0.0, 2.0}
    ignore = [c for c in by_kind["cross_entropy"] if "ignore_index" in c["params"]]
    assert {c["dtype"] for c in ignore} == {"float32", "float64"}
    assert manifest["conventions"]["cross_entropy_ignore_index"]
    for c in ignore:
        target = load_safetensors(ref / c["file"])["target"]
        assert target.dtype == np.int64 and (target == c["params"]["ignore_index"]).any()
        assert (target != c["params"]["ignore_index"]).any()


def _bugged_candidate(ref, folder, kind, bug):
    """The independent candidate for one kind, with one bug (None: correct)."""
    folder.mkdir()
    for case in read_manifest(ref)["cases"]:
        if case["kind"] == kind:
            tensors = load_safetensors(ref / case["file"])
            save_safetensors(folder / case["file"], _compute(case, {k: tensors[k] for k in case["inputs"]}, bug))
    return folder


@pytest.mark.parametrize(("kind", "bug", "failing", "wrong"), [
    ("lora_conv1d", "conv1d_transposed", "lora_conv1d_*square*", {"y", "dx"}),
    ("lora_embedding", "embedding_not_summed", "lora_embedding_*", {"dA", "dweight"}),
    ("scaled_dot_product_attention", "not_causal", "scaled_dot_product_attention_*causal*",
     {"y", "dq", "dk", "dv"}),
])  # fmt: skip
def test_a_wrong_variant_or_attention_candidate_fails_and_a_right_one_passes(ref, tmp_path, capsys, kind, bug,
                                                                             failing, wrong):
    right = _bugged_candidate(ref, tmp_path / "right", kind, None)
    assert main(["vectors", "check", str(ref), str(right), "--kinds", kind]) == 0
    wrong_dir = _bugged_candidate(ref, tmp_path / "wrong", kind, bug)
    capsys.readouterr()
    assert main(["vectors", "check", str(ref), str(wrong_dir), "--kinds", kind]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("FAILED")
    report = check_vectors(ref, wrong_dir, kinds=kind)
    failed = report.failures
    assert failed and all(fnmatch.fnmatchcase(r.case, failing) for r in failed)
    assert {r.tensor for r in failed} <= wrong and {r.tensor for r in failed} & wrong
    assert {r.case for r in failed} == {c for c in report.selected if fnmatch.fnmatchcase(c, failing)}
