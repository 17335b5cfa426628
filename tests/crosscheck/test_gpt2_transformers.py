"""nn.GPT2 against transformers' GPT2LMHeadModel in float64: logits, the token loss, every gradient, loading.

The reference is built from a ``transformers.GPT2Config`` with random
weights (nothing downloaded), eager attention, and its state dict converted
to NumPy is what lowrank's model loads.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lowrank import nn  # noqa: E402

SIZES = dict(vocab_size=23, n_positions=12, n_embd=16, n_layer=2, n_head=4)


def hf_model(seed: int = 0, **overrides):
    """A float64 GPT2LMHeadModel in eval mode whose every weight is random and O(1), so no term is negligible."""
    config = transformers.GPT2Config(**{**SIZES, **overrides}, attn_implementation="eager",
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def ours_from(hf) -> nn.GPT2:
    model = nn.GPT2(nn.GPT2Config.from_transformers(hf.config), dtype=np.float64, random_state=0)
    model.load_state_dict(numpy_state(hf))
    return model.eval()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def token_batch(seed: int, batch: int = 3, T: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SIZES["vocab_size"], (batch, T))


def test_state_dict_keys_and_shapes_are_transformers():
    hf = hf_model()
    ours = nn.GPT2(**SIZES, dtype=np.float64, random_state=0)
    ref = numpy_state(hf)
    mine = ours.state_dict()
    assert list(mine) == list(ref)  # same keys, same order, lm_head.weight included
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
    assert ours.n_params == hf.num_parameters()  # the tied head counted once


def test_logits_equal_transformers():
    hf = hf_model()
    ours = ours_from(hf)
    ids = token_batch(1, T=SIZES["n_positions"])  # the longest sequence the model takes
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(ours(ids), ref) <= 1e-12


def test_token_loss_and_every_gradient_equal_autograd():
    hf = hf_model(seed=3)
    ours = ours_from(hf)
    ids = token_batch(2)
    labels = ids.copy()
    labels[0, 4] = labels[2, :3] = -100  # ignored positions, as transformers' padding
    # transformers' own loss casts the logits to float32; this is its formula (shift, ignore, mean) in float64
    ref_logits = hf(torch.tensor(ids)).logits
    ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].reshape(-1, SIZES["vocab_size"]),
                                                 torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100)
    ref_loss.backward()

    logits = ours(ids)
    loss, dlogits = nn.lm_loss(logits, labels)
    ours.zero_grad()
    ours.backward(dlogits)

    assert abs(loss - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    mine = dict(ours.named_parameters())
    ref = dict(hf.named_parameters())  # the tied head once, as transformer.wte.weight
    assert list(mine) == list(ref)
    for name, p in ref.items():
        assert rel_err(mine[name].grad, p.grad.numpy()) <= 1e-10, name


def test_tied_head_gradient_is_the_sum_of_both_uses():
    # the embedding gradient alone (head detached) and the head gradient alone, against torch, add up
    hf = hf_model(seed=5)
    ours = ours_from(hf)
    ids = token_batch(4)
    logits = ours(ids)
    _, dlogits = nn.lm_loss(logits, ids)
    ours.zero_grad()
    ours.backward(dlogits)
    wte = hf.transformer.wte.weight
    hidden = hf.transformer(torch.tensor(ids)).last_hidden_state
    head_only = torch.nn.functional.linear(hidden.detach(), wte)
    embed_only = torch.nn.functional.linear(hidden, wte.detach())
    parts = []
    for out in (head_only, embed_only):
        hf.zero_grad()
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, SIZES["vocab_size"]),
                                                 torch.tensor(ids[:, 1:]).reshape(-1))
        loss.backward()
        parts.append(wte.grad.numpy().copy())
    assert np.abs(parts[0]).max() > 0 and np.abs(parts[1]).max() > 0
    assert rel_err(ours.transformer.wte.weight.grad, parts[0] + parts[1]) <= 1e-10


def test_loads_old_buffers_and_a_state_without_the_tied_head():
    hf = hf_model(seed=7)
    state = numpy_state(hf)
    n = SIZES["n_positions"]
    for i in range(SIZES["n_layer"]):  # what transformers < 4.3x saved beside the weights
        state[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((n, n), bool))[None, None]
        state[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4)
    ours = nn.GPT2(**SIZES, dtype=np.float64, random_state=1).eval()
    ours.load_state_dict(state)
    ids = token_batch(8)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(ours(ids), ref) <= 1e-12

    del state["lm_head.weight"]  # save_pretrained leaves the tied copy out
    other = nn.GPT2(**SIZES, dtype=np.float64, random_state=2).eval()
    other.load_state_dict(state)
    assert rel_err(other(ids), ref) <= 1e-12


def test_a_head_that_differs_from_the_embedding_is_refused():
    state = numpy_state(hf_model())
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    ours = nn.GPT2(**SIZES, dtype=np.float64, random_state=0)
    before = ours.state_dict()
    with pytest.raises(ValueError, match=r"lm_head\.weight must equal transformer\.wte\.weight"):
        ours.load_state_dict(state)
    assert all(np.array_equal(v, ours.state_dict()[k]) for k, v in before.items())


def test_config_from_transformers_refuses_what_is_not_implemented():
    config = transformers.GPT2Config(**SIZES, activation_function="relu", n_inner=7)
    with pytest.raises(ValueError, match=r"activation_function='relu'.*n_inner=7"):
        nn.GPT2Config.from_transformers(config)


def test_float32_logits_match_transformers_float32():
    hf = hf_model(seed=9).float()
    ours = nn.GPT2(**SIZES, dtype=np.float32, random_state=0).eval()
    ours.load_state_dict(numpy_state(hf))
    ids = token_batch(10)
    logits = ours(ids)
    assert logits.dtype == np.float32
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(logits, ref) <= 1e-5
