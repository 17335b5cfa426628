"""lowrank.io.adapter and ``lowrank adapter``: PEFT adapter folders read, inspected and merged without a model.

Adapters are written by hand here (NumPy arrays, ``save_safetensors`` and
JSON), with the faults planted on purpose; merges are held against a merge
written out in the test in float64, and bfloat16 against a rounding written
in the test with ``frexp`` / ``rint`` (not the package's bit arithmetic).
PEFT's own functions are held against the same tables in
``tests/crosscheck/test_adapter_merge.py``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowrank.cli import main
from lowrank.io import save_safetensors
from lowrank.io.adapter import (
    AdapterConfig,
    LayerSettings,
    inspect_adapter,
    match_pattern_key,
    match_target_modules,
    merge_adapter,
    parse_adapter_keys,
    read_adapter,
)
from lowrank.io.safetensors import read_safetensors, read_safetensors_header

P = "base_model.model."


def write_adapter(folder, config, tensors, dtypes=None):
    """An adapter folder, written by hand: the config's JSON and the tensors' safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"}, dtypes=dtypes)
    return folder


def lora_pair(rng, name, r, n_in, n_out, scale=1.0):
    return {
        f"{P}{name}.lora_A.weight": rng.standard_normal((r, n_in)) * scale,
        f"{P}{name}.lora_B.weight": rng.standard_normal((n_out, r)) * scale,
    }


def round_bf16(x):
    """float64 -> the nearest bfloat16 value (ties to even), as float64: 8 significant bits by frexp/rint.

    Below bfloat16's smallest normal number, 2**-126, the spacing stays 2**-133 (subnormals).
    """
    x = np.asarray(x, np.float64)
    mantissa, exponent = np.frexp(x)  # x = m·2^e, 0.5 <= |m| < 1
    normal = np.ldexp(np.rint(mantissa * 256.0), exponent - 8)  # rint rounds half to even
    subnormal = np.rint(x * 2.0**133) * 2.0**-133  # both products exact in float64
    return np.where(np.abs(x) < 2.0**-126, subnormal, normal)


def raw_bytes(path, name):
    header = read_safetensors_header(path)
    info = header.tensors[name]
    with open(path, "rb") as f:
        f.seek(header.data_start + info.begin)
        return info.dtype, f.read(info.end - info.begin)


# ---------------------------------------------------------------- the config

FULL = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 16,
    "use_rslora": True,
    "lora_dropout": 0.05,
    "target_modules": ["c_attn", "c_proj"],
    "fan_in_fan_out": True,
    "bias": "lora_only",
    "modules_to_save": ["score"],
    "rank_pattern": {"h.1.attn.c_attn": 4, "c_proj": 2},
    "alpha_pattern": {"c_proj": 1.5},
    # bookkeeping and initialization: ignored even when set
    "task_type": "CAUSAL_LM",
    "init_lora_weights": "gaussian",
    "peft_version": "0.13.0",
    "use_dora": False,
    "layers_to_transform": None,
    "lora_bias": False,
}


def test_config_reads_every_field_and_writes_them_back():
    config = AdapterConfig.from_json(FULL, "x.json")
    assert (config.r, config.alpha, config.use_rslora, config.dropout) == (8, 16.0, True, 0.05)
    assert config.target_modules == ("c_attn", "c_proj")
    assert config.fan_in_fan_out is True and config.bias == "lora_only"
    assert config.modules_to_save == ("score",)
    assert config.rank_pattern == {"h.1.attn.c_attn": 4, "c_proj": 2}
    assert config.alpha_pattern == {"c_proj": 1.5}
    assert config.raw == FULL
    assert AdapterConfig.from_json(config.to_json(), "y.json") == config


def test_config_defaults_are_peft_defaults():
    config = AdapterConfig.from_json({"peft_type": "LORA", "r": 4}, "x.json")
    assert config == AdapterConfig(r=4, alpha=8.0)
    assert (config.use_rslora, config.fan_in_fan_out, config.bias) == (False, False, "none")
    assert (config.target_modules, config.modules_to_save, config.rank_pattern) == (None, (), {})


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"peft_type": "LOKR"}, "peft_type must be 'LORA'"),
        ({"r": 0}, "r must be in [1, inf]"),
        ({"r": 2.5}, "r must be an integer"),
        ({"r": True}, "r must be an integer"),
        ({"lora_alpha": 0}, "lora_alpha must be in (0"),
        ({"lora_alpha": "8"}, "lora_alpha must be"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
        ({"use_rslora": 1}, "use_rslora must be True or False"),
        ({"fan_in_fan_out": "yes"}, "fan_in_fan_out must be True or False"),
        ({"bias": "some"}, "bias must be one of 'none', 'all', 'lora_only'"),
        ({"target_modules": 5}, "target_modules must be None, a str or a list of str"),
        ({"target_modules": "(q"}, "target_modules must be a valid regular expression"),
        ({"target_modules": ["q", 1]}, "target_modules must hold module names"),
        ({"modules_to_save": "score"}, "modules_to_save must be None or a list"),
        ({"rank_pattern": ["q"]}, "rank_pattern must be a map"),
        ({"rank_pattern": {"(q": 2}}, "rank_pattern key must be a valid regular expression"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern['q'] must be in [1, inf]"),
        ({"alpha_pattern": {"q": -1.0}}, "alpha_pattern['q'] must be in (0"),
        ({"use_dora": 1}, "use_dora must be True or False"),
        ({"use_dora": True, "lora_bias": True}, "use_dora=True with lora_bias=True: PEFT refuses DoRA together"),
        ({"use_dora": True, "megatron_config": {"tp": 2}}, "use_dora=True with megatron_config={'tp': 2}: PEFT"),
        ({"use_dora": True, "use_bdlora": {"x": 1}}, "use_dora=True with use_bdlora={'x': 1}: PEFT refuses"),
        ({"layers_to_transform": [0]}, "unsupported PEFT setting(s) layers_to_transform=[0]"),
        ({"lora_bias": True}, "unsupported PEFT setting(s) lora_bias=True"),
    ],
)
def test_config_refuses_each_bad_field_in_one_line_naming_the_file(change, words):
    with pytest.raises(ValueError) as info:
        AdapterConfig.from_json({**FULL, **change}, "ad/adapter_config.json")
    message = str(info.value)
    assert message.startswith("ad/adapter_config.json") and words in message and "\n" not in message


def test_config_refuses_what_is_not_an_object():
    with pytest.raises(ValueError, match=r"^c\.json must hold a JSON object"):
        AdapterConfig.from_json([1], "c.json")


# PEFT's get_pattern_key: (keys in file order, module name) -> the key that applies, by hand.
PATTERN_TABLE = [
    (["c_attn"], "transformer.h.0.attn.c_attn", "c_attn"),  # a dotted suffix
    (["transformer.h.0.attn.c_attn"], "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_attn"),  # whole name
    (["attn"], "transformer.h.0.attn.c_attn", None),  # not a suffix
    (["c_attn"], "transformer.h.0.attn.xc_attn", None),  # a suffix, but not after a dot
    (["h.1.attn.c_attn"], "transformer.h.1.attn.c_attn", "h.1.attn.c_attn"),
    (["h.1.attn.c_attn"], "transformer.h.11.attn.c_attn", None),
    (["c_attn", "h.1.attn.c_attn"], "transformer.h.1.attn.c_attn", "c_attn"),  # first wins, not longest
    (["h.1.attn.c_attn", "c_attn"], "transformer.h.1.attn.c_attn", "h.1.attn.c_attn"),
    ([r"h\.\d\.attn\.c_attn"], "transformer.h.3.attn.c_attn", r"h\.\d\.attn\.c_attn"),  # a regular expression
    (["q|v"], "layers.0.self_attn.v", "q|v"),
    (["q|v"], "layers.0.self_attn.k", None),
    ([], "layers.0.q", None),
]


@pytest.mark.parametrize(("keys", "name", "expected"), PATTERN_TABLE)
def test_pattern_keys_match_as_peft_matches(keys, name, expected):
    assert match_pattern_key(keys, name) == expected


def test_settings_apply_rank_and_alpha_patterns_independently_and_rslora():
    config = AdapterConfig.from_json(FULL, "x.json")
    assert config.settings_for("transformer.h.1.attn.c_attn") == LayerSettings(4, 16.0, True)
    assert config.settings_for("transformer.h.0.attn.c_attn") == LayerSettings(8, 16.0, True)
    assert config.settings_for("transformer.h.0.attn.c_proj") == LayerSettings(2, 1.5, True)
    assert config.settings_for("transformer.h.0.attn.c_proj").scaling == 1.5 / math.sqrt(2)
    assert LayerSettings(4, 8.0, False).scaling == 2.0


TARGET_TABLE = [
    (["q", "v"], "layers.0.attn.q", True),
    (["q", "v"], "layers.0.attn.qq", False),
    (["fc"], "fc", True),
    (["attn.q"], "layers.0.attn.q", True),
    (r"layers\.\d+\.attn\.(q|v)", "layers.0.attn.v", True),
    (r"layers\.\d+\.attn\.(q|v)", "x.layers.0.attn.v", False),  # a string matches the whole name
    (None, "anything", True),
    ("all-linear", "anything", True),
]


@pytest.mark.parametrize(("targets", "name", "expected"), TARGET_TABLE)
def test_target_modules_match_as_peft_matches(targets, name, expected):
    assert match_target_modules(targets, name) is expected


def test_modules_to_save_match_a_plain_suffix_of_the_module_or_a_parent():
    config = AdapterConfig.from_json({"peft_type": "LORA", "r": 2, "modules_to_save": ["score"]}, "x")
    assert config.saves_module("score.weight") and config.saves_module("model.score.weight")
    assert config.saves_module("classifier_score.weight")  # PEFT: key.endswith(target_key)
    assert not config.saves_module("lm_head.weight")


def test_key_grammar():
    layout = parse_adapter_keys([
        f"{P}h.0.attn.c_attn.lora_A.weight",
        f"{P}h.0.attn.c_attn.lora_B.weight",
        f"{P}wte.lora_embedding_A",
        f"{P}wte.lora_embedding_B",
        f"{P}h.0.attn.c_attn.base_layer.bias",
        f"{P}score.weight",
        f"{P}lora_A.weight",
        f"{P}h.0.attn.c_attn.lora_magnitude_vector",
        f"{P}h.0.attn.c_attn.lora_E",
        f"{P}fc.lora_magnitude_vector.weight",  # PEFT loads it with ".weight" too
        f"{P}wte.lora_magnitude_vector",
        f"{P}wte.lora_magnitude_vector.weight",  # the magnitude twice
        "h.0.attn.c_attn.lora_A.weight",
    ])  # fmt: skip
    assert set(layout.factors) == {"h.0.attn.c_attn", "wte", "", "fc"}
    assert layout.factors["wte"].embedding and not layout.factors["h.0.attn.c_attn"].embedding
    assert layout.factors[""].B is None and layout.factors[""].magnitude is None
    assert layout.factors["h.0.attn.c_attn"].magnitude == f"{P}h.0.attn.c_attn.lora_magnitude_vector"
    assert layout.factors["wte"].magnitude == f"{P}wte.lora_magnitude_vector"
    fc = layout.factors["fc"]
    assert (fc.A, fc.B, fc.magnitude) == (None, None, f"{P}fc.lora_magnitude_vector.weight")
    assert layout.full == {
        "h.0.attn.c_attn.bias": f"{P}h.0.attn.c_attn.base_layer.bias",
        "score.weight": f"{P}score.weight",
    }
    assert layout.unknown == (
        f"{P}h.0.attn.c_attn.lora_E",
        f"{P}wte.lora_magnitude_vector.weight",
        "h.0.attn.c_attn.lora_A.weight",
    )


# ---------------------------------------------------------------- reading


def test_read_adapter_turns_bf16_and_f16_into_float32_exactly_and_keeps_what_was_stored(tmp_path):
    rng = np.random.default_rng(0)
    tensors = lora_pair(rng, "fc", 2, 5, 3)
    a_key, b_key = list(tensors)
    folder = write_adapter(tmp_path / "ad", {"r": 2}, tensors, dtypes={a_key: "bfloat16", b_key: "float16"})
    adapter = read_adapter(folder)
    assert adapter.dtypes == {a_key: "BF16", b_key: "F16"}
    assert adapter.metadata == {"format": "pt"}
    assert adapter.tensors[a_key].dtype == np.float32 and adapter.tensors[b_key].dtype == np.float32
    np.testing.assert_array_equal(adapter.tensors[a_key], round_bf16(tensors[a_key]))
    np.testing.assert_array_equal(adapter.tensors[b_key], tensors[b_key].astype(np.float16))
    assert read_adapter(folder, dtype="keep").tensors[b_key].dtype == np.float16
    assert read_adapter(folder, dtype="float64").tensors[a_key].dtype == np.float64


def test_read_adapter_refuses_a_pickle_and_says_how_to_convert(tmp_path):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match=r"is a pickle file.*save_file.*safe_serialization=True") as info:
        read_adapter(folder)
    assert "\n" not in str(info.value)


def test_read_adapter_missing_folder_and_bad_dtype(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such adapter folder"):
        read_adapter(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype must be one of"):
        read_adapter(tmp_path, dtype="bfloat16")


# ---------------------------------------------------------------- inspect


def test_inspect_describes_each_module_and_computes_the_norm_of_the_update(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {**lora_pair(rng, "h.0.q", 4, 6, 5), **lora_pair(rng, "h.1.q", 2, 6, 5)}
    tensors[f"{P}h.1.q.lora_B.weight"][:] = 0.0
    config = {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q"], "rank_pattern": {"h.1.q": 2}}
    report = inspect_adapter(write_adapter(tmp_path / "ad", config, tensors))
    assert report.passed and report.problems == []
    first, second = report.modules
    assert (first.name, first.r, first.alpha, first.scaling) == ("h.0.q", 4, 8.0, 8 / math.sqrt(4))
    assert (first.shape_A, first.shape_B, first.dtype, first.b_zero) == ((4, 6), (5, 4), "F64", False)
    A, B = tensors[f"{P}h.0.q.lora_A.weight"], tensors[f"{P}h.0.q.lora_B.weight"]
    assert first.norm == pytest.approx(np.linalg.norm(4.0 * (B @ A)), rel=1e-12)  # the product, formed
    assert (second.r, second.scaling, second.b_zero, second.norm) == (2, 8 / math.sqrt(2), True, 0.0)
    assert json.loads(json.dumps(report.to_json()))["modules"][1]["b_zero"] is True
    assert "consistent" in report.format()


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("r mismatch", "whose rank 3 disagrees with the config's r = 4"),
        ("rank_pattern mismatch", "whose rank 4 disagrees with the config's rank_pattern = 2"),
        ("missing B", "has lora_A but no lora_B"),
        ("missing A", "has lora_B but no lora_A"),
        ("zero-size", "is empty (shape (0, 6))"),
        ("outside targets", "module 'h.0.k' does not match target_modules ('q',)"),
        ("non-finite", "holds non-finite values (1 of 24)"),
        ("unknown key", "is not a LoRA tensor in PEFT's form"),
        (
            "stray full tensor",
            "is neither a LoRA factor, a bias the config trains (bias='none') nor in modules_to_save",
        ),
        ("A and B disagree", "with the same r, got (4, 6) and (5, 3)"),
    ],
)
def test_inspect_flags_each_planted_fault(tmp_path, capsys, fault, words):
    rng = np.random.default_rng(2)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q"]}
    tensors = lora_pair(rng, "h.0.q", 4, 6, 5)
    a_key, b_key = f"{P}h.0.q.lora_A.weight", f"{P}h.0.q.lora_B.weight"
    if fault == "r mismatch":
        tensors = lora_pair(rng, "h.0.q", 3, 6, 5)
    elif fault == "rank_pattern mismatch":
        config["rank_pattern"] = {"h.0.q": 2}
    elif fault == "missing B":
        del tensors[b_key]
    elif fault == "missing A":
        del tensors[a_key]
    elif fault == "zero-size":
        tensors[a_key] = np.zeros((0, 6))
    elif fault == "outside targets":
        tensors = lora_pair(rng, "h.0.k", 4, 6, 5)
    elif fault == "non-finite":
        tensors[a_key][1, 2] = np.inf
    elif fault == "unknown key":
        tensors[f"{P}h.0.q.lora_E"] = np.ones(5)
    elif fault == "stray full tensor":
        tensors[f"{P}h.0.q.base_layer.bias"] = np.ones(5)
    elif fault == "A and B disagree":
        tensors[b_key] = rng.standard_normal((5, 3))
    folder = write_adapter(tmp_path / "ad", config, tensors)
    report = inspect_adapter(folder)
    assert not report.passed
    assert any(words in p for p in report.problems), report.problems
    assert all("\n" not in p for p in report.problems)
    # the command: exit 1, each problem on one line
    assert main(["adapter", "inspect", str(folder)]) == 1
    out = capsys.readouterr().out
    assert any(line.startswith("problem: ") and words in line for line in out.splitlines())


def test_inspect_accepts_the_biases_and_modules_the_config_trains(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {
        **lora_pair(rng, "h.0.q", 2, 6, 5),
        f"{P}h.0.q.base_layer.bias": np.ones(5),
        f"{P}score.weight": np.ones((2, 5)),
    }
    config = {"r": 2, "target_modules": ["q"], "bias": "lora_only", "modules_to_save": ["score"]}
    report = inspect_adapter(write_adapter(tmp_path / "ad", config, tensors))
    assert report.passed, report.problems
    assert report.full == {"h.0.q.bias": f"{P}h.0.q.base_layer.bias", "score.weight": f"{P}score.weight"}


# ---------------------------------------------------------------- merge


def gpt2_like_base(rng, path, float_dtypes=None):
    """A base state dict in GPT-2's layout: Conv1D weights (in, out), plus tensors no adapter touches."""
    tensors = {
        "h.0.attn.c_attn.weight": rng.standard_normal((6, 15)),  # (in, out): Conv1D
        "h.0.attn.c_attn.bias": rng.standard_normal(15),
        "h.1.attn.c_attn.weight": rng.standard_normal((6, 15)),
        "wte.weight": rng.standard_normal((11, 6)),  # (num_embeddings, dim)
        "score.weight": rng.standard_normal((3, 6)),
        "h.0.ln_1.weight": rng.standard_normal(6).astype(np.float32),
        "position_ids": np.arange(7, dtype=np.int64),
        "h.0.attn.masked_bias": np.array(-np.inf),
    }
    save_safetensors(path, tensors, {"format": "pt"}, dtypes=float_dtypes)
    return read_safetensors(path)  # as stored


def test_merge_equals_the_float64_merge_by_hand_and_copies_the_rest_byte_for_byte(tmp_path):
    rng = np.random.default_rng(4)
    base = tmp_path / "base.safetensors"
    W = gpt2_like_base(rng, base)
    adapter = {
        **lora_pair(rng, "h.0.attn.c_attn", 4, 6, 15),
        **lora_pair(rng, "h.1.attn.c_attn", 2, 6, 15),
        f"{P}wte.lora_embedding_A": rng.standard_normal((4, 11)),
        f"{P}wte.lora_embedding_B": rng.standard_normal((6, 4)),
        f"{P}score.weight": rng.standard_normal((3, 6)),
    }
    config = {
        "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["c_attn", "wte"], "fan_in_fan_out": True,
        "modules_to_save": ["score"], "rank_pattern": {"h.1.attn.c_attn": 2}, "alpha_pattern": {"wte": 3},
    }  # fmt: skip
    folder = write_adapter(tmp_path / "ad", config, adapter)
    out = merge_adapter(base, folder, tmp_path / "out.safetensors")
    merged = read_safetensors(out)

    def factors(name, emb=False):
        kind = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        return adapter[f"{P}{name}.{kind[0]}"], adapter[f"{P}{name}.{kind[1]}"]

    A, B = factors("h.0.attn.c_attn")
    np.testing.assert_array_equal(merged["h.0.attn.c_attn.weight"], W["h.0.attn.c_attn.weight"] + (8 / 2) * (B @ A).T)
    A, B = factors("h.1.attn.c_attn")
    want = W["h.1.attn.c_attn.weight"] + (8 / math.sqrt(2)) * (B @ A).T
    np.testing.assert_allclose(merged["h.1.attn.c_attn.weight"], want, rtol=1e-15, atol=1e-15)
    A, B = factors("wte", emb=True)
    np.testing.assert_allclose(merged["wte.weight"], W["wte.weight"] + (3 / 2) * (B @ A).T, rtol=1e-15, atol=1e-15)
    np.testing.assert_array_equal(merged["score.weight"], adapter[f"{P}score.weight"])
    for name in ("h.0.attn.c_attn.bias", "h.0.ln_1.weight", "position_ids", "h.0.attn.masked_bias"):
        assert raw_bytes(out, name) == raw_bytes(base, name)
    assert read_safetensors_header(out).metadata == {"format": "pt"}


def test_merge_with_fan_in_fan_out_off_adds_b_a_untransposed(tmp_path):
    rng = np.random.default_rng(5)
    base = tmp_path / "base.safetensors"
    W = rng.standard_normal((5, 6))
    save_safetensors(base, {"fc.weight": W, "fc.bias": rng.standard_normal(5)})
    adapter = lora_pair(rng, "fc", 3, 6, 5)
    folder = write_adapter(tmp_path / "ad", {"r": 3, "lora_alpha": 6, "target_modules": ["fc"]}, adapter)
    merged = read_safetensors(merge_adapter(base, folder, tmp_path / "out.safetensors"))
    A, B = adapter[f"{P}fc.lora_A.weight"], adapter[f"{P}fc.lora_B.weight"]
    np.testing.assert_array_equal(merged["fc.weight"], W + 2.0 * (B @ A))


def test_merge_that_overflows_float64_is_refused_and_writes_nothing(tmp_path):
    """A huge lora_alpha makes W + scaling * B @ A infinite even in float64: refused, OUT never written."""
    rng = np.random.default_rng(6)
    base = tmp_path / "base.safetensors"
    save_safetensors(base, {"fc.weight": rng.standard_normal((5, 6))})
    adapter = lora_pair(rng, "fc", 1, 6, 5, scale=1e200)  # B @ A ~ 1e400: past float64
    folder = write_adapter(tmp_path / "ad", {"r": 1, "lora_alpha": 1, "target_modules": ["fc"]}, adapter)
    out = tmp_path / "out.safetensors"
    with pytest.raises(FloatingPointError, match="overflows float64"):
        merge_adapter(base, folder, out)
    assert not out.exists()


small = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32)


@given(
    W=hnp.arrays(np.float32, (6, 5), elements=small),
    A=hnp.arrays(np.float32, (2, 5), elements=small),
    B=hnp.arrays(np.float32, (6, 2), elements=small),
    out_dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
)
def test_merge_rounds_the_float64_merge_once_to_the_output_dtype(tmp_path_factory, W, A, B, out_dtype):
    tmp = tmp_path_factory.mktemp("m")
    save_safetensors(tmp / "base.safetensors", {"fc.weight": W[::-1]})  # a negative-stride view
    folder = write_adapter(tmp / "ad", {"r": 2, "lora_alpha": 3, "target_modules": ["fc"]}, lora_pair_of(A, B))
    out = merge_adapter(tmp / "base.safetensors", folder, tmp / "out.safetensors", dtype=out_dtype)
    exact = W[::-1].astype(np.float64) + 1.5 * (B.astype(np.float64) @ A.astype(np.float64))  # float64, by hand
    want = {
        "bfloat16": round_bf16,
        "float16": lambda x: x.astype(np.float16),
        "float32": lambda x: x.astype(np.float32),
    }
    got = read_safetensors(out)["fc.weight"]
    np.testing.assert_array_equal(got.astype(np.float64), want[out_dtype](exact).astype(np.float64))
    assert (
        read_safetensors_header(out).tensors["fc.weight"].dtype
        == {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[out_dtype]
    )


def lora_pair_of(A, B, name="fc"):
    return {f"{P}{name}.lora_A.weight": A, f"{P}{name}.lora_B.weight": B}


def test_merge_into_a_bf16_base_keeps_bf16_and_copies_unadapted_bf16_bytes(tmp_path):
    rng = np.random.default_rng(6)
    base = tmp_path / "base.safetensors"
    W = gpt2_like_base(
        rng, base, float_dtypes={"h.0.attn.c_attn.weight": "bfloat16", "h.1.attn.c_attn.weight": "bfloat16"}
    )
    adapter = lora_pair(rng, "h.0.attn.c_attn", 2, 6, 15)
    config = {"r": 2, "lora_alpha": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True}
    out = merge_adapter(base, write_adapter(tmp_path / "ad", config, adapter), tmp_path / "out.safetensors")
    A, B = adapter[f"{P}h.0.attn.c_attn.lora_A.weight"], adapter[f"{P}h.0.attn.c_attn.lora_B.weight"]
    exact = W["h.0.attn.c_attn.weight"].astype(np.float64) + (B @ A).T
    assert read_safetensors_header(out).tensors["h.0.attn.c_attn.weight"].dtype == "BF16"
    np.testing.assert_array_equal(read_safetensors(out)["h.0.attn.c_attn.weight"], round_bf16(exact))
    assert raw_bytes(out, "h.1.attn.c_attn.weight") == raw_bytes(base, "h.1.attn.c_attn.weight")


def test_merge_dtype_converts_every_float_tensor_and_keeps_integers(tmp_path):
    rng = np.random.default_rng(7)
    base = tmp_path / "base.safetensors"
    W = gpt2_like_base(rng, base)
    folder = write_adapter(
        tmp_path / "ad",
        {"r": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True},
        lora_pair(rng, "h.0.attn.c_attn", 2, 6, 15),
    )
    out = merge_adapter(base, folder, tmp_path / "out.safetensors", dtype="float16")
    header = read_safetensors_header(out)
    assert header.tensors["position_ids"].dtype == "I64" and header.tensors["wte.weight"].dtype == "F16"
    np.testing.assert_array_equal(read_safetensors(out)["wte.weight"], W["wte.weight"].astype(np.float16))


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [
        (
            "missing base key",
            ValueError,
            "no tensor 'h.9.attn.c_attn.weight' for the adapter's module 'h.9.attn.c_attn'",
        ),
        (
            "transposed",
            ValueError,
            "has shape (6, 15), but the adapter's module 'h.0.attn.c_attn' needs (15, 6) "
            "(fan_in_fan_out=False: A (2, 6), B (15, 2)); fan_in_fan_out=True would fit",
        ),
        ("wrong shape", ValueError, "needs (7, 15)"),
        ("adapter problem", ValueError, "cannot merge: module 'h.0.attn.c_attn' has lora_A but no lora_B"),
        ("missing replaced", ValueError, "no tensor 'head.weight' for the adapter's"),
        ("overflow", FloatingPointError, "writing 'h.0.attn.c_attn.weight' as F16 overflows"),
        ("bad dtype", ValueError, "dtype must be one of keep, float32, float16, bfloat16"),
    ],
)
def test_a_failing_merge_raises_one_line_and_writes_nothing(tmp_path, case, error, words):
    rng = np.random.default_rng(8)
    base = tmp_path / "base.safetensors"
    gpt2_like_base(rng, base)
    config = {"r": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True}
    adapter = lora_pair(rng, "h.0.attn.c_attn", 2, 6, 15)
    dtype = "keep"
    if case == "missing base key":
        adapter = lora_pair(rng, "h.9.attn.c_attn", 2, 6, 15)
    elif case == "transposed":
        config["fan_in_fan_out"] = False
    elif case == "wrong shape":
        adapter = lora_pair(rng, "h.0.attn.c_attn", 2, 7, 15)
    elif case == "adapter problem":
        del adapter[f"{P}h.0.attn.c_attn.lora_B.weight"]
    elif case == "missing replaced":
        config["modules_to_save"] = ["head"]
        adapter[f"{P}head.weight"] = np.ones((2, 2))
    elif case == "overflow":
        adapter = lora_pair(rng, "h.0.attn.c_attn", 2, 6, 15, scale=1000.0)
        dtype = "float16"
    elif case == "bad dtype":
        dtype = "int8"
    folder = write_adapter(tmp_path / "ad", config, adapter)
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    with pytest.raises(error) as info:
        merge_adapter(base, folder, out, dtype=dtype)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(out.parent) == []  # no output, no temporary file left behind


def test_a_failing_merge_leaves_an_existing_output_untouched(tmp_path):
    rng = np.random.default_rng(9)
    base = tmp_path / "base.safetensors"
    gpt2_like_base(rng, base)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous merge")
    folder = write_adapter(
        tmp_path / "ad",
        {"r": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True},
        lora_pair(rng, "h.0.attn.c_attn", 2, 6, 15, scale=1000.0),
    )
    with pytest.raises(FloatingPointError):
        merge_adapter(base, folder, out, dtype="float16")
    assert out.read_bytes() == b"the previous merge"


# ---------------------------------------------------------------- the command line


def test_cli_inspect_consistent_json_and_unreadable(tmp_path, capsys):
    rng = np.random.default_rng(10)
    folder = write_adapter(tmp_path / "ad", {"r": 2, "target_modules": ["q"]}, lora_pair(rng, "h.q", 2, 4, 3))
    assert main(["adapter", "inspect", str(folder)]) == 0
    assert "1 adapted module(s), consistent" in capsys.readouterr().out
    assert main(["adapter", "inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    (folder / "adapter_config.json").write_text("{")
    assert main(["adapter", "inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowrank: error: ") and err.count("\n") == 1
    assert main(["adapter", "inspect", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern", "alpha_pattern"])
def test_inspect_and_merge_refuse_a_catastrophic_regex_before_it_runs(tmp_path, capsys, field):
    # '(a*)*b' against the file's own 28-character name took 15 s in `adapter inspect`
    # (doubling per character); the model-free reader refuses it as load_peft_adapter does
    rng = np.random.default_rng(12)
    name = "a" * 28
    config = {"r": 1, "target_modules": "(a*)*b" if field == "target_modules" else [name]}
    if field != "target_modules":
        config[field] = {"(a*)*b": 2}
    folder = write_adapter(tmp_path / "ad", config, lora_pair(rng, name, 1, 2, 2))
    assert main(["adapter", "inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adapter_config.json: " in err and "'(a*)*b' repeats a group" in err
    base = save_safetensors(tmp_path / "base.safetensors", {f"{name}.weight": np.ones((2, 2))})
    with pytest.raises(ValueError, match=r"adapter_config.json: .*'\(a\*\)\*b' repeats a group"):
        merge_adapter(base, folder, tmp_path / "out.safetensors")


def test_cli_merge_exit_codes(tmp_path, capsys):
    rng = np.random.default_rng(11)
    base = tmp_path / "base.safetensors"
    gpt2_like_base(rng, base)
    folder = write_adapter(
        tmp_path / "ad",
        {"r": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True},
        lora_pair(rng, "h.0.attn.c_attn", 2, 6, 15),
    )
    out = tmp_path / "out.safetensors"
    assert main(["adapter", "merge", str(base), str(folder), str(out), "--dtype", "bfloat16"]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["adapter", "merge", str(base), str(tmp_path / "nope"), str(tmp_path / "o2.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowrank: error: ") and err.count("\n") == 1
    assert not (tmp_path / "o2.safetensors").exists()
