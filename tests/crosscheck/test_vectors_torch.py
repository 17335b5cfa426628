"""The Conv1D, Embedding and attention-family reference vectors against torch autograd, computed in float64."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lowrank.io import load_safetensors, save_safetensors  # noqa: E402
from lowrank.reference.vectors import check_vectors, read_manifest, write_vectors  # noqa: E402

TF = torch.nn.functional
KINDS = ("lora_conv1d", "lora_embedding", "lora_merged_linear", "layer_norm", "softmax",
         "scaled_dot_product_attention", "cross_entropy")  # fmt: skip


def _leaf(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64)).requires_grad_()


def _torch_case(case, t):
    """The case's outputs by torch in float64 (inputs widened), as float64 NumPy arrays."""
    kind, p = case["kind"], case["params"]
    if kind == "lora_conv1d":
        x, w, A, B = (_leaf(t[k]) for k in ("x", "weight", "A", "B"))
        b = _leaf(t["bias"]) if "bias" in t else None
        xm = x if "dropout_mask" not in t else x * torch.from_numpy(t["dropout_mask"].astype(np.float64))
        y = x @ w + p["scaling"] * (xm @ A.T) @ B.T + (0.0 if b is None else b)  # transformers' Conv1D: x @ w
        y.backward(torch.from_numpy(t["dy"].astype(np.float64)))
        out = {"y": y, "dx": x.grad, "dA": A.grad, "dB": B.grad, "dweight": w.grad}
        return out if b is None else {**out, "dbias": b.grad}
    if kind == "lora_embedding":
        idx = torch.from_numpy(t["idx"])
        w, A, B = (_leaf(t[k]) for k in ("weight", "A", "B"))
        y = TF.embedding(idx, w) + p["scaling"] * TF.embedding(idx, A.T) @ B.T  # PEFT's _embed, then @ B.T
        y.backward(torch.from_numpy(t["dy"].astype(np.float64)))
        return {"y": y, "dA": A.grad, "dB": B.grad, "dweight": w.grad}
    if kind == "lora_merged_linear":  # loralib's merge_AB: the enabled blocks B_j @ A_j, zeros elsewhere
        x, w, b, A, B = (_leaf(t[k]) for k in ("x", "weight", "bias", "A", "B"))
        enable, r = p["enable_lora"], p["r"]
        d = w.shape[0] // len(enable)
        blocks, j = [], 0
        for on in enable:
            blocks.append(B[j * d:(j + 1) * d] @ A[j * r:(j + 1) * r] if on else torch.zeros(d, w.shape[1],
                                                                                       dtype=torch.float64))
            j += on
        xm = x if "dropout_mask" not in t else x * torch.from_numpy(t["dropout_mask"].astype(np.float64))
        y = TF.linear(x, w, b) + p["scaling"] * xm @ torch.cat(blocks).T
        y.backward(torch.from_numpy(t["dy"].astype(np.float64)))
        return {"y": y, "dx": x.grad, "dA": A.grad, "dB": B.grad, "dweight": w.grad, "dbias": b.grad}
    if kind == "layer_norm":
        x, w, b = (_leaf(t[k]) for k in ("x", "weight", "bias"))
        y = TF.layer_norm(x, (x.shape[-1],), w, b, eps=p["eps"])
        y.backward(torch.from_numpy(t["dy"].astype(np.float64)))
        return {"y": y, "dx": x.grad, "dweight": w.grad, "dbias": b.grad}
    if kind == "softmax":
        x = _leaf(t["x"])
        y = torch.softmax(x, dim=p["axis"])
        y.backward(torch.from_numpy(t["dy"].astype(np.float64)))
        return {"y": y, "dx": x.grad}
    if kind == "scaled_dot_product_attention":
        q, k, v = (_leaf(t[n]) for n in ("q", "k", "v"))
        if "dropout_mask" in t:  # torch draws its own dropout: the explicit mask is applied by hand
            scores = p["scale"] * q @ k.transpose(-1, -2)
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
            attn = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            y = (attn * torch.from_numpy(t["dropout_mask"].astype(np.float64))) @ v
        else:
            mask = torch.from_numpy(t["attn_mask"]) if "attn_mask" in t else None
            y = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=p["is_causal"], scale=p["scale"])
        y.backward(torch.from_numpy(t["dy"].astype(np.float64)))
        return {"y": y, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if kind == "cross_entropy":
        z = _leaf(t["logits"])
        loss = TF.cross_entropy(z.reshape(-1, z.shape[-1]), torch.from_numpy(t["target"]).reshape(-1),
                                ignore_index=p.get("ignore_index", -100))  # fmt: skip
        loss.backward()
        return {"loss": loss, "dlogits": z.grad}
    raise AssertionError(kind)


def test_torch_float64_candidate_passes_the_variant_and_attention_vectors(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "torch"
    write_vectors(ref)
    out.mkdir()
    cases = [c for c in read_manifest(ref)["cases"] if c["kind"] in KINDS]
    for case in cases:
        t = load_safetensors(ref / case["file"])
        result = _torch_case(case, {k: t[k] for k in case["inputs"]})
        save_safetensors(out / case["file"], {k: v.detach().numpy().astype(case["outputs"][k]["dtype"])
                                              for k, v in result.items()})  # fmt: skip
    report = check_vectors(ref, out, kinds=KINDS)
    assert report.passed, report.format()
    assert {c["kind"] for c in cases} == set(KINDS) and len(report.selected) == len(cases)
