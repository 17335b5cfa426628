"""LoRA on Conv1D, Embedding and loralib's MergedLinear against PEFT, transformers and loralib, in float64.

The GPT-2 is transformers' ``GPT2LMHeadModel`` built from a config with
random O(1) weights (nothing downloaded), eager attention; its ``c_attn``,
``c_proj`` and ``c_fc`` are ``Conv1D`` (PEFT's ``fan_in_fan_out``) and
``wte`` an Embedding tied to the head. Every LoRA factor is random (PEFT's
fresh B = 0, or A = 0 for an Embedding, would hide every mistake in the
other factor and in the scaling).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lowrank import nn  # noqa: E402
from lowrank.cli import main  # noqa: E402
from lowrank.io import load_peft_adapter, save_peft_adapter  # noqa: E402
from lowrank.io.safetensors import read_safetensors  # noqa: E402

SIZES = dict(vocab_size=23, n_positions=12, n_embd=16, n_layer=2, n_head=4)


def hf_gpt2(seed=0):
    config = transformers.GPT2Config(**SIZES, attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = any(name.endswith(f"{ln}.weight") for ln in ("ln_1", "ln_2", "ln_f"))
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if is_norm else 0.3 * torch.randn_like(p))
    return model


def ours_from(hf):
    model = nn.GPT2(nn.GPT2Config.from_transformers(hf.config), dtype=np.float64, random_state=0)
    model.load_state_dict({k: v.detach().numpy().copy() for k, v in hf.state_dict().items()})
    return model.eval()


def peft_gpt2(hf, seed=1, **config):
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn_like(p))
    return pm.eval()


def tokens(seed, batch=2, T=7):
    return np.random.default_rng(seed).integers(0, SIZES["vocab_size"], (batch, T))


def rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def peft_name(name):
    """PEFT's parameter name -> lowrank's: no base_model.model. prefix, no adapter name."""
    return name.replace("base_model.model.", "").replace(".default", "")


# ---------------------------------------------------------------- PEFT adapters on GPT-2, both ways


@pytest.mark.parametrize(
    "targets", [["c_attn"], ["c_attn", "c_proj"], ["c_attn", "wte"], ["c_attn", "c_proj", "c_fc", "wte"]]
)
def test_a_peft_gpt2_adapter_loads_here_logits_and_adapter_gradients(tmp_path, targets):
    hf = hf_gpt2()
    pm = peft_gpt2(hf, r=2, lora_alpha=5, target_modules=targets, fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "ad")
    ours = load_peft_adapter(ours_from(hf), tmp_path / "ad")
    ours.eval()
    idx = tokens(0)
    dlogits = np.random.default_rng(1).standard_normal((*idx.shape, SIZES["vocab_size"]))
    t_logits = pm(input_ids=torch.tensor(idx)).logits
    t_logits.backward(torch.tensor(dlogits))
    logits = ours(idx)
    ours.backward(dlogits)
    assert rel_err(logits, t_logits.detach().numpy()) < 1e-12
    torch_grads = {peft_name(n): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.trainable}
    assert set(our_grads) == set(torch_grads)
    assert any("lora_embedding_A" in n for n in our_grads) == ("wte" in targets)
    for name, g in our_grads.items():
        assert rel_err(g, torch_grads[name]) < 1e-12, name


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj"], ["wte", "c_attn"]])
def test_an_adapter_saved_here_loads_in_peft_with_the_same_logits(tmp_path, targets):
    hf = hf_gpt2()
    ours = nn.inject_lora(ours_from(hf), r=3, alpha=4, target_modules=targets, random_state=0)
    rng = np.random.default_rng(2)
    for m in ours.modules():
        if isinstance(m, nn.LORA_LAYERS):
            m.A.data, m.B.data = rng.standard_normal(m.A.shape), rng.standard_normal(m.B.shape)
    ours.eval()
    save_peft_adapter(ours, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    idx = tokens(3)
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(idx)).logits.numpy()
    assert rel_err(ours(idx), ref) < 1e-12
    state = {peft_name(n): p.detach().numpy() for n, p in pm.named_parameters() if "lora_" in n}
    for name, p in ours.named_parameters():
        if "lora_" in name:
            np.testing.assert_array_equal(state[name], p.data)


def test_a_loaded_adapter_saves_back_with_its_bias_and_modules_to_save(tmp_path):
    """#9: bias and modules_to_save come back from the model, not from arguments passed again."""
    hf = hf_gpt2()
    pm = peft_gpt2(hf, r=2, lora_alpha=4, target_modules=["c_attn", "wte"], fan_in_fan_out=True,
                   bias="lora_only", modules_to_save=["ln_f"])  # fmt: skip
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.25 * torch.randn_like(p))  # trained biases and ln_f differ from the base's
    pm.save_pretrained(tmp_path / "peft")
    ours = load_peft_adapter(ours_from(hf), tmp_path / "peft")
    save_peft_adapter(ours, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only" and config["modules_to_save"] == ["transformer.ln_f"]
    again = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "back")).eval()
    idx = tokens(4)
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(idx)).logits.numpy()
        back = again(input_ids=torch.tensor(idx)).logits.numpy()
    assert rel_err(ours.eval()(idx), ref) < 1e-12
    assert rel_err(back, ref) < 1e-12


def test_adapter_merge_of_a_gpt2_adapter_with_wte_equals_merge_and_unload(tmp_path):
    hf = hf_gpt2()
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    safetensors_torch.save_file(state, str(tmp_path / "base.safetensors"), metadata={"format": "pt"})
    pm = peft_gpt2(hf, r=2, lora_alpha=6, target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "ad")
    argv = ["adapter", "merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad"), str(tmp_path / "m.st")]
    assert main(argv) == 0
    merged = read_safetensors(tmp_path / "m.st")
    ref = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    assert set(merged) == set(ref) - {"lm_head.weight"}
    for key, value in merged.items():
        assert rel_err(value, ref[key]) < 1e-12 if np.abs(ref[key]).max() else np.array_equal(value, ref[key])
    # and lowrank's own merge_lora of the loaded adapter folds to the same weights (the head stays tied)
    plain = nn.merge_lora(load_peft_adapter(ours_from(hf), tmp_path / "ad")).state_dict()
    for key, value in plain.items():
        assert rel_err(value, ref[key]) < 1e-12 if np.abs(ref[key]).max() else np.array_equal(value, ref[key])


# ---------------------------------------------------------------- layers alone


def test_lora_on_a_torch_embedding_equals_peft():
    """PEFT's lora.Embedding on a bare torch Embedding: forward and both factors' gradients, repeated ids."""
    torch.manual_seed(0)
    emb = torch.nn.Sequential(torch.nn.Embedding(9, 5)).double()
    pm = peft_gpt2(emb, r=3, lora_alpha=2, target_modules=["0"], use_rslora=True)
    ours = nn.Sequential(nn.Embedding(9, 5, dtype=np.float64))
    ours.load_state_dict({"0.weight": emb[0].weight.detach().numpy().copy()})
    ours = nn.inject_lora(ours, r=3, alpha=2, targets=["0"], use_rslora=True)
    ours[0].A.data = pm.base_model.model[0].lora_embedding_A["default"].detach().numpy().copy()
    ours[0].B.data = pm.base_model.model[0].lora_embedding_B["default"].detach().numpy().copy()
    idx = np.array([[1, 1, 8, 0], [4, 1, 8, 8]])
    dy = np.random.default_rng(0).standard_normal((2, 4, 5))
    ty = pm(torch.tensor(idx))
    ty.backward(torch.tensor(dy))
    y = ours(idx)
    ours.backward(dy)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    layer = pm.base_model.model[0]
    np.testing.assert_allclose(ours[0].A.grad, layer.lora_embedding_A["default"].grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours[0].B.grad, layer.lora_embedding_B["default"].grad.numpy(), rtol=1e-12, atol=1e-12)


class _Times(torch.nn.Module):
    """A fixed dropout mask, in place of loralib's nn.Dropout."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, t):
        return t * self.mask


@pytest.mark.parametrize(
    ("enable_lora", "conv", "dropout"),
    [([True, False, True], True, 0.0), ([True, False, True], False, 0.0), ([False, True, True, False], True, 0.3)],
)
def test_loralib_merged_linear_forward_gradients_and_merge(enable_lora, conv, dropout):
    """loralib's MergedLinear (fan_in_fan_out for a Conv1D layout): forward, dx, dA, dB, merge, keys."""
    loralib = pytest.importorskip("loralib")
    n_in, n_out, r = 6, 12, 2
    torch.manual_seed(0)
    ref = loralib.MergedLinear(n_in, n_out, r=r, lora_alpha=3, enable_lora=enable_lora, fan_in_fan_out=conv,
                               lora_dropout=dropout, merge_weights=True).double()  # fmt: skip
    with torch.no_grad():
        ref.lora_B.normal_()
    base = nn.Conv1D(n_in, n_out, dtype=np.float64) if conv else nn.Linear(n_in, n_out, dtype=np.float64)
    ours = nn.LoRAMergedLinear(base, r=r, alpha=3, dropout=dropout, enable_lora=enable_lora)
    ours.load_state_dict({k: v.detach().numpy().copy() for k, v in ref.state_dict().items()})
    assert list(ours.state_dict()) == list(ref.state_dict())  # weight, bias, lora_A, lora_B
    x = np.random.default_rng(1).standard_normal((2, 5, n_in))
    dy = np.random.default_rng(2).standard_normal((2, 5, n_out))
    tx = torch.tensor(x, requires_grad=True)
    if dropout:  # the mask ours draws next, drawn from a copy of its generator, replaces loralib's nn.Dropout
        mask = nn.functional.dropout_mask(x.shape, dropout, random_state=copy.deepcopy(ours.generator),
                                          dtype=np.float64)  # fmt: skip
        ref.lora_dropout = _Times(torch.tensor(mask))
    ref.train()  # unmerged
    ty = ref(tx)
    ty.backward(torch.tensor(dy))
    y = ours.train()(x)
    dx = ours.backward(dy)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.A.grad, ref.lora_A.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.B.grad, ref.lora_B.grad.numpy(), rtol=1e-12, atol=1e-12)
    ref.eval()  # loralib merges on eval()
    ours.merge()
    np.testing.assert_allclose(ours.weight.data, ref.weight.detach().numpy(), rtol=1e-13, atol=1e-14)
