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
