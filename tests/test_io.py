"""lowrank.io: safetensors and JSON helpers, PEFT adapters (save -> load here; PEFT itself in crosscheck/)."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from lowrank import nn
from lowrank.io import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    load_json,
    load_peft_adapter,
    load_safetensors,
    save_json,
    save_peft_adapter,
    save_safetensors,
)


def _mlp(seed=0, dtype=np.float64):
    return nn.Sequential(nn.Linear(4, 6, dtype=dtype, random_state=seed), nn.ReLU(),
                         nn.Linear(6, 3, dtype=dtype, random_state=seed + 1))


def _adapted(seed=0, r=2, alpha=5.0, use_rslora=False, dtype=np.float64):
    model = _mlp(seed, dtype)
    rng = np.random.default_rng(seed)
    for i in (0, 2):
        model[i] = nn.LoRALinear(model[i], r=r, alpha=alpha, use_rslora=use_rslora, random_state=rng)
        model[i].B.data = rng.standard_normal(model[i].B.shape).astype(dtype)
    return model


# ---------------------------------------------------------------- safetensors and JSON


def test_safetensors_round_trip_keeps_values_dtypes_and_shapes(tmp_path):
    tensors = {"a": np.arange(6.0).reshape(2, 3), "b": np.float32(2.5) * np.ones(4, np.float32),
               "c": np.array(3.0), "m": np.array([True, False]), "i": np.arange(3)}
    save_safetensors(tmp_path / "t.safetensors", tensors)
    back = load_safetensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


def test_safetensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_safetensors(tmp_path / "missing.safetensors")
    path = save_safetensors(tmp_path / "t.safetensors", {"a": np.ones(10)})
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=re.escape("is not a readable .safetensors file")) as info:
        load_safetensors(path)
    assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match=r"tensors\['s'\] must be numeric or bool, got dtype <U1"):
        save_safetensors(tmp_path / "u.safetensors", {"s": np.array(["a"])})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_safetensors(tmp_path / "no" / "t.safetensors", {"a": np.ones(1)})


def test_json_round_trip_and_errors(tmp_path):
    save_json(tmp_path / "a.json", {"b": [1, 2.5, None], "a": "x"})
    assert load_json(tmp_path / "a.json") == {"a": "x", "b": [1, 2.5, None]}
    (tmp_path / "bad.json").write_text('{"a": [1, 2')
    with pytest.raises(ValueError, match=re.escape("bad.json is not a readable JSON file")):
        load_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_json(tmp_path / "none.json")
    with pytest.raises(ValueError):
        save_json(tmp_path / "nan.json", {"a": float("nan")})


def test_import_lowrank_io_does_not_import_safetensors():
    import subprocess

    code = ("import sys, lowrank, lowrank.io, lowrank.vectors, lowrank.testing, lowrank.reference.vectors; "
            "print('safetensors' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- PEFT adapters, here


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_then_load_reproduces_the_adapted_model(tmp_path, use_rslora, dtype):
    model = _adapted(use_rslora=use_rslora, dtype=dtype)
    save_peft_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] is None and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 5.0, use_rslora)
    assert config["target_modules"] == ["0", "2"]
    keys = set(load_safetensors(tmp_path / "ad" / PEFT_WEIGHTS_NAME))
    assert keys == {f"base_model.model.{i}.lora_{f}.weight" for i in (0, 2) for f in "AB"}

    fresh = _mlp(dtype=dtype)  # the same base weights, no adapter yet
    loaded = load_peft_adapter(fresh, tmp_path / "ad")
    assert loaded is fresh and isinstance(fresh[0], nn.LoRALinear) and isinstance(fresh[2], nn.LoRALinear)
    assert fresh[0].scaling == model[0].scaling
    sd, sd_loaded = model.state_dict(), fresh.state_dict()
    assert sd.keys() == sd_loaded.keys()
    for k in sd:
        np.testing.assert_array_equal(sd_loaded[k], sd[k])
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(dtype)
    np.testing.assert_array_equal(fresh(x), model(x))
    assert not fresh[0].weight.trainable and fresh[0].A.trainable
    # independent: the forward written out, W + alpha / r * B @ A per layer (alpha / sqrt(r) with rsLoRA)
    scaling = 5.0 / (np.sqrt(2) if use_rslora else 2)
    h = x.astype(np.float64)
    for i in (0, 2):
        W, b = (fresh[i].state_dict()[k].astype(np.float64) for k in ("weight", "bias"))
        A, B = (load_safetensors(tmp_path / "ad" / PEFT_WEIGHTS_NAME)[f"base_model.model.{i}.lora_{f}.weight"]
                for f in "AB")
        h = h @ (W + scaling * B.astype(np.float64) @ A.astype(np.float64)).T + b
        h = np.maximum(h, 0.0) if i == 0 else h
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(fresh(x), h, rtol=tol, atol=tol)


def test_load_replaces_an_existing_lora_layer_and_casts_to_the_layer_dtype(tmp_path):
    model = _adapted(dtype=np.float64)
    save_peft_adapter(model, tmp_path / "ad")
    target = _mlp(dtype=np.float32)
    target[0] = nn.LoRALinear(target[0], r=2, alpha=1.0)  # different alpha: replaced by the config's
    load_peft_adapter(target, tmp_path / "ad")
    assert target[0].alpha == 5.0 and target[0].A.dtype == np.float32
    np.testing.assert_array_equal(target[0].A.data, model[0].A.data.astype(np.float32))


def test_save_writes_a_regex_when_a_list_would_be_ambiguous(tmp_path):
    # adapting "0" while "1.0" stays a plain Linear: PEFT's list entry "0" would match "1.0" too
    model = nn.Sequential(nn.Linear(4, 4, dtype=np.float64), _mlp())
    model[0] = nn.LoRALinear(model[0], r=2, alpha=2.0)
    save_peft_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / PEFT_CONFIG_NAME).read_text())
    assert config["target_modules"] == "^(?:0)$"
    other = nn.Sequential(nn.Linear(4, 4, dtype=np.float64), _mlp())
    load_peft_adapter(other, tmp_path / "ad")
    assert isinstance(other[0], nn.LoRALinear) and not isinstance(other[1][0], nn.LoRALinear)


def test_save_refuses_what_one_peft_config_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear"):
        save_peft_adapter(_mlp(), tmp_path / "a")
    model = _adapted()
    model[2] = nn.LoRALinear(model[2].base, r=3, alpha=5.0, use_rslora=True)
    with pytest.raises(ValueError, match="must share use_rslora and dropout"):
        save_peft_adapter(model, tmp_path / "b")
    model[2] = nn.LoRALinear(model[2].base, r=3, alpha=5.0, dropout=0.5)
    with pytest.raises(ValueError, match="must share use_rslora and dropout"):
        save_peft_adapter(model, tmp_path / "b")
    model = _adapted()
    model[0].merge()
    with pytest.raises(RuntimeError, match=r"\['0'\] are merged"):
        save_peft_adapter(model, tmp_path / "c")
    with pytest.raises(TypeError, match=re.escape("model must be a lowrank.nn.Module")):
        save_peft_adapter({"0.weight": np.ones(2)}, tmp_path / "d")


def _write_adapter(folder, config_overrides=None, tensors=None):
    """An adapter as another tool would write it: lowrank's files, edited, the weights without lowrank's digest."""
    folder.mkdir()
    model = _adapted()
    save_peft_adapter(model, folder)
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    config.update(config_overrides or {})
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    arrays = load_safetensors(folder / PEFT_WEIGHTS_NAME)
    save_safetensors(folder / PEFT_WEIGHTS_NAME, arrays if tensors is None else tensors(arrays), {"format": "pt"})
    return folder


@pytest.mark.parametrize(("field", "value"), [
    ("use_dora", True),
    ("layers_to_transform", [0]),
    ("lora_bias", True),
    ("use_qalora", True),
    ("layer_replication", [[0, 1]]),
    ("trainable_token_indices", [1, 2]),
    ("some_future_feature", {"on": True}),
])  # fmt: skip
def test_load_refuses_an_unsupported_setting_by_name(tmp_path, field, value):
    folder = _write_adapter(tmp_path / "ad", {field: value})
    model = _mlp()
    with pytest.raises(ValueError, match=f"unsupported PEFT setting\\(s\\) {field}=") as info:
        load_peft_adapter(model, folder)
    assert "\n" not in str(info.value)
    assert not isinstance(model[0], nn.LoRALinear)  # nothing changed


@pytest.mark.parametrize(("field", "value"), [
    ("lora_dropout", 0.1), ("init_lora_weights", "gaussian"), ("use_dora", False), ("bias", "none"),
    ("fan_in_fan_out", True), ("task_type", "CAUSAL_LM"), ("some_future_feature", None), ("rank_pattern", {}),
])  # fmt: skip
def test_load_accepts_settings_that_do_not_change_the_maths(tmp_path, field, value):
    folder = _write_adapter(tmp_path / "ad", {field: value})
    model = load_peft_adapter(_mlp(), folder)
    assert isinstance(model[0], nn.LoRALinear)
    if field == "lora_dropout":
        assert model[0].dropout == 0.1


@pytest.mark.parametrize(("overrides", "match"), [
    ({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
    ({"r": 0}, r"adapter_config.json: r must be in \[1, inf\], got 0"),
    ({"r": 3}, r"needs lora_A of shape \(r, in\) = \(3, 4\)"),
    ({"lora_alpha": -1}, r"adapter_config.json: lora_alpha must be in \(0, inf\), got -1.0"),
    ({"use_rslora": "yes"}, "use_rslora must be True or False, got str 'yes'"),
    ({"target_modules": ["2"]}, "layer '0' does not match target_modules"),
    ({"target_modules": 3}, "target_modules must be None, a str or a list of str, got int 3"),
    ({"target_modules": ["0", 2]}, r"target_modules must hold module names \(str\), got \[2\]"),
    ({"target_modules": "(0|2"}, r"target_modules must be a valid regular expression, got '\(0\|2': missing \)"),
    ({"lora_dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
    ({"r": 2.0}, "r must be an integer, got float 2.0"),  # a TypeError as an argument, a ValueError in a file
    ({"lora_alpha": "5"}, "alpha must be a real number, got str '5'"),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out must be True or False, got int 1"),
])  # fmt: skip
def test_load_refuses_bad_config_values(tmp_path, overrides, match):
    """Every fault of the file is a ValueError naming it, in check_lora_config's and the matcher's words."""
    folder = _write_adapter(tmp_path / "ad", overrides)
    model = _mlp()
    with pytest.raises(ValueError, match=match) as info:
        load_peft_adapter(model, folder)
    assert str(info.value).startswith(str(folder))  # the file is named first
    assert not isinstance(model[0], nn.LoRALinear)  # nothing changed


def test_load_refuses_bad_weights(tmp_path):
    def rename(t):
        t["base_model.model.0.lora_magnitude_vector"] = np.ones(6)
        return t

    folder = _write_adapter(tmp_path / "a", tensors=rename)
    with pytest.raises(ValueError, match=re.escape("unsupported key(s) ['base_model.model.0.lora_magnitude_vector']")):
        load_peft_adapter(_mlp(), folder)

    def drop_b(t):
        del t["base_model.model.2.lora_B.weight"]
        return t

    folder = _write_adapter(tmp_path / "b", tensors=drop_b)
    with pytest.raises(ValueError, match=re.escape("layer '2' has no 'base_model.model.2.lora_B.weight'")):
        load_peft_adapter(_mlp(), folder)

    def nan(t):
        t["base_model.model.0.lora_A.weight"][0, 0] = np.nan
        return t

    folder = _write_adapter(tmp_path / "c", tensors=nan)
    with pytest.raises(ValueError, match="must hold finite floats"):
        load_peft_adapter(_mlp(), folder)

    folder = _write_adapter(tmp_path / "d")
    with pytest.raises(ValueError, match="adapts '2', which must be a Linear of model, got ReLU"):
        load_peft_adapter(nn.Sequential(nn.Linear(4, 6, dtype=np.float64), nn.ReLU(), nn.ReLU()), folder)
    with pytest.raises(ValueError, match="got no such module"):
        load_peft_adapter(nn.Sequential(nn.Linear(4, 6, dtype=np.float64)), folder)
    merged = _adapted()
    merged[0].merge()
    with pytest.raises(RuntimeError, match="merged LoRALinear"):
        load_peft_adapter(merged, folder)


def test_load_missing_truncated_or_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such adapter folder"):
        load_peft_adapter(_mlp(), tmp_path / "none")
    folder = _write_adapter(tmp_path / "a")
    weights = (folder / PEFT_WEIGHTS_NAME).read_bytes()
    (folder / PEFT_WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=re.escape("adapter_model.safetensors is not a readable .safetensors file")):
        load_peft_adapter(_mlp(), folder)
    (folder / PEFT_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("adapter_model.safetensors")):
        load_peft_adapter(_mlp(), folder)
    text = (folder / PEFT_CONFIG_NAME).read_text()
    (folder / PEFT_CONFIG_NAME).write_text(text[:40])
    with pytest.raises(ValueError, match=re.escape("adapter_config.json is not a readable JSON file")):
        load_peft_adapter(_mlp(), folder)
    (folder / PEFT_CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_peft_adapter(_mlp(), folder)
    (folder / PEFT_CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("adapter_config.json")):
        load_peft_adapter(_mlp(), folder)
    with pytest.raises(TypeError, match=re.escape("model must be a lowrank.nn.Module")):
        load_peft_adapter("model", folder)


def test_load_freezes_everything_but_the_loaded_factors_as_peft_does(tmp_path):
    model = _adapted()
    model[2] = model[2].base  # adapt layer 0 only
    save_peft_adapter(model, tmp_path / "ad")
    fresh = load_peft_adapter(_mlp(), tmp_path / "ad")
    trainable = sorted(k for k, p in fresh.named_parameters() if p.trainable)
    assert trainable == ["0.lora_A.weight", "0.lora_B.weight"]


def test_a_refused_load_leaves_the_model_untouched(tmp_path):
    def bad_shape(t):
        t["base_model.model.2.lora_B.weight"] = np.ones((5, 2))  # layer 2 is (3, 6): B must be (3, 2)
        return t

    folder = _write_adapter(tmp_path / "a", tensors=bad_shape)
    model = _mlp()
    before = {name: (p.data.copy(), p.trainable) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=re.escape("layer '2' needs lora_A")):
        load_peft_adapter(model, folder)
    after = dict(model.named_parameters())
    assert list(after) == list(before)  # no layer swapped in
    for name, (data, trainable) in before.items():
        assert after[name].trainable == trainable, f"{name} was frozen by a load that failed"
        assert np.array_equal(after[name].data, data)


def test_loaded_layers_draw_their_own_dropout_masks(tmp_path):
    def square():  # two layers of one shape, so equal streams would give equal masks
        return nn.Sequential(nn.Linear(4, 4, dtype=np.float64, random_state=0), nn.ReLU(),
                             nn.Linear(4, 4, dtype=np.float64, random_state=1))

    adapted = square()
    for i in (0, 2):
        adapted[i] = nn.LoRALinear(adapted[i], r=2, alpha=4, dropout=0.5, random_state=i)
    save_peft_adapter(adapted, tmp_path / "a")
    model = load_peft_adapter(square(), tmp_path / "a", random_state=7)
    masks = [model[i].generator.random(8) for i in (0, 2)]  # each layer's next draws
    assert not np.array_equal(masks[0], masks[1])
    again = load_peft_adapter(square(), tmp_path / "a", random_state=7)
    assert np.array_equal(again[0].generator.random(8), masks[0])  # and the same seed gives the same bits


def test_loading_is_injection_same_layers_same_draws_same_freezing(tmp_path):
    """load_peft_adapter builds its layers through inject_lora: the same generator draws,
    the same settings, the same freezing, then the file's factors."""
    adapted = _adapted(r=2, alpha=5.0)
    save_peft_adapter(adapted, tmp_path / "ad")
    loaded = load_peft_adapter(_mlp(), tmp_path / "ad", random_state=7)
    injected = nn.inject_lora(_mlp(), r=2, alpha=5.0, random_state=7)
    for i in (0, 2):
        a, b = loaded[i], injected[i]
        assert (a.r, a.alpha, a.scaling, a.dropout, a.use_rslora) == (b.r, b.alpha, b.scaling, b.dropout, b.use_rslora)
        np.testing.assert_array_equal(a.A.data, adapted[i].A.data)
        np.testing.assert_array_equal(a.B.data, adapted[i].B.data)
    assert loaded[0].generator.random(4).tolist() == injected[0].generator.random(4).tolist()
    flags = [(k, p.trainable) for k, p in loaded.named_parameters()]
    assert flags == [(k, p.trainable) for k, p in injected.named_parameters()]


def test_load_keeps_other_lora_layers_and_each_layers_mode(tmp_path):
    model = _adapted()
    model[2] = model[2].base  # the adapter holds layer 0 only
    save_peft_adapter(model, tmp_path / "ad")
    target = _mlp().eval()
    target[2] = nn.LoRALinear(target[2], r=1, alpha=1.0)  # not in the file: kept, and still trainable
    target[2].train()
    other_A = target[2].A
    load_peft_adapter(target, tmp_path / "ad")
    assert isinstance(target[0], nn.LoRALinear) and not target[0].training  # the mode of the Linear it wraps
    assert target[2].A is other_A and target[2].training
    trainable = sorted(k for k, p in target.named_parameters() if p.trainable)
    assert trainable == ["0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]


def test_load_into_the_model_itself(tmp_path):
    """A bare LoRALinear saves under the empty name; loading it into a bare Linear returns the new layer."""
    rng = np.random.default_rng(0)
    lin = nn.Linear(4, 3, dtype=np.float64, random_state=1)
    lora = nn.LoRALinear(lin, r=2, alpha=3.0, random_state=rng)
    lora.B.data = rng.standard_normal((3, 2))
    save_peft_adapter(lora, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / PEFT_CONFIG_NAME).read_text())
    assert config["target_modules"] == "^(?:)$"
    assert set(load_safetensors(tmp_path / "ad" / PEFT_WEIGHTS_NAME)) == {
        "base_model.model.lora_A.weight", "base_model.model.lora_B.weight"}
    fresh = nn.Linear(4, 3, dtype=np.float64, random_state=1)
    loaded = load_peft_adapter(fresh, tmp_path / "ad")
    assert isinstance(loaded, nn.LoRALinear) and loaded.base is fresh
    x = rng.standard_normal((5, 4))
    W = fresh.weight.data + 1.5 * lora.B.data @ lora.A.data  # alpha / r = 3 / 2, by hand
    np.testing.assert_allclose(loaded(x), x @ W.T + fresh.bias.data, rtol=1e-12, atol=1e-12)
    again = load_peft_adapter(loaded, tmp_path / "ad")  # an unmerged LoRALinear is swapped for a new one
    assert isinstance(again, nn.LoRALinear) and again is not loaded and again.base is fresh


def test_load_checks_random_state_before_changing_anything(tmp_path):
    folder = _write_adapter(tmp_path / "ad")
    model = _mlp()
    with pytest.raises(TypeError, match=r"random_state must be None, an int or a numpy\.random\.Generator"):
        load_peft_adapter(model, folder, random_state="seed")
    assert not isinstance(model[0], nn.LoRALinear)
