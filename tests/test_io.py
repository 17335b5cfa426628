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
    with pytest.raises(ValueError, match="adapts '2', which must be a Linear or a Conv1D of model, got ReLU"):
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


# ---------------------------------------------------------------- PEFT's fields, from hand-written files
# Each adapter below is written here with NumPy and JSON alone (no save_peft_adapter), and the
# expected output is computed here in float64 from the same numbers.


def _relu_mlp(dtype=np.float64):
    """Linear layers at "0", "2", "4" (4 -> 6 -> 5 -> 3)."""
    return nn.Sequential(nn.Linear(4, 6, dtype=dtype, random_state=0), nn.ReLU(),
                         nn.Linear(6, 5, dtype=dtype, random_state=1), nn.ReLU(),
                         nn.Linear(5, 3, dtype=dtype, random_state=2))


def _dyadic(rng, shape):
    """Multiples of 1/8 in [-2, 2]: exact in bfloat16, float16 and float32, so every file dtype holds them."""
    return rng.integers(-16, 17, shape).astype(np.float64) / 8


def _hand_written_adapter(folder, file_dtype, bias):
    """r=2, lora_alpha=4, rank_pattern {"2": 3}, alpha_pattern {"0": 1}, modules_to_save ["4"], as PEFT writes it."""
    rng = np.random.default_rng(5)
    t = {"0.lora_A.weight": _dyadic(rng, (2, 4)), "0.lora_B.weight": _dyadic(rng, (6, 2)),
         "2.lora_A.weight": _dyadic(rng, (3, 6)), "2.lora_B.weight": _dyadic(rng, (5, 3)),
         "4.weight": _dyadic(rng, (3, 5)), "4.bias": _dyadic(rng, (3,))}
    if bias != "none":
        t["0.base_layer.bias"], t["2.base_layer.bias"] = _dyadic(rng, (6,)), _dyadic(rng, (5,))
    folder.mkdir()
    cast = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}[file_dtype]
    save_safetensors(folder / PEFT_WEIGHTS_NAME, {f"base_model.model.{k}": v.astype(cast) for k, v in t.items()},
                     {"format": "pt"}, dtypes="bfloat16" if file_dtype == "bfloat16" else None)
    config = {"peft_type": "LORA", "task_type": None, "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
              "target_modules": ["0", "2"], "rank_pattern": {"2": 3}, "alpha_pattern": {"0": 1},
              "bias": bias, "modules_to_save": ["4"], "fan_in_fan_out": False, "use_rslora": False}
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    return t


@pytest.mark.parametrize("file_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_a_hand_written_adapter_with_patterns_bias_and_modules_to_save_gives_the_hand_output(
        tmp_path, file_dtype, bias):
    t = _hand_written_adapter(tmp_path / "ad", file_dtype, bias)
    model = _relu_mlp()
    W = {i: model[i].weight.data.copy() for i in (0, 2)}
    b = {i: model[i].bias.data.copy() for i in (0, 2)}
    load_peft_adapter(model, tmp_path / "ad")
    assert (model[0].r, model[0].alpha, model[2].r, model[2].alpha) == (2, 1.0, 3, 4.0)
    x = np.random.default_rng(0).standard_normal((7, 4))
    h = x
    for i, scaling in ((0, 1.0 / 2), (2, 4.0 / 3)):  # alpha / r per layer, from the patterns
        bias_i = t[f"{i}.base_layer.bias"] if bias != "none" else b[i]
        h = np.maximum(h @ (W[i] + scaling * t[f"{i}.lora_B.weight"] @ t[f"{i}.lora_A.weight"]).T + bias_i, 0.0)
    h = h @ t["4.weight"].T + t["4.bias"]  # the saved module, whole
    np.testing.assert_allclose(model(x), h, rtol=1e-12, atol=1e-12)
    trainable = sorted(k for k, p in model.named_parameters() if p.trainable)
    biases = {"none": [], "lora_only": ["0.bias", "2.bias"], "all": ["0.bias", "2.bias"]}[bias]
    assert trainable == sorted([f"{i}.lora_{f}.weight" for i in (0, 2) for f in "AB"] + biases + ["4.bias", "4.weight"])


@pytest.mark.parametrize("file_dtype", ["float16", "bfloat16"])
def test_half_precision_files_load_exactly_into_float32_layers(tmp_path, file_dtype):
    t = _hand_written_adapter(tmp_path / "ad", file_dtype, "none")
    model = load_peft_adapter(_relu_mlp(np.float32), tmp_path / "ad")
    assert model[0].A.dtype == np.float32 and model[4].weight.dtype == np.float32
    np.testing.assert_array_equal(model[2].B.data, t["2.lora_B.weight"])  # every bf16/fp16 value is a float32


def test_save_writes_patterns_bias_and_modules_to_save_under_peft_names(tmp_path):
    model = nn.inject_lora(_relu_mlp(), r={"0": 2, "2": 3}, alpha={"0": 1.0, "2": 4.0}, targets=["0", "2"],
                           bias="all", modules_to_save=["4"], random_state=0)
    rng = np.random.default_rng(1)
    for i in (0, 2):
        model[i].B.data = rng.standard_normal(model[i].B.shape)
        model[i].bias.data = rng.standard_normal(model[i].bias.shape)
    model[4].weight.data = rng.standard_normal((3, 5))
    save_peft_adapter(model, tmp_path / "ad", bias="all", modules_to_save=["4"])
    config = json.loads((tmp_path / "ad" / PEFT_CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (
        2, 1.0, {"2": 3}, {"2": 4.0})
    assert (config["bias"], config["modules_to_save"], config["target_modules"]) == ("all", ["4"], ["0", "2"])
    stored = load_safetensors(tmp_path / "ad" / PEFT_WEIGHTS_NAME)
    assert set(stored) == {f"base_model.model.{k}" for k in (
        "0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight",
        "0.base_layer.bias", "2.base_layer.bias", "4.weight", "4.bias")}
    np.testing.assert_array_equal(stored["base_model.model.4.weight"], model[4].weight.data)
    fresh = load_peft_adapter(_relu_mlp(), tmp_path / "ad")
    x = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(fresh(x), model(x))
    with pytest.raises(ValueError, match=r"modules_to_save names '9', which is not a module"):
        save_peft_adapter(model, tmp_path / "b", modules_to_save=["9"])
    with pytest.raises(ValueError, match=r"modules_to_save names '0', which is adapted"):
        save_peft_adapter(model, tmp_path / "b", modules_to_save=["0"])
    with pytest.raises(ValueError, match="bias must be one of"):
        save_peft_adapter(model, tmp_path / "b", bias="some")
    assert not (tmp_path / "b").exists()


def test_save_pattern_keys_select_one_layer_under_peft_rule(tmp_path):
    # "0" and "1.0" both adapted with different ranks: the key for "0" must not also match "1.0"
    model = nn.Sequential(nn.Linear(4, 4, dtype=np.float64), _mlp())
    nn.inject_lora(model, r={"0": 1, "1.0": 2, "1.2": 2}, alpha=2.0, targets=["0", "1.0", "1.2"], random_state=0)
    save_peft_adapter(model, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / PEFT_CONFIG_NAME).read_text())
    assert config["r"] == 2 and config["rank_pattern"] == {"^0": 1}
    loaded = load_peft_adapter(nn.Sequential(nn.Linear(4, 4, dtype=np.float64), _mlp()), tmp_path / "ad")
    assert (loaded[0].r, loaded[1][0].r, loaded[1][2].r) == (1, 2, 2)


def test_load_refuses_file_tensors_the_config_does_not_train(tmp_path):
    _hand_written_adapter(tmp_path / "ad", "float32", "none")
    config = json.loads((tmp_path / "ad" / PEFT_CONFIG_NAME).read_text())
    config["modules_to_save"] = None
    (tmp_path / "ad" / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"key 'base_model.model.4.bias' is neither a LoRA factor nor a tensor"):
        load_peft_adapter(_relu_mlp(), tmp_path / "ad")


def test_a_pickled_adapter_is_refused_with_how_to_convert(tmp_path):
    folder = _write_adapter(tmp_path / "ad")
    (folder / PEFT_WEIGHTS_NAME).rename(folder / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin is a pickle file.*safetensors"):
        load_peft_adapter(_mlp(), folder)


# ---------------------------------------------------------------- an adapter is a unit (issue 15, item 1)


def test_a_crash_between_the_two_writes_leaves_the_old_adapter_intact_and_loadable(tmp_path, monkeypatch):
    import lowrank.io.peft as peft_io

    old = _adapted(alpha=5.0)
    save_peft_adapter(old, tmp_path / "ad")
    (tmp_path / "ad" / "README.md").write_text("kept")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("killed between the weights and the config")

    monkeypatch.setattr(peft_io, "save_json", crash)  # the second write of a save
    with pytest.raises(OSError, match="killed"):
        save_peft_adapter(_adapted(seed=3, alpha=7.0), tmp_path / "ad")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary folder left behind
    monkeypatch.undo()
    loaded = load_peft_adapter(_mlp(), tmp_path / "ad")
    x = np.random.default_rng(0).standard_normal((3, 4))
    np.testing.assert_array_equal(loaded(x), old(x))
    save_peft_adapter(_adapted(seed=3, alpha=7.0), tmp_path / "ad")  # a save that completes replaces both
    assert (tmp_path / "ad" / "README.md").read_text() == "kept"
    assert load_peft_adapter(_mlp(), tmp_path / "ad")[0].alpha == 7.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_weights_beside_another_adapters_config_are_refused(tmp_path):
    save_peft_adapter(_adapted(alpha=5.0), tmp_path / "a")
    save_peft_adapter(_adapted(seed=1, alpha=7.0), tmp_path / "b")  # same shapes: only the digest tells them apart
    (tmp_path / "a" / PEFT_WEIGHTS_NAME).write_bytes((tmp_path / "b" / PEFT_WEIGHTS_NAME).read_bytes())
    model = _mlp()
    with pytest.raises(ValueError, match=r"was saved with another adapter_config.json than the one beside it") as info:
        load_peft_adapter(model, tmp_path / "a")
    assert "\n" not in str(info.value) and not isinstance(model[0], nn.LoRALinear)
    config = json.loads((tmp_path / "b" / PEFT_CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = "elsewhere"  # bookkeeping: not part of the digest
    (tmp_path / "b" / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    assert load_peft_adapter(_mlp(), tmp_path / "b")[0].alpha == 7.0


def test_save_refuses_a_path_that_is_a_file(tmp_path):
    (tmp_path / "ad").write_text("x")
    with pytest.raises(NotADirectoryError, match="it is a file"):
        save_peft_adapter(_adapted(), tmp_path / "ad")


# ---------------------------------------------------------------- hostile patterns (issue 15, item 2)


class _Box(nn.Module):
    """One Linear under a 28-character name."""

    NAME = "a" * 28

    def __init__(self):
        super().__init__()
        setattr(self, self.NAME, nn.Linear(2, 2, dtype=np.float64, random_state=0))

    def forward(self, x):
        return getattr(self, self.NAME)(x)


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern", "alpha_pattern"])
def test_a_catastrophic_regex_is_refused_before_it_runs(tmp_path, field):
    """'(a*)*b' against the 28-character name takes seconds in Python's re, doubling per character:
    refused before any match (without the check this test hangs)."""
    folder = tmp_path / "ad"
    folder.mkdir()
    name = _Box.NAME
    save_safetensors(folder / PEFT_WEIGHTS_NAME, {f"base_model.model.{name}.lora_A.weight": np.ones((1, 2)),
                                                  f"base_model.model.{name}.lora_B.weight": np.ones((2, 1))})
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [name]}
    config["target_modules" if field == "target_modules" else field] = (
        "(a*)*b" if field == "target_modules" else {"(a*)*b": 2})
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config.json: .*'\(a\*\)\*b' repeats a group") as info:
        load_peft_adapter(_Box(), folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("pattern", ["(a*)*b", "(a+)+", "(a|a)*", "(?:x?)+y", "((ab)*c)+", "(a|b){2,}",
                                     ".*a.*b.*c.*d"])
def test_check_regex_is_safe_refuses_nested_repeats(pattern):
    from lowrank.io.peft import check_regex_is_safe

    with pytest.raises(ValueError, match="target_modules"):
        check_regex_is_safe(pattern, "target_modules")


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|v_proj)", r"layers\.\d+\.attn\.(q|v)", "[(]*a", r"\(a*\)*",
                                     "a{2}", "(ab)*", "(a|b)?", r"^(?:0|2\.fc)$", "x{", "(?P<n>a)+"])
def test_check_regex_is_safe_accepts_the_usual_patterns(pattern):
    from lowrank.io.peft import check_regex_is_safe

    check_regex_is_safe(pattern, "target_modules")


def test_load_looks_names_up_in_the_model_before_matching(tmp_path):
    folder = _write_adapter(tmp_path / "ad", {"target_modules": "9"})  # matches neither "0" nor "2"
    with pytest.raises(ValueError, match="adapts '0', which must be a Linear or a Conv1D of model, got ReLU"):
        load_peft_adapter(nn.Sequential(nn.ReLU()), folder)


def test_modules_to_save_that_selects_an_adapted_layer_is_refused_before_any_change(tmp_path):
    _hand_written_adapter(tmp_path / "ad", "float32", "none")
    config = json.loads((tmp_path / "ad" / PEFT_CONFIG_NAME).read_text())
    config["modules_to_save"] = ["4", "2"]
    (tmp_path / "ad" / PEFT_CONFIG_NAME).write_text(json.dumps(config))
    model = _relu_mlp()
    with pytest.raises(ValueError, match=r"modules_to_save \['4', '2'\] selects \['2'\], which the adapter adapts"):
        load_peft_adapter(model, tmp_path / "ad")
    assert not any(isinstance(m, nn.LoRALinear) for m in model.modules())
