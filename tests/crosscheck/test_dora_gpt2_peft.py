"""DoRA on GPT-2 against PEFT: a transformers GPT2LMHeadModel with a PEFT DoRA adapter and nn.GPT2 with the same.

c_attn and c_proj are transformers Conv1D layers (weight ``(in, out)``,
PEFT's ``fan_in_fan_out``), so every DoRA path must use the ``(out, in)``
view. Both directions: an adapter PEFT saves loads here, one lowrank saves
loads in PEFT; the logits, the token loss and the gradients of every adapter
parameter (A, B, magnitude) agree in float64. The adapters get random A, B
and a magnitude moved off its initial row norms.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lowrank import nn  # noqa: E402
from lowrank.io import load_peft_adapter, save_peft_adapter  # noqa: E402

SIZES = dict(vocab_size=17, n_positions=8, n_embd=8, n_layer=2, n_head=2)
TARGETS = ["c_attn", "c_proj"]  # attention's fused qkv and both c_proj (attention and MLP): all Conv1D
P = "base_model.model."


def hf_model(seed=0):
    config = transformers.GPT2Config(**SIZES, attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
                    + 0.3 * torch.randn_like(p))  # fmt: skip
    return model


def ours_from(hf):
    model = nn.GPT2(nn.GPT2Config.from_transformers(hf.config), dtype=np.float64, random_state=0)
    model.load_state_dict({k: v.detach().numpy().copy() for k, v in hf.state_dict().items()})
    return model.eval()


def ids_and_labels():
    ids = np.random.default_rng(4).integers(0, SIZES["vocab_size"], (3, 7))
    labels = ids.copy()
    labels[1, 2] = -100
    return ids, labels


def peft_loss_and_grads(pm, ids, labels):
    pm.zero_grad()
    logits = pm(torch.tensor(ids)).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, SIZES["vocab_size"]), torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100
    )
    loss.backward()
    grads = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:  # base_model.model.<module>.lora_A.default.weight -> <module>.lora_A.weight
            key = name.removeprefix(P).replace(".default", "").replace(".lora_magnitude_vector.weight",
                                                                        ".lora_magnitude_vector")  # fmt: skip
            key = key.replace(".base_layer.", ".").replace(".modules_to_save.", ".")  # bias, saved modules
            grads[key] = p.grad.numpy().copy()
    return logits.detach().numpy(), loss.item(), grads


def ours_loss_and_grads(model, ids, labels):
    logits = model(ids)
    loss, dlogits = nn.lm_loss(logits, labels)
    model.zero_grad()
    model.backward(dlogits)
    grads = {name: p.grad for name, p in model.named_parameters() if p.trainable}
    return logits, loss, grads


def rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def assert_same(ours, ref):
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = ours, ref
    assert rel_err(logits, ref_logits) <= 1e-12
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert sorted(grads) == sorted(ref_grads)
    assert sum(k.endswith("lora_magnitude_vector") for k in grads) == 3 * SIZES["n_layer"]
    for key, g in ref_grads.items():
        assert rel_err(grads[key], g) <= 1e-10, key


def trained_peft(hf, seed=1):
    config = peft.LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=TARGETS, fan_in_fan_out=True)
    pm = peft.get_peft_model(copy.deepcopy(hf), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty(p.shape, dtype=torch.float64).uniform_(0.6, 1.6, generator=gen))
    return pm.eval()


def test_a_peft_dora_gpt2_adapter_loads_here_with_peft_logits_and_gradients(tmp_path):
    hf = hf_model()
    pm = trained_peft(hf)
    pm.save_pretrained(str(tmp_path / "ad"))
    ours = load_peft_adapter(ours_from(hf), tmp_path / "ad").eval()
    layer = ours.transformer.h[0].attn.c_attn
    assert isinstance(layer, nn.LoRALinear) and layer.use_dora and layer.fan_in_fan_out
    ids, labels = ids_and_labels()
    assert_same(ours_loss_and_grads(ours, ids, labels), peft_loss_and_grads(pm, ids, labels))


@pytest.mark.parametrize("beside", [{}, {"bias": "lora_only", "modules_to_save": ["ln_f"]}], ids=["alone", "beside"])
def test_a_dora_gpt2_adapter_saved_here_loads_in_peft_with_our_logits_and_gradients(tmp_path, beside):
    hf = hf_model(seed=2)
    ours = nn.inject_lora(ours_from(hf), r=2, alpha=3, target_modules=TARGETS, use_dora=True, random_state=0,
                          **beside)  # fmt: skip
    rng = np.random.default_rng(3)
    for m in ours.modules():
        if isinstance(m, nn.LoRALinear):
            m.A.data, m.B.data = 0.5 * rng.standard_normal(m.A.shape), 0.5 * rng.standard_normal(m.B.shape)
            m.magnitude.data = m.magnitude.data * rng.uniform(0.6, 1.6, m.magnitude.shape)
            if beside:  # trained beside the factors: the adapter carries them
                m.bias.data = m.bias.data + 0.3 * rng.standard_normal(m.bias.shape)
    if beside:
        ours.transformer.ln_f.weight.data += 0.1 * rng.standard_normal(ours.transformer.ln_f.weight.shape)
    save_peft_adapter(ours, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad"), is_trainable=True).eval()
    ids, labels = ids_and_labels()
    assert_same(ours_loss_and_grads(ours.eval(), ids, labels), peft_loss_and_grads(pm, ids, labels))
