"""PEFT interop, in float64: adapters PEFT saved load here, adapters saved here load in PEFT, PiSSA agrees,
merge_lora folds as merge_and_unload does, inject_lora freezes what get_peft_model freezes, and
match_target_modules is PEFT's own target_modules rule."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

from lowrank import nn  # noqa: E402
from lowrank.io import load_peft_adapter, save_peft_adapter  # noqa: E402


def _torch_mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()


def _ours_like(torch_model):
    """A lowrank MLP with the torch model's base weights (torch-style keys map 1:1)."""
    model = nn.Sequential(nn.Linear(4, 8, dtype=np.float64), nn.ReLU(), nn.Linear(8, 3, dtype=np.float64))
    model.load_state_dict({k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()})
    return model


@pytest.mark.parametrize(("alpha", "use_rslora", "targets"), [(5, False, ["0", "2"]), (3, True, ["2"])])
def test_an_adapter_peft_saved_loads_here_with_the_same_outputs_and_gradients(tmp_path, alpha, use_rslora, targets):
    base = _torch_mlp(0)
    ours = _ours_like(base)  # before PEFT wraps the layers
    config = peft.LoraConfig(r=2, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                             lora_dropout=0.1)
    pm = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B = 0 would hide every mistake in A and in the scaling
    pm.save_pretrained(tmp_path / "adapter")
    pm.eval()

    ours = load_peft_adapter(ours, tmp_path / "adapter")
    ours.eval()
    x = np.random.default_rng(1).standard_normal((2, 5, 4))
    dy = np.random.default_rng(2).standard_normal((2, 5, 3))
    tx = torch.tensor(x, requires_grad=True)
    ty = pm(tx)
    ty.backward(torch.tensor(dy))
    y = ours(x)
    dx = ours.backward(dy)

    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    torch_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                   for n, p in pm.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.trainable}
    assert set(our_grads) == set(torch_grads) == {f"{i}.lora_{f}.weight" for i in targets for f in "AB"}
    for name, g in our_grads.items():
        np.testing.assert_allclose(g, torch_grads[name].numpy(), rtol=1e-12, atol=1e-12, err_msg=name)
    assert ours[2].dropout == 0.1 and ours[2].use_rslora == use_rslora


def test_an_adapter_saved_here_loads_in_peft_with_the_same_outputs(tmp_path):
    base = _torch_mlp(1)
    ours = _ours_like(base)
    rng = np.random.default_rng(3)
    for i in (0, 2):
        ours[i] = nn.LoRALinear(ours[i], r=3, alpha=7, use_rslora=True, random_state=rng)
        ours[i].B.data = rng.standard_normal(ours[i].B.shape)
    save_peft_adapter(ours, tmp_path / "adapter")

    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    pm.eval()
    assert pm.peft_config["default"].r == 3 and pm.peft_config["default"].use_rslora
    x = rng.standard_normal((6, 4))
    np.testing.assert_allclose(ours(x), pm(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
    merged = pm.merge_and_unload()  # PEFT's merge agrees with ours too
    for i in (0, 2):
        ours[i].merge()
        np.testing.assert_allclose(ours[i].weight.data, merged[i].weight.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_pissa_init_matches_peft(tmp_path):
    """PEFT's PiSSA (init_lora_weights="pissa") against ours.

    PEFT's conventions, read from peft/tuners/lora/layer.py (pissa_init): it
    refuses float64 and runs the SVD in float32; it divides the singular
    values by ``scaling`` before the square root, A = diag(sqrt(S_r/scaling)) @ Vh_r,
    B = U_r @ diag(sqrt(S_r/scaling)), and the base weight becomes
    W - scaling * B @ A, so the layer's output is unchanged. Ours is the same
    formula (LoRALinear's docstring), in float64 here: agreement to float32 accuracy.
    Singular vectors have a sign freedom, so A and B are compared row/column
    up to sign, and B @ A exactly.
    """
    torch.manual_seed(5)
    base = torch.nn.Sequential(torch.nn.Linear(7, 5))  # float32: PEFT's PiSSA refuses float64
    W = base[0].weight.detach().numpy().astype(np.float64).copy()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"],
                                                    init_lora_weights="pissa"))  # scaling 2, not 1
    layer = pm.base_model.model[0]
    A_t = layer.lora_A["default"].weight.detach().numpy().astype(np.float64)
    B_t = layer.lora_B["default"].weight.detach().numpy().astype(np.float64)
    residual_t = layer.base_layer.weight.detach().numpy().astype(np.float64)

    lin = nn.Linear(7, 5, dtype=np.float64)
    lin.weight.data = W.copy()
    ours = nn.LoRALinear(lin, r=3, alpha=6, init="pissa")
    assert ours.scaling == layer.scaling["default"] == 2.0
    tol = {"rtol": 1e-5, "atol": 1e-5}  # PEFT computed in float32
    np.testing.assert_allclose(ours.weight.data, residual_t, **tol)
    np.testing.assert_allclose(ours.B.data @ ours.A.data, B_t @ A_t, **tol)
    signs = np.sign(np.sum(ours.A.data * A_t, axis=1))  # (r,): +1 or -1 per singular pair
    np.testing.assert_allclose(ours.A.data, signs[:, None] * A_t, **tol)
    np.testing.assert_allclose(ours.B.data, B_t * signs, **tol)
    np.testing.assert_allclose(ours.weight.data + ours.scaling * ours.B.data @ ours.A.data, W, atol=1e-12)


@pytest.mark.parametrize(
    ("target_modules", "name"),
    [
        (["q", "v"], "q"),
        (["q", "v"], "layers.0.attn.q"),
        (["q", "v"], "layers.0.attn.k"),
        (["fc"], "block.fc2"),
        (["fc"], "blockfc"),
        (["0"], "1.0"),
        (["0", "2"], "2"),
        (["attn.q"], "layers.0.attn.q"),
        (["attn.q"], "layers.0.xattn.q"),
        (r"layers\.\d+\.attn\.(q|v)", "layers.12.attn.v"),
        (r"layers\.\d+\.attn\.(q|v)", "layers.12.attn.v.extra"),
        (r"attn\.q", "layers.0.attn.q"),
        (r".*\.q", "layers.0.attn.q"),
        ("^(?:0|2)$", "2"),
        ("^(?:0|2)$", "1.2"),
    ],
)
def test_match_target_modules_agrees_with_peft(target_modules, name):
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft.LoraConfig(target_modules=target_modules)
    assert nn.match_target_modules(target_modules, name) == bool(check_target_module_exists(config, name))


def test_merge_lora_folds_as_peft_merge_and_unload():
    base = _torch_mlp(2)
    ours = nn.inject_lora(_ours_like(base), r=2, alpha=3, use_rslora=True, random_state=0)
    rng = np.random.default_rng(4)
    for i in (0, 2):
        ours[i].B.data = rng.standard_normal(ours[i].B.shape)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"], use_rslora=True))
    with torch.no_grad():
        for i in (0, 2):
            layer = pm.base_model.model[i]
            layer.lora_A["default"].weight.copy_(torch.tensor(ours[i].A.data))
            layer.lora_B["default"].weight.copy_(torch.tensor(ours[i].B.data))
    merged_torch = pm.merge_and_unload().state_dict()
    plain = nn.merge_lora(ours)
    assert plain.state_dict().keys() == merged_torch.keys()
    for key, value in plain.state_dict().items():
        np.testing.assert_allclose(value, merged_torch[key].numpy(), rtol=1e-12, atol=1e-12, err_msg=key)


def test_inject_lora_freezes_what_get_peft_model_freezes():
    base = _torch_mlp(3)
    ours = nn.inject_lora(_ours_like(base), r=2, alpha=2, targets=["2"], random_state=0)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["2"]))
    theirs = sorted(n.replace("base_model.model.", "").replace(".default", "")
                    for n, p in pm.named_parameters() if p.requires_grad)  # fmt: skip
    assert sorted(k for k, p in ours.named_parameters() if p.trainable) == theirs
    assert len(theirs) == 2


# ---------------------------------------------------------------- PEFT's fields: patterns, bias, modules_to_save,
# half-precision files


def _torch_deep(seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear
    return torch.nn.Sequential(lin(4, 8), torch.nn.ReLU(), lin(8, 6), torch.nn.ReLU(), lin(6, 3)).double()


def _ours_deep(torch_model):
    model = nn.Sequential(nn.Linear(4, 8, dtype=np.float64), nn.ReLU(), nn.Linear(8, 6, dtype=np.float64),
                          nn.ReLU(), nn.Linear(6, 3, dtype=np.float64))
    model.load_state_dict({k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()})
    return model


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.mark.parametrize(("file_dtype", "bias"), [("float32", "none"), ("float16", "lora_only"),
                                                  ("bfloat16", "all"), ("float32", "all")])
def test_an_adapter_peft_saved_with_patterns_bias_and_modules_to_save_loads_here(tmp_path, file_dtype, bias):
    """PEFT's adapter in float32, float16 or bfloat16 (its trained tensors cast before save_pretrained):
    loaded here (float64 model), the outputs are PEFT's with the same stored values."""
    base = _torch_deep(0)
    ours = _ours_deep(base)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], rank_pattern={"2": 3},
                             alpha_pattern={"0": 1.5}, modules_to_save=["4"], bias=bias)
    pm = peft.get_peft_model(base, config)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:  # B = 0, untouched biases and head would hide every mistake
                p.copy_(torch.randn_like(p))
                p.data = p.data.to(_TORCH_DTYPES[file_dtype])
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        for p in pm.parameters():
            p.data = p.data.double()  # the stored values, exactly, for PEFT's float64 forward
    pm.eval()
    ours = load_peft_adapter(ours, tmp_path / "adapter")
    assert (ours[0].r, ours[0].alpha, ours[2].r, ours[2].alpha) == (2, 1.5, 3, 4.0)
    x = np.random.default_rng(1).standard_normal((5, 4))
    np.testing.assert_allclose(ours(x), pm(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
    theirs = sorted(n.replace("base_model.model.", "").replace(".default", "").replace("base_layer.", "")
                    .replace("modules_to_save.", "") for n, p in pm.named_parameters() if p.requires_grad)
    assert sorted(n for n, p in ours.named_parameters() if p.trainable) == theirs


def test_an_adapter_saved_here_with_patterns_bias_and_modules_to_save_loads_in_peft(tmp_path):
    base = _torch_deep(1)
    ours = nn.inject_lora(_ours_deep(base), r={"0": 2, "2": 3}, alpha={"0": 1.5, "2": 4.0}, targets=["0", "2"],
                          use_rslora=True, bias="all", modules_to_save=["4"], random_state=0)
    rng = np.random.default_rng(2)
    for p in ours.parameters():
        if p.trainable:
            p.data = rng.standard_normal(p.shape)
    save_peft_adapter(ours, tmp_path / "adapter", bias="all", modules_to_save=["4"])
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    pm.eval()
    layers = pm.base_model.model
    assert (layers[0].r["default"], layers[2].r["default"]) == (2, 3)
    assert layers[2].scaling["default"] == 4.0 / np.sqrt(3)
    x = rng.standard_normal((6, 4))
    np.testing.assert_allclose(ours(x), pm(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
