"""PEFT adapter folders for Conv1D and Embedding layers, with NumPy alone: round trips, settings kept, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowrank import nn
from lowrank.io import load_peft_adapter, save_peft_adapter
from lowrank.io.safetensors import read_safetensors

P = "base_model.model."


def _gpt2(seed=0):
    return nn.GPT2(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2, dtype=np.float64, random_state=seed)


def _randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, nn.LORA_LAYERS):
            m.A.data, m.B.data = rng.standard_normal(m.A.shape), rng.standard_normal(m.B.shape)
    return model


def test_gpt2_adapter_round_trip_keys_config_and_outputs(tmp_path):
    model = _randomize(nn.inject_lora(_gpt2(), r=2, alpha=3, target_modules=["c_attn", "wte"], random_state=0))
    save_peft_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == [
        "transformer.wte",
        "transformer.h.0.attn.c_attn",
    ]
    keys = set(read_safetensors(tmp_path / "ad" / "adapter_model.safetensors"))
    assert keys == {
        f"{P}transformer.wte.lora_embedding_A", f"{P}transformer.wte.lora_embedding_B",
        f"{P}transformer.h.0.attn.c_attn.lora_A.weight", f"{P}transformer.h.0.attn.c_attn.lora_B.weight",
    }  # fmt: skip
    other = load_peft_adapter(_gpt2(), tmp_path / "ad").eval()
    idx = np.array([[1, 12, 12, 0]])
    np.testing.assert_array_equal(other(idx), model.eval()(idx))
    assert isinstance(other.transformer.wte, nn.LoRAEmbedding)
    assert other.transformer.h[0].attn.c_attn.fan_in_fan_out


def test_saving_uses_the_settings_the_model_was_adapted_with(tmp_path):
    """bias and modules_to_save given to inject_lora come back in the saved config; an argument still wins."""
    model = nn.inject_lora(_gpt2(), r=2, alpha=3, target_modules=["c_attn"], bias="lora_only",
                           modules_to_save=["ln_f"], random_state=0)  # fmt: skip
    assert nn.trained_beside_lora(model) == nn.TrainedBeside("lora_only", ("transformer.ln_f",))
    save_peft_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["bias"], config["modules_to_save"]) == ("lora_only", ["transformer.ln_f"])
    save_peft_adapter(model, tmp_path / "b", bias="none", modules_to_save=[])
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert (config["bias"], config["modules_to_save"]) == ("none", None)
    loaded = load_peft_adapter(_gpt2(), tmp_path / "a")
    assert nn.trained_beside_lora(loaded) == nn.TrainedBeside("lora_only", ("transformer.ln_f",))
    assert nn.trained_beside_lora(_gpt2()) == nn.TrainedBeside()


def test_refusals_name_the_layer(tmp_path):
    merged = nn.inject_lora(_gpt2(), r=1, alpha=1, target_modules=["c_attn"], enable_lora=[True, False, True])
    with pytest.raises(ValueError, match=r"\['transformer.h.0.attn.c_attn'\] are LoRAMergedLinear"):
        save_peft_adapter(merged, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    save_peft_adapter(_randomize(nn.inject_lora(_gpt2(), r=1, alpha=1, targets=["transformer.wte"])), tmp_path / "e")
    seq = nn.Sequential(nn.Linear(2, 2))
    seq.transformer = nn.Sequential()
    seq.transformer.wte = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"adapts 'transformer\.wte', which must be an Embedding of model, got Linear"):
        load_peft_adapter(seq, tmp_path / "e")
    lora = nn.inject_lora(_gpt2(), r=1, alpha=1, targets=["transformer.wte"])
    lora.transformer.wte.merge()
    with pytest.raises(RuntimeError, match="merged LoRAEmbedding"):
        load_peft_adapter(lora, tmp_path / "e")


def test_targets_takes_a_short_name_as_a_suffix_when_no_module_has_it():
    """targets=["c_attn"] (the design's call) adapts every block's c_attn; an exact module name stays exact."""
    model = nn.GPT2(vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2, random_state=0)
    model = nn.inject_lora(model, r=2, alpha=4, targets=["c_attn"], random_state=0)
    adapted = [n for n, m in model.named_modules() if isinstance(m, nn.LORA_LAYERS)]
    assert adapted == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(ValueError, match="already LoRA layers"):
        nn.inject_lora(model, r=2, alpha=4, targets=["c_attn"])
    with pytest.raises(ValueError, match=r"targets \['transformer.h.0.attn'\] are not Linear, Conv1D or Embedding"):
        nn.inject_lora(_gpt2(), r=2, alpha=4, targets=["transformer.h.0.attn"])  # a module, not a layer: exact
    with pytest.raises(ValueError, match=r"targets \['q_proj'\] are not"):
        nn.inject_lora(_gpt2(), r=2, alpha=4, targets=["q_proj"])


def test_a_lora_embedding_beside_dora_layers_is_refused_on_save(tmp_path):
    """PEFT's use_dora is one flag: with it, PEFT (and lowrank's loader) makes the Embedding DoRA too."""
    model = nn.inject_lora(_gpt2(), r=2, alpha=3, targets=["wte"], random_state=0)
    model = _randomize(nn.inject_lora(model, r=2, alpha=3, target_modules=["c_attn"], use_dora=True, random_state=0))
    with pytest.raises(ValueError, match=r"LoRAEmbedding layers \['transformer.wte'\] beside DoRA layers"):
        save_peft_adapter(model, tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


def test_a_model_mixing_conv1d_and_linear_adapters_is_refused_on_save(tmp_path):
    """One fan_in_fan_out flag cannot describe both layouts: a model-free merge would transpose one kind."""
    model = nn.Sequential(nn.Conv1D(4, 4, dtype=np.float64, random_state=0), nn.Linear(4, 4, dtype=np.float64))
    model = _randomize(nn.inject_lora(model, r=2, alpha=3, random_state=0))
    with pytest.raises(ValueError, match=r"mix Conv1D .* Conv1D layers \['0'\], Linear layers \['1'\]"):
        save_peft_adapter(model, tmp_path / "ad")
    assert not (tmp_path / "ad").exists()
