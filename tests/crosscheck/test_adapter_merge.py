"""``lowrank adapter merge`` against PEFT's ``merge_and_unload`` on a tiny transformers GPT-2.

The model is built from a config with random weights (nothing downloaded);
its ``c_attn`` layers are GPT-2's ``Conv1D`` (weights stored ``(in, out)``,
so ``fan_in_fan_out``), with ``rank_pattern``, ``alpha_pattern``, rsLoRA and
``modules_to_save``. PEFT saves the adapter in float32, float16 and
bfloat16. On a float64 base the merged file equals PEFT's float64 merge to
1e-12 relative; on a bfloat16 base every merged weight is at least as close
to the exact (float64) merge as PEFT's own bfloat16 merge, since lowrank
rounds the exact sum once to the nearest bfloat16.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lowrank.cli import main  # noqa: E402
from lowrank.io.adapter import inspect_adapter, match_pattern_key, match_target_modules  # noqa: E402
from lowrank.io.safetensors import read_safetensors, read_safetensors_header  # noqa: E402

ADAPTED = ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight")


def tiny_gpt2(seed, dtype):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def save_base(model, path):
    # lm_head.weight is wte.weight (tied): transformers saves it once, as here
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors_torch.save_file(state, str(path), metadata={"format": "pt"})


def trained_adapter(model, folder, adapter_dtype):
    """A PEFT LoRA adapter on c_attn with random B (B = 0 would hide every mistake), saved by PEFT."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_rslora=True,
        rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"h.1.attn.c_attn": 3}, modules_to_save=["ln_f"],
    )  # fmt: skip
    pm = peft.get_peft_model(copy.deepcopy(model).float(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_()
            if "lora_" in name or "modules_to_save" in name:
                p.data = p.data.to(adapter_dtype)
    pm.save_pretrained(str(folder))
    return folder


def peft_merge(base_model, folder, autocast=True):
    model = copy.deepcopy(base_model)
    merged = peft.PeftModel.from_pretrained(model, str(folder), autocast_adapter_dtype=autocast).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_on_a_float64_base_equals_peft_merge_and_unload(tmp_path, adapter_dtype):
    base_model = tiny_gpt2(0, torch.float64)
    save_base(base_model, tmp_path / "base.safetensors")
    folder = trained_adapter(base_model, tmp_path / "ad", adapter_dtype)
    report = inspect_adapter(folder)
    assert report.passed, report.problems
    assert [m.scaling for m in report.modules] == [8 / math.sqrt(4), 3 / math.sqrt(2)]

    assert (
        main(["adapter", "merge", str(tmp_path / "base.safetensors"), str(folder), str(tmp_path / "m.safetensors")])
        == 0
    )
    ours = read_safetensors(tmp_path / "m.safetensors")
    theirs = peft_merge(base_model, folder)  # float64 model: the adapter's factors load into float64 layers
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for key, value in ours.items():
        want = theirs[key].numpy()
        assert value.dtype == want.dtype
        assert np.linalg.norm(value - want) <= 1e-12 * np.linalg.norm(want), key
    for key in ADAPTED:
        assert not np.array_equal(ours[key], base_model.state_dict()[key].numpy())  # the adapter did change it

    # the merged file loads where the base did, and computes what PEFT's merged model computes
    model = tiny_gpt2(2, torch.float64)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in ours.items()}, strict=False)
    model.tie_weights()
    tokens = torch.arange(12).reshape(2, 6)
    merged_model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(folder)).merge_and_unload()
    with torch.no_grad():
        np.testing.assert_allclose(
            model(tokens).logits.numpy(), merged_model(tokens).logits.numpy(), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize(
    ("adapter_dtype", "autocast"), [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)]
)
def test_merge_on_a_bfloat16_base_is_never_further_from_the_exact_merge_than_peft(
    tmp_path, adapter_dtype, autocast, capsys
):
    base_model = tiny_gpt2(3, torch.bfloat16)
    save_base(base_model, tmp_path / "base.safetensors")
    folder = trained_adapter(base_model, tmp_path / "ad", adapter_dtype)
    exact = peft_merge(base_model.double(), folder)  # the bf16 values, exactly in float64, merged in float64
    base_model = tiny_gpt2(3, torch.bfloat16)  # .double() above changed it in place
    # PEFT on a bf16 model. autocast_adapter_dtype=True (its default) loads the factors as float32, and
    # W += delta adds the float32 delta to the bf16 weight in float32: one rounding, nearly ours. False keeps
    # bf16 factors: delta is rounded to bf16, then added in bf16 (two roundings): the bf16 merge.
    theirs = peft_merge(base_model, folder, autocast=autocast)

    assert (
        main(["adapter", "merge", str(tmp_path / "base.safetensors"), str(folder), str(tmp_path / "m.safetensors")])
        == 0
    )
    assert read_safetensors_header(tmp_path / "m.safetensors").tensors[ADAPTED[0]].dtype == "BF16"
    ours = read_safetensors(tmp_path / "m.safetensors")  # BF16 -> float32 exactly
    for key in ADAPTED:
        truth = exact[key].numpy()
        our_error = np.abs(ours[key].astype(np.float64) - truth)
        peft_error = np.abs(theirs[key].double().numpy() - truth)
        assert (our_error <= peft_error).all(), key  # elementwise: ours is the nearest bf16
        worse = int(np.sum(our_error < peft_error))
        with capsys.disabled():  # the numbers for the record
            print(
                f"\n{key} (adapter {adapter_dtype}, autocast {autocast}): |error| vs the float64 merge, max: lowrank "
                f"{our_error.max():.4e}, PEFT {peft_error.max():.4e}; Frobenius: lowrank "
                f"{np.linalg.norm(our_error):.6e}, PEFT {np.linalg.norm(peft_error):.6e}; PEFT further on "
                f"{worse} of {truth.size} weights"
            )


PATTERN_NAMES = [
    "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.11.attn.c_attn",
    "transformer.h.1.attn.xc_attn", "layers.0.self_attn.v", "layers.0.self_attn.k",
]  # fmt: skip
PATTERN_KEYS = [
    ["c_attn"], ["attn"], ["h.1.attn.c_attn"], ["c_attn", "h.1.attn.c_attn"], ["h.1.attn.c_attn", "c_attn"],
    [r"h\.\d\.attn\.c_attn"], ["q|v"], ["transformer.h.0.attn.c_attn"],
]  # fmt: skip


@pytest.mark.parametrize("keys", PATTERN_KEYS)
def test_pattern_keys_are_peft_get_pattern_key(keys):
    from peft.utils.other import get_pattern_key

    for name in PATTERN_NAMES:
        theirs = get_pattern_key(keys, name)  # the name itself when nothing matches
        assert (match_pattern_key(keys, name) or name) == theirs


@pytest.mark.parametrize("targets", [["c_attn"], ["attn.c_attn"], ["attn"], r".*h\.1\.attn\.c_attn", "c_attn"])
def test_target_matching_is_peft_check_target_module_exists(targets):
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft.LoraConfig(r=2, target_modules=targets)
    for name in PATTERN_NAMES:
        assert match_target_modules(targets, name) is bool(check_target_module_exists(config, name))
