"""DoRA adapters against PEFT: files PEFT writes load in lowrank, files lowrank writes load in PEFT, merges agree.

The torch models are small (an Embedding and Linear layers, and a tiny
transformers GPT-2 for ``fan_in_fan_out``), built with random weights;
the adapters get random ``B`` and a magnitude moved off its initial row
norms (a fresh DoRA adapter, ``B = 0`` and ``m = ‖W‖_row``, would hide
every mistake). In float64 everything agrees with PEFT to 1e-12 relative.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lowrank.cli import main  # noqa: E402
from lowrank.io.adapter import inspect_adapter  # noqa: E402
from lowrank.io.safetensors import read_safetensors  # noqa: E402

P = "base_model.model."


class Net(torch.nn.Module):
    """An Embedding, then two Linear layers: ids (batch, T) -> (batch, T, 3)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.fc = torch.nn.Linear(6, 5)
        self.out = torch.nn.Linear(5, 3, bias=False)

    def forward(self, ids):
        return self.out(torch.relu(self.fc(self.emb(ids))))


def trained(pm, seed):
    """Random B (and embedding B), A, and a magnitude scaled off its initial row norms, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty(p.shape, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen).to(p.dtype))
    return pm


def save_base(model, path):
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(state, str(path), metadata={"format": "pt"})


def peft_dora_adapter(base, folder, *, dtype, targets, seed=1, **config):
    config = peft.LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=targets, **config)
    pm = trained(peft.get_peft_model(copy.deepcopy(base), config), seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    pm.save_pretrained(str(folder))
    return folder


def peft_merge(base, folder):
    model = copy.deepcopy(base)
    merged = peft.PeftModel.from_pretrained(model, str(folder), autocast_adapter_dtype=False).merge_and_unload()
    return {k: v.detach().numpy() for k, v in merged.state_dict().items()}


def max_rel(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# ---------------------------------------------------------------- PEFT's files


def test_peft_writes_the_magnitude_as_lora_magnitude_vector_without_weight(tmp_path):
    torch.manual_seed(0)
    folder = peft_dora_adapter(Net().double(), tmp_path / "ad", dtype=torch.float64, targets=["emb", "fc", "out"])
    keys = set(safetensors_torch.load_file(str(folder / "adapter_model.safetensors")))
    assert {f"{P}fc.lora_magnitude_vector", f"{P}out.lora_magnitude_vector", f"{P}emb.lora_magnitude_vector"} <= keys
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
    report = inspect_adapter(folder)
    assert report.passed, report.problems
    assert {m.name: m.shape_magnitude for m in report.modules} == {"emb": (6,), "fc": (5,), "out": (3,)}


@pytest.mark.parametrize("adapter_dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", [{}, {"use_rslora": True, "rank_pattern": {"fc": 2}, "alpha_pattern": {"out": 3}}])
def test_adapter_merge_of_a_dora_adapter_equals_peft_merge_and_unload(tmp_path, adapter_dtype, extra):
    torch.manual_seed(0)
    base = Net().double().eval()
    save_base(base, tmp_path / "base.safetensors")
    folder = peft_dora_adapter(base, tmp_path / "ad", dtype=adapter_dtype, targets=["emb", "fc", "out"], **extra)
    out = tmp_path / "merged.safetensors"
    assert main(["adapter", "merge", str(tmp_path / "base.safetensors"), str(folder), str(out)]) == 0
    ours, theirs = read_safetensors(out), peft_merge(base, folder)
    assert set(ours) == set(theirs)
    for key in ("emb.weight", "fc.weight", "out.weight"):
        assert ours[key].dtype == np.float64
        assert max_rel(ours[key], theirs[key]) < 1e-12, key
        assert max_rel(ours[key], base.state_dict()[key].numpy()) > 1e-3  # the merge changed something
    np.testing.assert_array_equal(ours["fc.bias"], theirs["fc.bias"])


def test_adapter_merge_of_a_dora_adapter_with_fan_in_fan_out_equals_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    base = transformers.GPT2LMHeadModel(config).double().eval()
    state = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items() if k != "lm_head.weight"}
    safetensors_torch.save_file(state, str(tmp_path / "base.safetensors"), metadata={"format": "pt"})
    folder = peft_dora_adapter(
        base, tmp_path / "ad", dtype=torch.float64, targets=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    out = tmp_path / "merged.safetensors"
    assert main(["adapter", "merge", str(tmp_path / "base.safetensors"), str(folder), str(out)]) == 0
    ours, theirs = read_safetensors(out), peft_merge(base, folder)
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"):
        assert max_rel(ours[key], theirs[key]) < 1e-12, key


# ---------------------------------------------------------------- loading into and saving from lowrank models


def torch_mlp(seed, dtype):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).to(dtype).eval()


def ours_like(torch_model, dtype):
    """A lowrank MLP with the torch model's base weights (the torch-style keys map 1:1)."""
    from lowrank import nn

    model = nn.Sequential(nn.Linear(6, 5, dtype=dtype), nn.ReLU(), nn.Linear(5, 3, dtype=dtype))
    model.load_state_dict({k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()})
    return model


def torch_name(name):
    """PEFT's parameter name -> lowrank's: no prefix, no adapter name, the magnitude without '.weight'."""
    name = name.replace(P, "").replace(".default", "").replace(".base_layer", "")
    return name[: -len(".weight")] if name.endswith("lora_magnitude_vector.weight") else name


LOAD_CONFIGS = [
    {"r": 2, "lora_alpha": 5, "target_modules": ["0", "2"]},
    {"r": 4, "lora_alpha": 3, "target_modules": ["0", "2"], "use_rslora": True, "rank_pattern": {"2": 2},
     "lora_dropout": 0.1, "bias": "lora_only"},
    {"r": 2, "lora_alpha": 4, "target_modules": ["2"]},
]  # fmt: skip


@pytest.mark.parametrize("config", LOAD_CONFIGS)
@pytest.mark.parametrize(
    ("torch_dtype", "file_dtype", "rtol"),
    [
        (torch.float64, torch.float64, 1e-12),
        (torch.float64, torch.bfloat16, 1e-12),
        (torch.float32, torch.float32, 1e-5),
    ],
)
def test_a_dora_adapter_peft_saved_loads_here_with_peft_outputs_and_gradients(
    tmp_path, config, torch_dtype, file_dtype, rtol
):
    from lowrank.io import load_peft_adapter

    np_dtype = np.float64 if torch_dtype == torch.float64 else np.float32
    base = torch_mlp(0, torch_dtype)
    ours = ours_like(base, np_dtype)
    pm = trained(peft.get_peft_model(base, peft.LoraConfig(use_dora=True, **config)), seed=3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            trained_bias = config.get("bias") == "lora_only" and name.endswith("base_layer.bias")
            if trained_bias:
                p.data += 0.25  # a trained bias, saved with bias="lora_only"
            if "lora_" in name or trained_bias:
                p.data = p.data.to(file_dtype).to(torch_dtype)  # the values the file holds, exactly
    pm.save_pretrained(str(tmp_path / "ad"), save_embedding_layers=False)
    if file_dtype != torch_dtype:  # rewrite the file in the narrow dtype, as PEFT saves a bf16 model
        path = str(tmp_path / "ad" / "adapter_model.safetensors")
        tensors = safetensors_torch.load_file(path)
        safetensors_torch.save_file({k: v.to(file_dtype) for k, v in tensors.items()}, path, {"format": "pt"})
    pm.eval()

    ours = load_peft_adapter(ours, tmp_path / "ad")
    ours.eval()
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((2, 4, 6)).astype(np_dtype), rng.standard_normal((2, 4, 3)).astype(np_dtype)
    tx = torch.tensor(x, requires_grad=True)
    ty = pm(tx)
    ty.backward(torch.tensor(dy))
    y = ours(x)
    dx = ours.backward(dy)
    assert y.dtype == np_dtype
    scale = np.abs(ty.detach().numpy()).max()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=rtol, atol=rtol * np.abs(dx).max())
    theirs = {torch_name(n): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.trainable}
    assert set(mine) == set(theirs)
    assert {n for n in mine if n.endswith("lora_magnitude_vector")} == {
        f"{t}.lora_magnitude_vector" for t in config["target_modules"]
    }
    for name, g in mine.items():  # PEFT's gradient: the norm detached
        np.testing.assert_allclose(g, theirs[name], rtol=rtol, atol=rtol * np.abs(theirs[name]).max(), err_msg=name)


@pytest.mark.parametrize("config", [{"r": 2, "alpha": 5}, {"r": 3, "alpha": 4, "use_rslora": True, "dropout": 0.1}])
def test_a_dora_adapter_saved_here_loads_in_peft_with_our_outputs(tmp_path, config):
    from lowrank import nn
    from lowrank.io import save_peft_adapter

    base = torch_mlp(0, torch.float64)
    ours = nn.inject_lora(ours_like(base, np.float64), use_dora=True, random_state=0, **config)
    rng = np.random.default_rng(2)
    for name, p in ours.named_parameters():
        if name.endswith("lora_B.weight"):
            p.data = rng.standard_normal(p.shape)
        elif name.endswith("lora_magnitude_vector"):
            p.data = p.data * rng.uniform(0.5, 2.0, p.shape)
    folder = save_peft_adapter(ours, tmp_path / "ad")
    keys = set(safetensors_torch.load_file(str(folder / "adapter_model.safetensors")))
    assert keys == {
        f"{P}{i}.{k}" for i in ("0", "2") for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    }
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True

    pm = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    for name, p in pm.named_parameters():  # every tensor of the file reached PEFT's model
        if "lora_" in name:
            np.testing.assert_array_equal(p.detach().numpy(), dict(ours.named_parameters())[torch_name(name)].data)
    ours.eval()
    x = rng.standard_normal((3, 6))
    np.testing.assert_allclose(ours(x), pm(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the reference vectors, checked with PEFT


def _peft_dora_outputs(case, t, exact):
    """A DoRA case's outputs by PEFT's own DoraLinearLayer (the detached mode) or torch autograd (the exact one)."""
    from peft.tuners.lora.dora import DoraLinearLayer

    p = case["params"]
    T = {k: torch.tensor(v.astype(np.float64)) for k, v in t.items()}
    T.update({k: torch.nn.Parameter(v) for k, v in T.items() if k not in ("dropout_mask", "dy")})
    n_out, n_in = t["weight"].shape
    base = torch.nn.Linear(n_in, n_out, bias="bias" in t).double()
    base.weight = T["weight"]
    if "bias" in t:
        base.bias = T["bias"]
    lora_A = torch.nn.Linear(n_in, p["r"], bias=False).double()
    lora_B = torch.nn.Linear(p["r"], n_out, bias=False).double()
    lora_A.weight, lora_B.weight = T["A"], T["B"]
    xm = T["x"] * T["dropout_mask"] if "dropout_mask" in T else T["x"]
    if exact:  # PEFT's formula with the norm left in the graph
        V = T["weight"] + p["scaling"] * T["B"] @ T["A"]
        c = T["magnitude"] / torch.linalg.norm(V, dim=1)
        y = base(T["x"]) + (c - 1) * (xm @ T["weight"].T) + c * lora_B(lora_A(xm)) * p["scaling"]
    else:  # DoraLinearVariant.forward in training mode with dropout: base(x) + dora(dropout(x), base_result=None)
        dora = DoraLinearLayer(fan_in_fan_out=False)
        dora.weight = T["magnitude"]
        y = base(T["x"]) + dora(xm, lora_A=lora_A, lora_B=lora_B, scaling=p["scaling"], base_layer=base)
    y.backward(T["dy"])
    out = {"y": y, "dx": T["x"].grad, "dA": T["A"].grad, "dB": T["B"].grad, "dmagnitude": T["magnitude"].grad,
           "dweight": T["weight"].grad}  # fmt: skip
    if "bias" in t:
        out["dbias"] = T["bias"].grad
    return {k: v.detach().numpy().astype(case["outputs"][k]["dtype"]) for k, v in out.items()}


def test_the_dora_vectors_pass_a_candidate_computed_by_peft(tmp_path):
    from lowrank.io import load_safetensors, save_safetensors
    from lowrank.reference.vectors import check_vectors, read_manifest, write_vectors

    write_vectors(tmp_path / "ref")
    kinds = ("dora_linear", "dora_linear_exact", "dora_merge")
    cases = [c for c in read_manifest(tmp_path / "ref")["cases"] if c["kind"] in kinds]
    for case in cases:
        tensors = load_safetensors(tmp_path / "ref" / case["file"])
        t = {k: tensors[k] for k in case["inputs"]}
        if case["kind"] == "dora_merge":  # PEFT's merge_and_unload on a one-layer model
            n_out, n_in = t["weight"].shape
            model = torch.nn.Sequential(torch.nn.Linear(n_in, n_out, bias=False)).double()
            config = peft.LoraConfig(r=case["params"]["r"], lora_alpha=case["params"]["alpha"], use_dora=True,
                                     target_modules=["0"])  # fmt: skip
            pm = peft.get_peft_model(model, config)
            with torch.no_grad():
                layer = pm.base_model.model[0]
                layer.base_layer.weight.copy_(torch.tensor(t["weight"].astype(np.float64)))
                layer.lora_A["default"].weight.copy_(torch.tensor(t["A"].astype(np.float64)))
                layer.lora_B["default"].weight.copy_(torch.tensor(t["B"].astype(np.float64)))
                layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(t["magnitude"].astype(np.float64)))
            merged = pm.merge_and_unload()[0].weight.detach().numpy()
            out = {"merged_weight": merged.astype(case["outputs"]["merged_weight"]["dtype"])}
        else:
            out = _peft_dora_outputs(case, t, exact=case["kind"] == "dora_linear_exact")
        (tmp_path / "cand").mkdir(exist_ok=True)
        save_safetensors(tmp_path / "cand" / case["file"], out)
    report = check_vectors(tmp_path / "ref", tmp_path / "cand", kinds=",".join(kinds))
    assert report.passed, report.format()
    assert len(report.selected) == len(cases) == 2 * 2 * 6 + 2


# ---------------------------------------------------------------- 16-bit DoRA: PEFT's own error inside the bound


@pytest.mark.parametrize(("fmt", "torch_dtype"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_peft_dora_in_16_bits_lies_inside_the_derived_bound(fmt, torch_dtype):
    from peft.tuners.lora.dora import DoraLinearLayer

    from lowrank.precision import round_to
    from lowrank.precision.bounds import dora_linear_bound

    rng = np.random.default_rng(0)
    worst = 0.0
    for trial in range(30):
        n_in, n_out, r, N = int(rng.integers(1, 40)), int(rng.integers(1, 12)), int(rng.integers(1, 5)), 3
        s = float(rng.choice([0.5, 2.0, 8.0]))
        x = round_to(rng.standard_normal((N, n_in)), fmt)
        W = round_to(0.3 * rng.standard_normal((n_out, n_in)), fmt)
        b = round_to(0.1 * rng.standard_normal(n_out), fmt) if trial % 2 else None
        A, B = round_to(0.3 * rng.standard_normal((r, n_in)), fmt), round_to(0.3 * rng.standard_normal((n_out, r)), fmt)
        V = W + s * B @ A  # (out, in), exact in float64 for these few terms
        m = round_to(np.linalg.norm(V, axis=1) * rng.uniform(0.5, 2.0, n_out), fmt)
        c = m / np.linalg.norm(V, axis=1)
        exact = x @ W.T + (0.0 if b is None else b) + (c - 1) * (x @ W.T) + c * (s * (x @ A.T) @ B.T)

        def T(a):
            return torch.tensor(a.astype(np.float32)).to(torch_dtype)

        base = torch.nn.Linear(n_in, n_out, bias=b is not None).to(torch_dtype)
        base.weight.data = T(W)
        if b is not None:
            base.bias.data = T(b)
        lora_A = torch.nn.Linear(n_in, r, bias=False).to(torch_dtype)
        lora_B = torch.nn.Linear(r, n_out, bias=False).to(torch_dtype)
        lora_A.weight.data, lora_B.weight.data = T(A), T(B)
        dora = DoraLinearLayer(fan_in_fan_out=False)
        dora.weight = torch.nn.Parameter(T(m))
        with torch.no_grad():  # DoraLinearVariant.forward in eval mode: the base result handed in
            tx = T(x)
            result = base(tx)
            y = result + dora(tx, lora_A=lora_A, lora_B=lora_B, scaling=s, base_layer=base, base_result=result)
        error = np.abs(y.float().numpy().astype(np.float64) - exact)
        bound = dora_linear_bound(x, W, b, A, B, m, s, fmt)
        assert np.all(error <= bound), (trial, float((error / bound).max()))
        worst = max(worst, float((error / bound).max()))
    assert worst > 1 / 50  # and not loose by more than a factor 50 on these layers
