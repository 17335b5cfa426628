"""F.lora_linear and its backward against torch autograd, in float64; the PyTorch workflow of docs/verifying.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

torch = pytest.importorskip("torch")

from strategies import lora_problems  # noqa: E402

from lowrank.nn import functional as F  # noqa: E402


def torch_lora_linear(x, weight, bias, A, B, scaling, dropout_mask=None):
    """A LoRA layer written the PyTorch/PEFT way: y = W x + b + scaling * B A drop(x)."""
    xm = x if dropout_mask is None else x * dropout_mask
    y = torch.nn.functional.linear(x, weight, bias)
    return y + scaling * torch.nn.functional.linear(torch.nn.functional.linear(xm, A), B)


@given(lora_problems(dtype=np.float64, views=True))  # strided and negative-stride inputs too
def test_lora_linear_and_backward_match_torch_autograd(p):
    y, cache = F.lora_linear(p["x"], p["weight"], p["bias"], p["A"], p["B"], p["scaling"],
                             dropout_mask=p["dropout_mask"])
    g = F.lora_linear_backward(p["dy"], cache, base_trainable=True)

    names = ["x", "weight", "bias", "A", "B"]
    # torch refuses negative strides: it gets copies, lowrank the views themselves
    t = {k: torch.tensor(p[k].copy(), requires_grad=True) for k in names if p[k] is not None}
    mask = None if p["dropout_mask"] is None else torch.tensor(p["dropout_mask"])
    ty = torch_lora_linear(t["x"], t["weight"], t.get("bias"), t["A"], t["B"], p["scaling"], mask)
    ty.backward(torch.tensor(p["dy"].copy()))

    tol = {"rtol": 1e-12, "atol": 1e-12}
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    for name, ours in (("x", g.x), ("weight", g.weight), ("bias", g.bias), ("A", g.A), ("B", g.B)):
        if name in t:
            np.testing.assert_allclose(ours, t[name].grad.numpy(), **tol, err_msg=name)
        else:
            assert ours is None


def test_the_harness_passes_a_torch_candidate():
    from lowrank.reference.harness import assert_lora_linear_matches

    def forward(x, weight, bias, A, B, scaling, dropout_mask=None):
        t = {k: None if v is None else torch.tensor(v, requires_grad=True)
             for k, v in (("x", x), ("weight", weight), ("bias", bias), ("A", A), ("B", B))}
        mask = None if dropout_mask is None else torch.tensor(dropout_mask)
        y = torch_lora_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], scaling, mask)
        return y.detach().numpy(), (y, t)

    def backward(dy, cache, base_trainable=True):
        y, t = cache
        y.backward(torch.tensor(dy))
        return {k: None if v is None else v.grad for k, v in t.items()}

    assert_lora_linear_matches(forward, backward, max_examples=25)


def test_the_pytorch_workflow_of_verifying_md(tmp_path):
    """docs/verifying.md, steps 1-3, for every lora_linear case: write, compute with torch, check."""
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    from lowrank.reference.vectors import check_vectors, read_manifest, write_vectors

    ref, out = tmp_path / "ref", tmp_path / "mine"
    write_vectors(ref)
    out.mkdir()
    manifest = read_manifest(ref)
    cases = [c for c in manifest["cases"] if c["kind"] in ("lora_linear", "linear")]
    for case in cases:
        t = load_file(ref / case["file"])
        p = case["params"]
        x = t["x"].requires_grad_()
        weight, A, B = (t.get(k) for k in ("weight", "A", "B"))
        weight.requires_grad_()
        bias = t.get("bias")
        if bias is not None:
            bias.requires_grad_()
        if case["kind"] == "linear":
            y = torch.nn.functional.linear(x, weight, bias)
        else:
            A.requires_grad_()
            B.requires_grad_()
            scaling = p["alpha"] / (p["r"] ** 0.5 if p["use_rslora"] else p["r"])
            y = torch_lora_linear(x, weight, bias, A, B, scaling, t.get("dropout_mask"))
        y.backward(t["dy"])
        result = {"y": y.detach(), "dx": x.grad, "dweight": weight.grad}
        if bias is not None:
            result["dbias"] = bias.grad
        if case["kind"] == "lora_linear":
            result.update(dA=A.grad, dB=B.grad)
        save_file({k: v.contiguous() for k, v in result.items()}, out / case["file"])

    report = check_vectors(ref, out)
    rows = [r for r in report.rows if r.case in {c["name"] for c in cases}]
    assert rows and all(r.ok for r in rows), report.format()
    assert sum(len(c["outputs"]) for c in cases) == len(rows)
    # the other cases were not written: each is a failed "missing file" row
    assert {r.note for r in report.failures} == {f"missing file {r.case}.safetensors" for r in report.failures}
