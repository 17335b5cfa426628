"""DoRA against PEFT's own DoRA on a torch Linear, in float64.

PEFT's forward is the reference: its detached norm (``detach_norm=True``),
its dropout path (fed our mask by a module that multiplies by it in place of
its ``nn.Dropout``), rsLoRA, leading batch dimensions, a trainable base, and
its ``merge_and_unload``. Agreement is normwise: ``max |ours - peft| <= 1e-12 *
max(max |peft|, 1)`` for the output and every gradient: relative, with the
inputs' own scale (entries drawn in [-2, 2]) as the floor. A floor is needed:
without dropout PEFT recovers ``x @ W.T`` as ``(x @ W.T + b) - b``, which loses
``x @ W.T`` entirely when it is below ``eps * |b|`` (hypothesis finds ``x =
1e-121`` beside ``b = 1``), while lowrank computes it.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import dora_problems

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from lowrank import nn  # noqa: E402
from lowrank.nn import functional as F  # noqa: E402

RTOL = 1e-12


class _Mask(torch.nn.Module):
    """Stands in for PEFT's ``nn.Dropout``: multiplies by a given mask (0 or 1/(1-p))."""

    def __init__(self, mask):
        super().__init__()
        self.mask = torch.tensor(mask)

    def forward(self, x):
        return x * self.mask


class _Wrap(torch.nn.Module):
    def __init__(self, n_in, n_out, bias):
        super().__init__()
        self.fc = torch.nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64)

    def forward(self, x):
        return self.fc(x)


def peft_dora(problem, *, rslora, alpha, r, base_trainable=False):
    """PEFT's DoRA layer holding the problem's W, b, A, B and magnitude; ``.fc`` is its LoRA Linear."""
    W, b, A, B, m = (problem[k] for k in ("weight", "bias", "A", "B", "magnitude"))
    n_out, n_in = W.shape
    model = _Wrap(n_in, n_out, b is not None)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc"], use_dora=True, use_rslora=rslora,
                             lora_dropout=0.5 if problem["dropout_mask"] is not None else 0.0)  # fmt: skip
    pm = peft.get_peft_model(model, config)
    fc = pm.base_model.model.fc
    with torch.no_grad():
        fc.base_layer.weight.copy_(torch.tensor(W))
        if b is not None:
            fc.base_layer.bias.copy_(torch.tensor(b))
        fc.lora_A["default"].weight.copy_(torch.tensor(A))
        fc.lora_B["default"].weight.copy_(torch.tensor(B))
        fc.lora_magnitude_vector["default"].weight.copy_(torch.tensor(m))
    if problem["dropout_mask"] is not None:
        fc.lora_dropout["default"] = _Mask(np.broadcast_to(problem["dropout_mask"], problem["x"].shape).copy())
    fc.base_layer.weight.requires_grad_(base_trainable)
    if b is not None:
        fc.base_layer.bias.requires_grad_(base_trainable)
    pm.train()  # PEFT takes its dropout path only in training mode
    return pm, fc


def assert_close(ours, theirs, what):
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else theirs
    assert ours.shape == theirs.shape, what
    err = np.abs(ours - theirs).max()
    assert err <= RTOL * max(np.abs(theirs).max(), 1.0), f"{what}: max |diff| {err:.3g}, max |peft| " \
        f"{np.abs(theirs).max():.3g}"  # fmt: skip


@st.composite
def configs(draw):
    """A DoRA problem in PEFT's terms: r and alpha give the scaling, rsLoRA or not."""
    problem = draw(dora_problems())
    if problem["x"].ndim == 1:  # PEFT's DoRA turns an (in,) input into a (1, out) output: give it the batch dim
        problem["x"], problem["dy"] = problem["x"][None], problem["dy"][None]
        if problem["dropout_mask"] is not None and problem["dropout_mask"].ndim == 1:
            problem["dropout_mask"] = problem["dropout_mask"][None]
    r = problem["A"].shape[0]
    rslora = draw(st.booleans())
    alpha = problem["scaling"] * (np.sqrt(r) if rslora else r)  # any scaling is some alpha
    problem["scaling"] = alpha / np.sqrt(r) if rslora else alpha / r  # PEFT's rounding of it
    return problem, r, alpha, rslora


@given(config=configs(), base_trainable=st.booleans())
def test_forward_and_every_gradient_match_peft(config, base_trainable):
    problem, r, alpha, rslora = config
    pm, fc = peft_dora(problem, rslora=rslora, alpha=alpha, r=r, base_trainable=base_trainable)
    assert fc.scaling["default"] == problem["scaling"]
    x, dy = problem["x"], problem["dy"]
    tx = torch.tensor(x, requires_grad=True)
    ty = pm(tx)
    ty.backward(torch.tensor(dy))

    y, cache = F.dora_linear(x, problem["weight"], problem["bias"], problem["A"], problem["B"],
                             problem["magnitude"], problem["scaling"], problem["dropout_mask"])  # fmt: skip
    g = F.dora_linear_backward(dy, cache, base_trainable=base_trainable)
    assert_close(y, ty, "y")
    assert_close(g.x, tx.grad, "dx")
    assert_close(g.A, fc.lora_A["default"].weight.grad, "dA")
    assert_close(g.B, fc.lora_B["default"].weight.grad, "dB")
    assert_close(g.magnitude, fc.lora_magnitude_vector["default"].weight.grad, "dmagnitude")
    if base_trainable:
        assert_close(g.weight, fc.base_layer.weight.grad, "dW")
        if problem["bias"] is not None:
            assert_close(g.bias, fc.base_layer.bias.grad, "db")


def _our_layer(problem, r, alpha, rslora):
    W, b = problem["weight"], problem["bias"]
    base = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=np.float64, random_state=0)
    layer = nn.LoRALinear(base, r=r, alpha=alpha, use_rslora=rslora, random_state=0, use_dora=True)
    layer.weight.data = np.array(W)  # after construction: W alone may have a zero row, V does not
    if b is not None:
        layer.bias.data = np.array(b)
    layer.A.data, layer.B.data = np.array(problem["A"]), np.array(problem["B"])
    layer.magnitude.data = np.array(problem["magnitude"])
    return layer


@given(config=configs())
def test_the_layer_matches_peft_and_merges_as_merge_and_unload(config):
    problem, r, alpha, rslora = config
    problem["dropout_mask"] = None  # the layer draws its own masks; eval mode has none
    pm, fc = peft_dora(problem, rslora=rslora, alpha=alpha, r=r)
    layer = _our_layer(problem, r, alpha, rslora).eval()
    pm.eval()
    x, dy = problem["x"], problem["dy"]
    tx = torch.tensor(x, requires_grad=True)
    ty = pm(tx)
    ty.backward(torch.tensor(dy))
    assert_close(layer(x), ty, "y")
    assert_close(layer.backward(dy), tx.grad, "dx")
    assert_close(layer.magnitude.grad, fc.lora_magnitude_vector["default"].weight.grad, "dmagnitude")
    assert_close(layer.A.grad, fc.lora_A["default"].weight.grad, "dA")
    assert_close(layer.B.grad, fc.lora_B["default"].weight.grad, "dB")

    if np.any(problem["magnitude"] == 0):
        return  # refused by our merge (the row would be lost); PEFT merges it to a zero row
    merged = pm.merge_and_unload()
    layer.merge()
    assert_close(layer.weight.data, merged.fc.weight, "merged W")
    assert_close(layer(x), merged(torch.tensor(x)), "merged y")


def test_a_fresh_layer_has_peft_s_initial_magnitude():
    torch.manual_seed(0)
    model = _Wrap(7, 5, True)
    W = model.fc.weight.detach().numpy().copy()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["fc"], use_dora=True))
    base = nn.Linear(7, 5, dtype=np.float64, random_state=0)
    base.weight.data = W
    layer = nn.LoRALinear(base, r=3, alpha=6, random_state=0, use_dora=True)
    peft_m = pm.base_model.model.fc.lora_magnitude_vector["default"].weight.detach().numpy()
    np.testing.assert_allclose(layer.magnitude.data, peft_m, rtol=1e-15)


@pytest.mark.parametrize(("init", "dtype", "rtol"), [("pissa", np.float32, 1e-5), ("gaussian", np.float64, 1e-13)])
def test_inits_with_dora_give_peft_s_magnitude_and_output(init, dtype, rtol):
    # the magnitude is initialised after the init (PiSSA's residual included), as PEFT does; PEFT
    # runs PiSSA in float32 only, so that case compares float32 layers (their SVDs round differently)
    torch.manual_seed(1)
    model = _Wrap(7, 5, True).to(torch.float32 if dtype == np.float32 else torch.float64)
    W, b = model.fc.weight.detach().numpy().copy(), model.fc.bias.detach().numpy().copy()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"], use_dora=True, init_lora_weights=init)
    pm = peft.get_peft_model(model, config).eval()
    base = nn.Linear(7, 5, dtype=dtype, random_state=0)
    base.weight.data, base.bias.data = W, b
    layer = nn.LoRALinear(base, r=2, alpha=4, init=init, random_state=0, use_dora=True).eval()
    peft_m = pm.base_model.model.fc.lora_magnitude_vector["default"].weight.detach().numpy()
    np.testing.assert_allclose(layer.magnitude.data, peft_m, rtol=rtol)
    x = np.random.default_rng(0).standard_normal((3, 7)).astype(dtype)
    np.testing.assert_allclose(layer(x), pm(torch.tensor(x)).detach().numpy(), rtol=rtol, atol=rtol)
