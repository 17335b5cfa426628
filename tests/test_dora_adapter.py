"""DoRA adapter folders without a model: the config, the magnitude's key, inspect and merge.

Adapters are written by hand (NumPy arrays, ``save_safetensors`` and JSON).
The merge is held against DoRA's merge written out here in float64:
``V = W + scaling·B@A``, ``W' = (m / ‖V‖_row)[:, None]·V`` with the row
norm by ``np.linalg.norm`` (not the package's overflow-safe one); PEFT's own
``merge_and_unload`` is held against it in
``tests/crosscheck/test_dora_peft_adapter.py``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lowrank.cli import main
from lowrank.io import save_safetensors
from lowrank.io.adapter import AdapterConfig, inspect_adapter, merge_adapter
from lowrank.io.safetensors import read_safetensors

P = "base_model.model."


def write_adapter(folder, config, tensors, dtypes=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"}, dtypes=dtypes)
    return folder


def dora_module(rng, name, r, n_in, n_out, magnitude_key="lora_magnitude_vector"):
    return {
        f"{P}{name}.lora_A.weight": rng.standard_normal((r, n_in)),
        f"{P}{name}.lora_B.weight": rng.standard_normal((n_out, r)),
        f"{P}{name}.{magnitude_key}": rng.uniform(0.5, 2.0, n_out),
    }


def dora_merge_by_hand(W, A, B, m, scaling):
    """DoRA's merge in float64, written out: V = W + s·B@A, each row of V rescaled to length m."""
    V = W + scaling * (B @ A)  # (out, in)
    return (m / np.linalg.norm(V, axis=1))[:, None] * V


# ---------------------------------------------------------------- the config


def test_use_dora_is_read_and_written_back_and_accepted_with_everything_peft_accepts():
    obj = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True, "use_rslora": True, "fan_in_fan_out": True,
        "lora_dropout": 0.1, "bias": "all", "rank_pattern": {"fc": 2}, "modules_to_save": ["head"],
        "lora_bias": False, "megatron_config": None,
    }  # fmt: skip
    config = AdapterConfig.from_json(obj, "x.json")
    assert config.use_dora is True
    assert config.to_json()["use_dora"] is True
    assert AdapterConfig.from_json(config.to_json(), "y.json") == config
    assert AdapterConfig.from_json({"peft_type": "LORA", "r": 4}, "x.json").use_dora is False
    assert AdapterConfig(r=2, alpha=2.0).to_json()["use_dora"] is False


@pytest.mark.parametrize(
    "clash",
    [
        {"lora_bias": True},
        {"megatron_config": {"tensor_model_parallel_size": 2}},
        {"alora_invocation_tokens": [3]},
        {"kasa_config": {"k": 1}},
        {"init_lora_weights": "mica"},
    ],
)
def test_use_dora_beside_what_peft_refuses_it_with_is_refused_naming_both(clash):
    with pytest.raises(ValueError) as info:
        AdapterConfig.from_json({"peft_type": "LORA", "r": 4, "use_dora": True, **clash}, "ad/adapter_config.json")
    message = str(info.value)
    ((field, value),) = clash.items()
    assert f"{field}={value!r}" in message
    assert message.startswith("ad/adapter_config.json: use_dora=True with ") and field in message
    assert "PEFT refuses DoRA" in message and "\n" not in message


# ---------------------------------------------------------------- inspect


def test_inspect_reports_the_magnitude_shape_of_each_dora_module(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tensors = {
        **dora_module(rng, "h.0.q", 4, 6, 5),
        **dora_module(rng, "h.1.q", 4, 6, 3, "lora_magnitude_vector.weight"),
    }
    folder = write_adapter(tmp_path / "ad", {"r": 4, "use_dora": True, "target_modules": ["q"]}, tensors)
    report = inspect_adapter(folder)
    assert report.passed, report.problems
    assert [m.shape_magnitude for m in report.modules] == [(5,), (3,)]
    assert report.to_json()["modules"][0]["shape_magnitude"] == [5]
    assert main(["adapter", "inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "use_dora=True" in out.splitlines()[0]
    assert out.splitlines()[1].split()[-1] == "m" and out.splitlines()[2].split()[-1] == "5"


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("wrong shape", "lora_magnitude_vector has shape (6,), but DoRA needs one value per row of lora_B, shape (5,)"),
        ("two-dimensional", "lora_magnitude_vector has shape (5, 1), but DoRA needs"),
        ("missing", "module 'h.0.q' has no lora_magnitude_vector, which use_dora=True needs"),
        ("use_dora off", "has lora_magnitude_vector, but the config's use_dora is false"),
        ("alone", "module 'h.1.q' has lora_magnitude_vector but no lora_A nor lora_B"),
        ("non-finite", "lora_magnitude_vector' holds non-finite values (1 of 5)"),
    ],
)
def test_inspect_flags_each_planted_dora_fault(tmp_path, capsys, fault, words):
    rng = np.random.default_rng(1)
    config = {"r": 4, "use_dora": True, "target_modules": ["q"]}
    tensors = dora_module(rng, "h.0.q", 4, 6, 5)
    key = f"{P}h.0.q.lora_magnitude_vector"
    if fault == "wrong shape":
        tensors[key] = np.ones(6)
    elif fault == "two-dimensional":
        tensors[key] = np.ones((5, 1))
    elif fault == "missing":
        del tensors[key]
    elif fault == "use_dora off":
        config["use_dora"] = False
    elif fault == "alone":
        tensors[f"{P}h.1.q.lora_magnitude_vector"] = np.ones(5)
    elif fault == "non-finite":
        tensors[key][2] = np.nan
    folder = write_adapter(tmp_path / "ad", config, tensors)
    report = inspect_adapter(folder)
    assert any(words in p for p in report.problems), report.problems
    assert main(["adapter", "inspect", str(folder)]) == 1
    assert any(line.startswith("problem: ") and words in line for line in capsys.readouterr().out.splitlines())
    with pytest.raises(ValueError, match="cannot merge"):  # the merge refuses what inspect flags
        save_safetensors(tmp_path / "base.safetensors", {"h.0.q.weight": np.ones((5, 6))})
        merge_adapter(tmp_path / "base.safetensors", folder, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------- merge


def test_dora_merge_equals_the_float64_formula_by_hand(tmp_path):
    rng = np.random.default_rng(2)
    W = {"fc1.weight": rng.standard_normal((5, 6)), "fc2.weight": rng.standard_normal((3, 5))}
    save_safetensors(tmp_path / "base.safetensors", {**W, "fc1.bias": rng.standard_normal(5)})
    tensors = {**dora_module(rng, "fc1", 4, 6, 5), **dora_module(rng, "fc2", 2, 5, 3)}
    config = {"r": 4, "lora_alpha": 6, "use_rslora": True, "use_dora": True, "rank_pattern": {"fc2": 2}}
    folder = write_adapter(tmp_path / "ad", config, tensors)
    merged = read_safetensors(merge_adapter(tmp_path / "base.safetensors", folder, tmp_path / "out.safetensors"))
    for name, r in (("fc1", 4), ("fc2", 2)):
        A, B = tensors[f"{P}{name}.lora_A.weight"], tensors[f"{P}{name}.lora_B.weight"]
        m = tensors[f"{P}{name}.lora_magnitude_vector"]
        want = dora_merge_by_hand(W[f"{name}.weight"], A, B, m, 6 / math.sqrt(r))
        np.testing.assert_allclose(merged[f"{name}.weight"], want, rtol=1e-14, atol=0)
        # every row of the merged weight has length m: the defining property of DoRA's merge
        np.testing.assert_allclose(np.linalg.norm(merged[f"{name}.weight"], axis=1), m, rtol=1e-14)


def test_dora_merge_with_fan_in_fan_out_and_an_embedding_scales_columns(tmp_path):
    rng = np.random.default_rng(3)
    W_conv = rng.standard_normal((6, 5))  # Conv1D: (in, out)
    W_emb = rng.standard_normal((11, 4))  # Embedding: (num_embeddings, dim)
    save_safetensors(tmp_path / "base.safetensors", {"c_attn.weight": W_conv, "wte.weight": W_emb})
    tensors = {
        **dora_module(rng, "c_attn", 2, 6, 5),
        f"{P}wte.lora_embedding_A": rng.standard_normal((2, 11)),  # (r, num)
        f"{P}wte.lora_embedding_B": rng.standard_normal((4, 2)),  # (dim, r)
        f"{P}wte.lora_magnitude_vector": rng.uniform(0.5, 2.0, 4),  # (dim,)
    }
    config = {"r": 2, "lora_alpha": 3, "use_dora": True, "fan_in_fan_out": True}
    folder = write_adapter(tmp_path / "ad", config, tensors)
    merged = read_safetensors(merge_adapter(tmp_path / "base.safetensors", folder, tmp_path / "out.safetensors"))
    layers = [
        ("c_attn", W_conv, ("lora_A.weight", "lora_B.weight")),
        ("wte", W_emb, ("lora_embedding_A", "lora_embedding_B")),
    ]
    for name, W, kind in layers:
        A, B, m = (
            tensors[f"{P}{name}.{kind[0]}"],
            tensors[f"{P}{name}.{kind[1]}"],
            tensors[f"{P}{name}.lora_magnitude_vector"],
        )
        want = dora_merge_by_hand(W.T, A, B, m, 1.5).T  # in the (out, in) layout, then back
        np.testing.assert_allclose(merged[f"{name}.weight"], want, rtol=1e-14, atol=0)


def test_dora_merge_rounds_once_to_float32(tmp_path):
    rng = np.random.default_rng(4)
    W = rng.standard_normal((5, 6)).astype(np.float32)
    save_safetensors(tmp_path / "base.safetensors", {"fc.weight": W})
    tensors = dora_module(rng, "fc", 3, 6, 5)
    folder = write_adapter(
        tmp_path / "ad", {"r": 3, "use_dora": True}, tensors, dtypes=dict.fromkeys(tensors, "float32")
    )
    merged = read_safetensors(merge_adapter(tmp_path / "base.safetensors", folder, tmp_path / "out.safetensors"))
    A, B, m = (tensors[k].astype(np.float32).astype(np.float64) for k in tensors)
    want = dora_merge_by_hand(W.astype(np.float64), A, B, m, 8 / 3).astype(np.float32)  # float64, rounded once
    np.testing.assert_array_equal(merged["fc.weight"], want)


def test_dora_merge_refuses_an_all_zero_row_and_writes_nothing(tmp_path, capsys):
    W = np.ones((3, 4))
    W[1] = 0.0
    save_safetensors(tmp_path / "base.safetensors", {"fc.weight": W})
    tensors = {
        f"{P}fc.lora_A.weight": np.ones((1, 4)),
        f"{P}fc.lora_B.weight": np.array([[1.0], [0.0], [1.0]]),  # row 1 of B @ A is zero too
        f"{P}fc.lora_magnitude_vector": np.ones(3),
    }
    folder = write_adapter(tmp_path / "ad", {"r": 1, "use_dora": True}, tensors)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=r"'fc\.weight'.*all-zero row 1 \(norm 0\)") as info:
        merge_adapter(tmp_path / "base.safetensors", folder, out)
    assert "\n" not in str(info.value) and not out.exists()
    assert main(["adapter", "merge", str(tmp_path / "base.safetensors"), str(folder), str(out)]) == 2
    assert "all-zero row 1" in capsys.readouterr().err and not out.exists()


def test_dora_merge_of_weights_near_the_float64_limit_is_exact(tmp_path):
    # ‖V‖ of rows near 1e200 overflows a naive sqrt(sum(V**2)); the merged rows still have length m
    rng = np.random.default_rng(5)
    W = rng.standard_normal((3, 4)) * 1e200
    save_safetensors(tmp_path / "base.safetensors", {"fc.weight": W})
    tensors = dora_module(rng, "fc", 2, 4, 3)
    folder = write_adapter(tmp_path / "ad", {"r": 2, "use_dora": True}, tensors)
    merged = read_safetensors(merge_adapter(tmp_path / "base.safetensors", folder, tmp_path / "out.safetensors"))
    m = tensors[f"{P}fc.lora_magnitude_vector"]
    want = W / 1e200 * (m / np.linalg.norm(W / 1e200, axis=1))[:, None]  # s·B@A is nothing next to 1e200
    np.testing.assert_allclose(merged["fc.weight"], want, rtol=1e-14)


# ---------------------------------------------------------------- loading into and saving from a model


def mlp():
    from lowrank import nn

    return nn.Sequential(nn.Linear(6, 5, dtype=np.float64, random_state=0), nn.ReLU(),
                         nn.Linear(5, 3, dtype=np.float64, random_state=1))  # fmt: skip


def test_a_saved_dora_adapter_loads_back_with_the_same_outputs_and_peft_keys(tmp_path):
    from lowrank import nn
    from lowrank.io import load_peft_adapter, save_peft_adapter

    model = nn.inject_lora(mlp(), r=2, alpha=3, use_dora=True, random_state=0)
    rng = np.random.default_rng(6)
    for name, p in model.named_parameters():
        if name.endswith(("lora_B.weight", "lora_magnitude_vector")):
            p.data = p.data + rng.standard_normal(p.shape)
    folder = save_peft_adapter(model, tmp_path / "ad")
    stored = read_safetensors(folder / "adapter_model.safetensors")
    assert set(stored) == {
        f"{P}{i}.{k}" for i in ("0", "2") for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    }
    params = dict(model.named_parameters())
    np.testing.assert_array_equal(stored[f"{P}2.lora_magnitude_vector"], params["2.lora_magnitude_vector"].data)
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True

    loaded = load_peft_adapter(mlp(), folder).eval()
    model.eval()
    x = rng.standard_normal((4, 6))
    np.testing.assert_array_equal(loaded(x), model(x))
    assert all(layer.use_dora for layer in (loaded[0], loaded[2]))
    trainable = {n for n, p in loaded.named_parameters() if p.trainable}
    assert trainable == {
        f"{i}.{k}" for i in ("0", "2") for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    }


def test_saving_layers_that_disagree_on_use_dora_is_refused(tmp_path):
    from lowrank import nn
    from lowrank.io import save_peft_adapter

    model = mlp()
    model[0] = nn.LoRALinear(model[0], r=2, alpha=2, use_dora=True)
    model[2] = nn.LoRALinear(model[2], r=2, alpha=2)
    with pytest.raises(ValueError, match=r"must share use_rslora, dropout and use_dora.*use_dora=True.*use_dora=False"):
        save_peft_adapter(model, tmp_path / "ad")


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("missing", "layer '0' has no 'base_model.model.0.lora_magnitude_vector', which use_dora=True"),
        ("use_dora off", "is DoRA's magnitude, but adapter_config.json has use_dora false"),
        ("wrong shape", "needs 'base_model.model.0.lora_magnitude_vector' of shape (out,) = (5,), got (6,)"),
        ("non-finite", "'base_model.model.0.lora_magnitude_vector' must hold finite floats"),
        ("embedding", "is an Embedding with DoRA (use_dora): lowrank has no DoRA Embedding layer"),
    ],
)
def test_loading_refuses_each_dora_fault_and_changes_nothing(tmp_path, fault, words):
    from lowrank import nn
    from lowrank.io import load_peft_adapter

    rng = np.random.default_rng(7)
    config = {"r": 2, "use_dora": True, "target_modules": ["0"]}
    tensors = dora_module(rng, "0", 2, 6, 5)
    key = f"{P}0.lora_magnitude_vector"
    if fault == "missing":
        del tensors[key]
    elif fault == "use_dora off":
        config["use_dora"] = False
    elif fault == "wrong shape":
        tensors[key] = np.ones(6)
    elif fault == "non-finite":
        tensors[key][0] = np.inf
    elif fault == "embedding":
        tensors = {
            f"{P}0.lora_embedding_A": np.ones((2, 6)),
            f"{P}0.lora_embedding_B": np.ones((5, 2)),
            key: np.ones(5),
        }
    model = nn.Sequential(nn.Embedding(6, 5, random_state=0)) if fault == "embedding" else mlp()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_peft_adapter(model, write_adapter(tmp_path / "ad", config, tensors))
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not isinstance(model[0], (nn.LoRALinear, nn.LoRAEmbedding))
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())
