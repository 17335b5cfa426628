"""nn.GPT2 without transformers: causality, dropout's gradient, the tied head, loading, bad input, training.

transformers itself is the oracle in tests/crosscheck/test_gpt2_transformers.py;
here the checks are finite differences (with dropout active), the causal
structure, a rerun from scratch for resuming, and a hand-written shift.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowrank import nn
from lowrank.nn.gpt2 import lm_accuracy, shift_labels
from lowrank.nn.optim import AdamW
from lowrank.reference.gradcheck import check_gradients
from lowrank.train.fit import evaluate, fit

SIZES = dict(vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2)


def tiny(dtype=np.float64, seed: int = 0, **overrides) -> nn.GPT2:
    return nn.GPT2(**{**SIZES, **overrides}, dtype=dtype, random_state=seed)


# ---------------------------------------------------------------- structure


def test_keys_are_transformers_and_the_head_is_the_embedding():
    model = tiny()
    keys = list(model.state_dict())
    assert keys[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert "transformer.h.1.attn.c_attn.weight" in keys and "transformer.h.0.mlp.c_proj.bias" in keys
    assert keys[-1] == "lm_head.weight"
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())  # one Parameter, stepped once
    c = SIZES["n_embd"]  # parameter count from the formula, head tied
    per_block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
    expected = SIZES["vocab_size"] * c + SIZES["n_positions"] * c + SIZES["n_layer"] * per_block + 2 * c
    assert model.n_params == expected


def test_state_dict_round_trip_and_dtype_rule():
    a, b = tiny(seed=1).eval(), tiny(seed=2).eval()
    b.load_state_dict(a.state_dict())
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 12]])
    np.testing.assert_array_equal(a(ids), b(ids))
    assert tiny(np.float32)(ids).dtype == np.float32
    with pytest.raises(TypeError, match="dtype mismatch"):
        tiny(np.float32).load_state_dict(a.state_dict())


@given(arrays(np.int64, (2, 8), elements=st.integers(0, 12)), st.integers(1, 7),
       arrays(np.int64, (2, 8), elements=st.integers(0, 12)))
def test_causal_a_later_token_never_changes_an_earlier_position(ids, t, other):
    model = tiny(seed=3).eval()
    changed = ids.copy()
    changed[:, t:] = other[:, t:]
    before, after = model(ids), model(changed)
    np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=1e-13, atol=1e-13)


def test_a_shorter_sequence_gives_the_prefix_of_the_logits():
    model = tiny(seed=4).eval()
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    np.testing.assert_allclose(model(ids[:, :5]), model(ids)[:, :5], rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- gradients


def test_gradients_with_dropout_active_match_finite_differences():
    model = tiny(seed=5, embd_pdrop=0.2, attn_pdrop=0.3, resid_pdrop=0.25).train()
    ids = np.array([[1, 2, 3, 1, 2], [7, 7, 0, 12, 5]])
    labels = ids.copy()
    labels[1, 2] = -100
    params = dict(model.named_parameters())
    start = {name: g.bit_generator.state for name, g in model.named_generators()}

    def loss_at(**arrays):
        for name, g in model.named_generators():  # the same masks in every pass
            g.bit_generator.state = start[name]
        for name, value in arrays.items():
            params[name].data = value
        return nn.lm_loss(model(ids), labels)[0]

    checked = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
               "transformer.h.1.mlp.c_fc.bias", "transformer.h.1.ln_2.weight", "transformer.ln_f.bias"]
    original = {name: params[name].data.copy() for name in checked}
    for name, g in model.named_generators():
        g.bit_generator.state = start[name]
    logits = model(ids)
    model.zero_grad()
    model.backward(nn.lm_loss(logits, labels)[1])
    analytic = {name: params[name].grad.copy() for name in checked}
    check_gradients(loss_at, original, analytic, max_coords=40)


def test_dropout_draws_only_in_training_and_from_the_seed():
    ids = np.array([[1, 2, 3, 4]])
    a, b = tiny(seed=6, embd_pdrop=0.5), tiny(seed=6, embd_pdrop=0.5)
    np.testing.assert_array_equal(a(ids), b(ids))  # same seed, same masks
    assert not np.array_equal(a(ids), a(ids))  # a fresh mask each pass
    a.eval()
    np.testing.assert_array_equal(a(ids), a(ids))


# ---------------------------------------------------------------- the loss


def test_lm_loss_is_the_shifted_cross_entropy_written_out():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 5))
    labels = np.array([[1, 2, 3, 4], [0, -100, 2, 1]])
    loss, dlogits = nn.lm_loss(logits, labels)
    # by hand: positions (0,0)->2, (0,1)->3, (0,2)->4, (1,1)->2, (1,2)->1; (1,0) predicts an ignored label
    pairs = [((0, 0), 2), ((0, 1), 3), ((0, 2), 4), ((1, 1), 2), ((1, 2), 1)]
    terms = [np.log(np.exp(logits[i]).sum()) - logits[i][t] for i, t in pairs]
    assert loss == pytest.approx(np.mean(terms), rel=1e-14)
    assert np.all(dlogits[:, -1] == 0) and np.all(dlogits[1, 0] == 0)
    p = np.exp(logits[0, 0]) / np.exp(logits[0, 0]).sum()
    np.testing.assert_allclose(dlogits[0, 0], (p - np.eye(5)[2]) / 5, rtol=1e-13)
    np.testing.assert_array_equal(shift_labels(labels), [[2, 3, 4, -100], [-100, 2, 1, -100]])
    assert lm_accuracy(np.eye(5)[[[2, 3, 4, 0], [0, 2, 1, 0]]], labels) == 1.0


@pytest.mark.parametrize(("logits", "labels", "error", "match"), [
    (np.zeros((2, 3)), np.zeros((2, 3), int), ValueError, r"logits must have shape \(batch, T, vocab_size\)"),
    (np.zeros((2, 3, 4)), np.zeros((2, 3)), TypeError, "labels must hold integer token ids"),
    (np.zeros((2, 3, 4)), np.zeros((2, 4), int), ValueError, r"labels must have shape logits.shape\[:2\]"),
    (np.zeros((1, 2, 4)), np.array([[0, 4]]), ValueError, r"got 4 at index \(0, 1\)"),
    (np.zeros((1, 1, 4)), np.array([[0]]), ValueError, "at least one position"),  # T = 1: nothing to predict
    (np.full((1, 2, 4), np.nan), np.array([[0, 1]]), ValueError, "logits must be finite"),
])
def test_lm_loss_refuses_bad_input(logits, labels, error, match):
    with pytest.raises(error, match=match):
        nn.lm_loss(logits, labels)


# ---------------------------------------------------------------- bad input


def test_config_rules():
    with pytest.raises(ValueError, match=r"n_embd must be divisible by n_head.*n_embd=10 and n_head=4"):
        nn.GPT2Config(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="attn_pdrop"):
        nn.GPT2Config(attn_pdrop=1.0)
    with pytest.raises(TypeError, match="either config or its fields"):
        nn.GPT2(nn.GPT2Config(**SIZES), n_layer=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        nn.GPT2(n_layers=3)


@pytest.mark.parametrize(("ids", "error", "match"), [
    (np.array([[1.0, 2.0]]), TypeError, "input_ids must hold integers"),
    (np.array([[True, False]]), TypeError, "input_ids must hold integers"),
    (np.array([[1, 13]]), ValueError, r"\[0, 13\), got 13 at index \(0, 1\)"),
    (np.array([[-1, 2]]), ValueError, r"got -1 at index \(0, 0\)"),
    (np.array([1, 2]), ValueError, r"shape \(batch, T\)"),
    (np.zeros((1, 0), int), ValueError, r"shape \(batch, T\)"),
    (np.zeros((1, 9), int), ValueError, "at most n_positions = 8 tokens per sequence, got T = 9"),
])
def test_bad_token_ids_are_named_errors(ids, error, match):
    with pytest.raises(error, match=match):
        tiny()(ids)


def test_loading_a_wrong_shape_changes_nothing():
    model = tiny()
    state = tiny(n_embd=4, n_head=2).state_dict()
    with pytest.raises(ValueError, match="shape mismatch"):
        model.load_state_dict(state)


# ---------------------------------------------------------------- training with fit


def _sequences(n: int, seed: int) -> np.ndarray:
    """Counting sequences mod 13 from random starts: each next token is predictable."""
    start = np.random.default_rng(seed).integers(0, 13, (n, 1))
    return (start + np.arange(8)) % 13


def test_fit_trains_on_token_batches_and_resumes_bit_identically(tmp_path):
    ids, val = _sequences(48, 0), _sequences(16, 1)

    def run(epochs: int, **kwargs) -> tuple[nn.GPT2, object]:
        model = tiny(np.float32, seed=7, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
        opt = AdamW(model.named_parameters(), lr=1e-2)
        history = fit(model, ids, ids, loss="lm", optimizer=opt, epochs=epochs, batch_size=16,
                      val=(val, val), random_state=0, verbose=False, **kwargs)
        return model, history

    straight, history = run(4)
    assert history.val_loss[-1] < 0.85 * history.val_loss[0]  # it learns (ln 13 = 2.56 at chance)
    assert len(history.val_acc) == 4
    path = tmp_path / "ckpt.npz"
    run(2, checkpoint=path)
    resumed, _ = run(4, resume=path)
    for key, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)
    result = evaluate(straight, val, val, loss="lm")
    assert result.loss == pytest.approx(history.val_loss[-1], rel=1e-6)


def test_fit_refuses_float_tokens():
    model = tiny(np.float32)
    with pytest.raises(TypeError, match="X must hold integer token ids"):
        fit(model, _sequences(4, 0).astype(np.float32), _sequences(4, 0), loss="lm",
            optimizer=AdamW(model.named_parameters()), epochs=1, batch_size=2, verbose=False)


def test_dora_gradients_with_residual_dropout_match_finite_differences():
    # DoRA's cache keeps c_proj's output y (to recover Σ dy * z); residual dropout must not scale it in place
    model = tiny(seed=8, resid_pdrop=0.5).train()
    nn.inject_lora(model, r=2, alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True, random_state=0)
    rng = np.random.default_rng(1)
    for _, layer in model.named_modules():
        if isinstance(layer, nn.LoRALinear):
            layer.detach_norm = False  # the exact gradient, which finite differences measure
            layer.B.data = 0.3 * rng.standard_normal(layer.B.shape)
            V = layer.weight.data.T + layer.scaling * layer.B.data @ layer.A.data  # (out, in): Conv1D's W is (in, out)
            norm = np.sqrt((V**2).sum(axis=1))
            layer.magnitude.data = norm * rng.uniform(0.6, 1.5, norm.shape)  # m / n where y gives z back
    ids = np.array([[1, 2, 3, 1, 2], [7, 7, 0, 12, 5]])
    params = dict(model.named_parameters())
    start = {name: g.bit_generator.state for name, g in model.named_generators()}

    def loss_at(**arrays):
        for name, g in model.named_generators():  # the same masks in every pass
            g.bit_generator.state = start[name]
        for name, value in arrays.items():
            params[name].data = value
        return nn.lm_loss(model(ids), ids)[0]

    checked = [f"transformer.h.{i}.{where}.{what}" for i in (0, 1)
               for where in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
               for what in ("lora_magnitude_vector", "lora_A.weight", "lora_B.weight")]
    original = {name: params[name].data.copy() for name in checked}
    for name, g in model.named_generators():
        g.bit_generator.state = start[name]
    logits = model(ids)
    model.zero_grad()
    model.backward(nn.lm_loss(logits, ids)[1])
    analytic = {name: params[name].grad.copy() for name in checked}
    check_gradients(loss_at, original, analytic, max_coords=40)



def test_merge_lora_of_an_adapted_wte_folds_the_update_into_the_tied_head_too():
    # as PEFT's merge_and_unload with tied embeddings (docs/gpt2.md): the head changes, so the logits do
    model = nn.inject_lora(tiny(), r=2, alpha=4, targets=["transformer.wte"], random_state=0).eval()
    wte = model.transformer.wte
    wte.A.data = np.random.default_rng(0).standard_normal(wte.A.shape)
    W = wte.weight.data.copy()
    plain = nn.merge_lora(model)
    expected = W + 2.0 * (wte.B.data @ wte.A.data).T  # (num, dim): W + scaling * (B @ A).T
    np.testing.assert_allclose(plain.transformer.wte.weight.data, expected, rtol=1e-14, atol=1e-14)
    assert plain.lm_head.weight is plain.transformer.wte.weight
    ids = np.array([[1, 2, 3]])
    assert not np.allclose(plain.eval()(ids), model(ids))  # the merged model is not the adapted one here


def test_inject_lora_without_targets_adapts_every_projection_and_leaves_the_tied_head():
    model = nn.inject_lora(tiny(), r=2, alpha=4, random_state=0)
    adapted = sorted(name for name, m in model.named_modules() if isinstance(m, nn.LoRALinear))
    n_layer = model.config.n_layer
    want = sorted(f"transformer.h.{i}.{p}" for i in range(n_layer)
                  for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))  # fmt: skip
    assert adapted == want
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    assert not model.transformer.wte.weight.trainable  # frozen as the rest of the base
    named = nn.inject_lora(tiny(), r=2, alpha=4, targets=["lm_head"], random_state=0)
    assert isinstance(named.lm_head, nn.LoRALinear)  # named, the tied head is adapted
