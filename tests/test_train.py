"""The training loop: learning, reproducibility, resuming, non-finite stops, early stopping.

Independent checks: a rerun from scratch for resuming and early stopping
(same seed, same trajectory, so bit-identical weights are the oracle), the
file's bytes for "the checkpoint stays intact", a gradient step computed by
hand for clipping, and loss/accuracy recomputed over the whole set for
``evaluate``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from strategies import SEEDS

from lowrank import nn
from lowrank.nn import functional as F
from lowrank.nn.optim import SGD, Adam, AdamW, WarmupCosine
from lowrank.train import FitConfig, TrainState, load_checkpoint, save_checkpoint
from lowrank.train.data import make_tasks
from lowrank.train.fit import History, NonFiniteError, evaluate, fit

# ---------------------------------------------------------------- fixtures

TASKS = make_tasks(n_features=8, n_hidden=8, n_classes=3, delta_rank=2, n_pretrain=400, n_downstream=200,
                   n_val=150, random_state=0)


def pretrained(seed=0, dtype=np.float32):
    model = nn.MLP([8, 12, 3], dtype=dtype, random_state=seed)
    return model


def lora_run(epochs, *, checkpoint=None, resume=None, seed=0, early_stopping=None, dropout=0.1, verbose=False,
             model_seed=0):
    """A LoRA fine-tuning run on the downstream task with every stateful part: LoRA dropout, Adam,
    a warm-up/cosine schedule, clipping, validation and (optionally) early stopping."""
    model = nn.inject_lora(pretrained(model_seed), r=2, alpha=4, dropout=dropout, random_state=model_seed + 1)
    opt = Adam(model.named_parameters(), lr=2e-2)
    schedule = WarmupCosine(opt, warmup_steps=3, total_steps=40)
    d = TASKS.downstream
    history = fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=opt, schedule=schedule,
                  epochs=epochs, batch_size=32, val=(d.X_val, d.y_val), random_state=seed, clip_grad_norm=1.0,
                  early_stopping=early_stopping, checkpoint=checkpoint, resume=resume, verbose=verbose)
    return model, opt, schedule, history


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype, k


# ---------------------------------------------------------------- learning


def test_fit_reduces_the_loss_on_a_learnable_task():
    d = TASKS.pretrain
    model = pretrained()
    start = evaluate(model, d.X_val, d.y_val)
    opt = Adam(model.named_parameters(), lr=1e-2)
    history = fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=opt, epochs=8, batch_size=32,
                  val=(d.X_val, d.y_val), random_state=0, verbose=False)
    assert history.epoch == list(range(1, 9))
    assert len(history.train_loss) == len(history.train_acc) == len(history.val_loss) == len(history.val_acc) == 8
    assert history.val_loss[-1] < 0.6 * start.loss and history.train_loss[-1] < 0.6 * history.train_loss[0]
    assert history.val_acc[-1] > max(0.8, start.accuracy + 0.3)
    end = evaluate(model, d.X_val, d.y_val)
    assert end.loss == pytest.approx(history.val_loss[-1], rel=1e-12)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_fit_with_regression_and_binary_losses(loss):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 4)).astype(np.float64)
    w = rng.standard_normal((4, 2))
    y = X @ w if loss == "mse" else (X @ w > 0).astype(np.float64)
    model = nn.MLP([4, 8, 2], "tanh", dtype=np.float64, random_state=0)
    history = fit(model, X, y, loss=loss, optimizer=Adam(model.named_parameters(), lr=2e-2), epochs=10,
                  batch_size=16, val=(X, y), random_state=0, verbose=False)
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert (history.train_acc == []) == (loss == "mse") and (history.val_acc == []) == (loss == "mse")
    if loss == "bce":
        assert history.val_acc[-1] > 0.85


def test_lora_training_leaves_the_frozen_base_bit_identical():
    d = TASKS.downstream
    for make_opt in (lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
                     lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)):
        model = nn.inject_lora(pretrained(), r=2, alpha=4, targets=["0"], dropout=0.2, random_state=1)
        frozen = {k: p.data.copy() for k, p in model.named_parameters() if not p.trainable}
        assert sorted(frozen) == ["0.bias", "0.weight", "2.bias", "2.weight"]
        lora = {k: p.data.copy() for k, p in model.named_parameters() if p.trainable}
        fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=make_opt(model.named_parameters()),
            epochs=2, batch_size=32, random_state=0, verbose=False)
        params = dict(model.named_parameters())
        for k, v in frozen.items():
            assert np.array_equal(params[k].data, v) and params[k].grad is None, k
        for k, v in lora.items():
            assert not np.array_equal(params[k].data, v), k


# ---------------------------------------------------------------- reproducibility


@settings(max_examples=5)
@given(seed=SEEDS)
def test_same_seed_same_history_and_weights(seed):
    a, _, _, ha = lora_run(2, seed=seed)
    b, _, _, hb = lora_run(2, seed=seed)
    assert ha == hb and ha.to_dict() == hb.to_dict()
    assert_same_weights(a, b)


def test_another_seed_shuffles_differently():
    _, _, _, ha = lora_run(1, seed=0)
    _, _, _, hb = lora_run(1, seed=1)
    assert ha.train_loss != hb.train_loss


def test_resume_gives_bit_identical_weights(tmp_path):
    path = tmp_path / "run.npz"
    full, full_opt, full_schedule, full_history = lora_run(5)
    lora_run(2, checkpoint=path)  # "interrupted" after epoch 2
    # a fresh process would build everything anew, from other initial weights even
    resumed, opt, schedule, history = lora_run(5, resume=path, model_seed=5, seed=123)
    assert_same_weights(resumed, full)
    assert history == full_history
    assert schedule.last_step == full_schedule.last_step == 5 * math.ceil(200 / 32)
    assert opt.lr == full_opt.lr
    for k, v in full_opt.state_dict().items():
        assert np.array_equal(opt.state_dict()[k], v), k


def test_resume_with_early_stopping_state(tmp_path):
    path = tmp_path / "run.npz"
    full, _, _, full_history = lora_run(6, early_stopping=2)
    lora_run(3, checkpoint=path, early_stopping=2)
    resumed, _, _, history = lora_run(6, resume=path, early_stopping=2)
    assert history == full_history
    assert_same_weights(resumed, full)


def test_checkpoint_is_a_pickle_free_npz(tmp_path):
    path = tmp_path / "run.npz"
    model, opt, _, history = lora_run(2, checkpoint=path)
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert all(v.dtype != object for v in arrays.values())
    assert int(arrays["epoch"]) == 2 and str(arrays["format"]) == "lowrank.fit/1"
    for k, p in model.named_parameters():
        assert np.array_equal(arrays[f"model.{k}"], p.data)
    assert int(arrays["optim.step"]) == opt.step_count
    assert arrays["history.val_loss"].tolist() == history.val_loss
    state = json.loads(str(arrays["rng"]))
    assert state["bit_generator"] == "PCG64"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


# ---------------------------------------------------------------- non-finite values


def test_a_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
    path = tmp_path / "run.npz"
    d = TASKS.pretrain
    n_steps = math.ceil(400 / 50)
    calls = {"n": 0}

    def loss_inf_at_epoch_2_step_3(out, y):
        calls["n"] += 1
        value, dout = F.cross_entropy(out, y)
        return (math.inf if calls["n"] == n_steps + 3 else value), dout

    def run(epochs, resume=None):
        model = pretrained()
        opt = SGD(model.named_parameters(), lr=0.1)
        return fit(model, d.X_train, d.y_train, loss=loss_inf_at_epoch_2_step_3, optimizer=opt, epochs=epochs,
                   batch_size=50, random_state=0, checkpoint=path, resume=resume, verbose=False)

    run(1)
    good = path.read_bytes()
    with pytest.raises(NonFiniteError, match=r"^at epoch 2, step 3 of 8 \(update 11 of the run\): "
                                             r"the loss must be finite, got inf$"):
        run(3, resume=path)
    assert path.read_bytes() == good


def test_a_huge_learning_rate_diverges_with_a_clear_error(tmp_path):
    path = tmp_path / "run.npz"
    d = TASKS.pretrain
    model = pretrained()
    with pytest.raises(NonFiniteError, match=r"^at epoch 1, step \d+ of 13 \(update \d+ of the run\): "
                                             r"the model's output must be finite, got -?(nan|inf) at index "
                                             r"\(\d+, \d+\) \(\d+ non-finite entries\); the weights diverged") as info:
        fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=SGD(model.named_parameters(), lr=1e6),
            epochs=50, batch_size=32, random_state=0, checkpoint=path, verbose=False)
    assert isinstance(info.value, FloatingPointError)
    assert not path.exists()  # it diverged within epoch 1: no whole good epoch, so no checkpoint


def test_a_non_finite_gradient_names_the_parameter():
    d = TASKS.pretrain
    model = pretrained()
    model[0].weight.trainable = model[0].bias.trainable = False

    def nan_gradient(out, y):
        value, dout = F.cross_entropy(out, y)
        return value, np.full_like(dout, np.nan)

    with pytest.raises(NonFiniteError, match=r"^at epoch 1, step 1 of 13 \(update 1 of the run\): the gradient of "
                                             r"parameter '2.weight' must be finite, got nan at index \(0, 0\) "
                                             r"\(36 non-finite entries\)$"):
        fit(model, d.X_train, d.y_train, loss=nan_gradient, optimizer=SGD(model.named_parameters(), lr=0.1),
            epochs=1, batch_size=32, random_state=0, verbose=False)


def test_non_finite_data_is_refused_at_the_boundary():
    X = np.ones((4, 8), np.float32)
    X[2, 5] = np.inf
    model = pretrained()
    with pytest.raises(ValueError, match=r"X must be finite, got inf at index \(2, 5\)"):
        fit(model, X, np.zeros(4, np.int64), loss="cross_entropy", optimizer=SGD(model.parameters(), lr=0.1),
            epochs=1, batch_size=2)


# ---------------------------------------------------------------- early stopping


def test_early_stopping_restores_the_best_weights():
    d = TASKS.pretrain
    y_val = (d.y_val + 1) % 3  # validation labels the training makes ever less likely: val loss rises

    def run(epochs, patience):
        model = pretrained()
        opt = Adam(model.named_parameters(), lr=1e-2)
        history = fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=opt, epochs=epochs,
                      batch_size=32, val=(d.X_val, y_val), random_state=0, early_stopping=patience, verbose=False)
        return model, history

    model, history = run(20, 2)
    best = int(np.argmin(history.val_loss)) + 1
    assert history.best_epoch == best
    assert history.stopped_epoch == best + 2 == history.epoch[-1] < 20
    assert all(v >= history.val_loss[best - 1] for v in history.val_loss[best:])
    assert evaluate(model, d.X_val, y_val).loss == history.val_loss[best - 1]
    # the oracle: the same run stopped by hand after the best epoch
    reference, _ = run(best, None)
    assert_same_weights(model, reference)


# ---------------------------------------------------------------- clipping, schedule, progress


def test_clipping_scales_the_step_to_max_norm():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10, 3))
    y = rng.integers(0, 2, size=10)
    model = nn.MLP([3, 2], dtype=np.float64, random_state=0)
    W0, b0 = model[0].weight.data.copy(), model[0].bias.data.copy()
    # the full-batch gradient by hand: softmax(logits) - onehot, averaged
    logits = X @ W0.T + b0
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(10), y] -= 1
    gW, gb = p.T @ X / 10, p.mean(axis=0)
    norm = math.sqrt((gW**2).sum() + (gb**2).sum())
    max_norm = 0.01 * norm
    fit(model, X, y, loss="cross_entropy", optimizer=SGD(model.named_parameters(), lr=1.0), epochs=1,
        batch_size=10, random_state=0, clip_grad_norm=max_norm, shuffle=False, verbose=False)
    scale = max_norm / (norm + 1e-6)
    np.testing.assert_allclose(model[0].weight.data, W0 - scale * gW, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(model[0].bias.data, b0 - scale * gb, rtol=1e-12, atol=1e-15)


def test_progress_lines_bar_and_silence(capsys):
    lora_run(2, verbose=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    lora_run(2, verbose=True)  # stderr is not a terminal under pytest: one line per epoch
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert out.out == "" and len(lines) == 2
    assert lines[1].startswith("epoch 2/2") and "val_loss" in lines[1] and "train_acc" in lines[1]
    lora_run(1, verbose="bar")
    out = capsys.readouterr()
    assert out.out == "" and "\r" in out.err and "#" in out.err and out.err.endswith("\n")


# ---------------------------------------------------------------- evaluate and History


def test_evaluate_matches_the_whole_set_and_restores_the_mode():
    d = TASKS.pretrain
    model = nn.inject_lora(pretrained(dtype=np.float64), r=2, alpha=4, dropout=0.5, random_state=0)
    model.train()
    X = d.X_val.astype(np.float64)
    for batch_size in (1000, 7):
        result = evaluate(model, X, d.y_val, batch_size=batch_size)
        assert model.training and all(m.training for m in model.modules())
        model.eval()
        logits = model(X)
        model.train()
        z = logits - logits.max(axis=1, keepdims=True)
        expected = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), d.y_val])
        assert result.loss == pytest.approx(expected, rel=1e-12)
        assert result.accuracy == np.mean(logits.argmax(axis=1) == d.y_val)
    assert evaluate(model, X, logits, loss="mse").accuracy is None


def test_history_to_dict_is_json():
    _, _, _, history = lora_run(2, early_stopping=5)
    data = json.loads(json.dumps(history.to_dict()))
    assert data["epoch"] == [1, 2] and data["val_loss"] == history.val_loss
    assert History(**data) == history
    assert data["stopped_epoch"] is None and data["best_epoch"] in (1, 2)


# ---------------------------------------------------------------- bad input


def _fit_kwargs(model, **overrides):
    d = TASKS.pretrain
    kwargs = {"loss": "cross_entropy", "optimizer": SGD(model.named_parameters(), lr=0.1), "epochs": 1,
              "batch_size": 32, "verbose": False}
    kwargs.update(overrides)
    return d.X_train, d.y_train, kwargs


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"loss": "hinge"}, ValueError,
         "loss must be one of 'cross_entropy', 'mse', 'bce', 'lm' or a callable, got 'hinge'"),
        ({"loss": 3}, TypeError, "loss must be a loss name or a callable"),
        ({"epochs": 0}, ValueError, r"epochs must be in \[1, inf\], got 0"),
        ({"batch_size": 0}, ValueError, r"batch_size must be in \[1, inf\], got 0"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an integer"),
        ({"val": np.ones(3)}, TypeError, "val must be a pair"),
        ({"val": (np.ones((3, 8), np.float32), np.ones(2))}, ValueError,
         r"val\[1\] must have one target per sample of val\[0\]"),
        ({"early_stopping": 2}, ValueError, "early_stopping needs val"),
        ({"early_stopping": 0, "val": (np.ones((2, 8), np.float32), np.zeros(2, int))}, ValueError,
         "early_stopping must be in"),
        ({"clip_grad_norm": 0.0}, ValueError, "clip_grad_norm must be in"),
        ({"optimizer": "adam"}, TypeError, "optimizer must be a lowrank.nn.optim optimizer"),
        ({"verbose": "loud"}, ValueError, "verbose must be True, False, 'auto', 'bar' or 'lines', got 'loud'"),
        ({"shuffle": 1}, TypeError, "shuffle must be True or False"),
        ({"random_state": 1.5}, TypeError, "random_state"),
        ({"checkpoint": "/nonexistent/folder/run.npz"}, FileNotFoundError, "does not exist"),
    ],
)
def test_fit_refuses_bad_arguments(overrides, error, match):
    model = pretrained()
    X, y, kwargs = _fit_kwargs(model, **overrides)
    with pytest.raises(error, match=match):
        fit(model, X, y, **kwargs)


def test_fit_refuses_bad_data_models_and_schedules():
    model = pretrained()
    X, y, kwargs = _fit_kwargs(model)
    with pytest.raises(ValueError, match=r"y must have one target per sample of X \(400\), got shape \(399,\)"):
        fit(model, X, y[:-1], **kwargs)
    with pytest.raises(ValueError, match="X must have at least one sample"):
        fit(model, X[:0], y[:0], **kwargs)
    with pytest.raises(TypeError, match=r"model must be a lowrank\.nn\.Module"):
        fit(lambda x: x, X, y, **kwargs)
    other = SGD(pretrained().named_parameters(), lr=0.1)
    with pytest.raises(ValueError, match="schedule must be built on the optimizer"):
        fit(model, X, y, schedule=WarmupCosine(other, 1, 5), **kwargs)
    for p in model.parameters():
        p.trainable = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, X, y, **kwargs)
    with pytest.raises(TypeError, match="model must be"):
        evaluate(None, X, y)


def test_resume_refuses_other_settings_and_foreign_files(tmp_path):
    path = tmp_path / "run.npz"
    lora_run(1, checkpoint=path)
    model = nn.inject_lora(pretrained(), r=2, alpha=4, dropout=0.1, random_state=1)
    d = TASKS.downstream
    opt = Adam(model.named_parameters(), lr=2e-2)
    schedule = WarmupCosine(opt, warmup_steps=3, total_steps=40)
    common = {"loss": "cross_entropy", "optimizer": opt, "epochs": 2, "val": (d.X_val, d.y_val), "verbose": False}
    with pytest.raises(ValueError, match="batch_size: checkpoint 32, now 16"):
        fit(model, d.X_train, d.y_train, batch_size=16, schedule=schedule, resume=path, **common)
    with pytest.raises(ValueError, match="has schedule state, but this call passes no schedule"):
        fit(model, d.X_train, d.y_train, batch_size=32, resume=path, **common)
    foreign = tmp_path / "other.npz"
    np.savez(foreign, a=np.ones(2))
    with pytest.raises(ValueError, match=r"not a checkpoint written by lowrank\.train\.fit"):
        fit(model, d.X_train, d.y_train, batch_size=32, schedule=schedule, resume=foreign, **common)
    with pytest.raises(FileNotFoundError):
        fit(model, d.X_train, d.y_train, batch_size=32, schedule=schedule, resume=tmp_path / "none.npz", **common)


# ---------------------------------------------------------------- FitConfig


def _config(**overrides):
    kwargs = {"n_samples": 100, "epochs": 3, "batch_size": 32, "loss": "cross_entropy"}
    kwargs.update(overrides)
    return FitConfig(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"n_samples": 0}, ValueError, r"n_samples must be in \[1, inf\], got 0"),
        ({"n_samples": 10.0}, TypeError, "n_samples must be an integer"),
        ({"epochs": 0}, ValueError, r"epochs must be in \[1, inf\], got 0"),
        ({"epochs": "3"}, TypeError, "epochs must be an integer"),
        ({"batch_size": -1}, ValueError, r"batch_size must be in \[1, inf\], got -1"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an integer"),
        ({"loss": "hinge"}, ValueError, "loss must be one of 'cross_entropy', 'mse', 'bce', 'lm' or None, got 'hinge'"),
        ({"shuffle": 1}, TypeError, "shuffle must be True or False"),
        ({"has_val": "yes"}, TypeError, "has_val must be True or False"),
        ({"clip_grad_norm": 0.0}, ValueError, r"clip_grad_norm must be in \(0, inf\)"),
        ({"clip_grad_norm": -1.0}, ValueError, "clip_grad_norm must be in"),
        ({"clip_grad_norm": math.nan}, ValueError, "clip_grad_norm"),
        ({"clip_grad_norm": "1"}, TypeError, "clip_grad_norm"),
        ({"early_stopping": 2}, ValueError, "early_stopping needs val"),
        ({"early_stopping": 0, "has_val": True}, ValueError, r"early_stopping must be in \[1, inf\], got 0"),
        ({"early_stopping": 1.5, "has_val": True}, TypeError, "early_stopping must be an integer"),
        ({"checkpoint": "/nonexistent/folder/run.npz"}, FileNotFoundError, "the folder '/nonexistent/folder' does not"),
        ({"verbose": "loud"}, ValueError, "verbose must be True, False, 'auto', 'bar' or 'lines', got 'loud'"),
    ],
)
def test_fit_config_refuses_every_bad_setting(overrides, error, match):
    with pytest.raises(error, match=match):
        _config(**overrides)


def test_fit_config_is_frozen_normalised_and_json(tmp_path):
    config = _config(n_samples=np.int64(100), batch_size=np.int32(32), clip_grad_norm=1, early_stopping=2,
                     has_val=True, checkpoint=tmp_path / "run.npz", resume=tmp_path / "old.npz", verbose="lines")
    assert config.n_samples == 100 and type(config.n_samples) is int and type(config.batch_size) is int
    assert config.clip_grad_norm == 1.0 and type(config.clip_grad_norm) is float
    assert config.checkpoint == str(tmp_path / "run.npz") and config.resume == str(tmp_path / "old.npz")
    assert config.n_steps == 4  # ceil(100 / 32), by hand
    assert _config(n_samples=96).n_steps == 3
    assert json.loads(json.dumps(config.to_json())) == {
        "n_samples": 100, "epochs": 3, "batch_size": 32, "loss": "cross_entropy", "shuffle": True, "has_val": True,
        "clip_grad_norm": 1.0, "early_stopping": 2, "accumulate": 1, "checkpoint": str(tmp_path / "run.npz"),
        "resume": str(tmp_path / "old.npz"), "verbose": "lines"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 5  # type: ignore[misc]
    for verbose in (True, False, "auto", "bar", "lines"):
        assert _config(verbose=verbose).verbose == verbose


def test_fit_config_check_resume_names_every_setting_that_differs():
    saved = _config().to_json()
    _config(epochs=9, clip_grad_norm=0.5, verbose=False).check_resume(saved, "here")  # free to change
    with pytest.raises(ValueError, match=r"^here was written by a run with other settings, so it cannot continue "
                                         r"it: batch_size: checkpoint 32, now 16, loss: checkpoint "
                                         r"'cross_entropy', now 'mse'$"):
        _config(batch_size=16, loss="mse").check_resume(saved, "here")


def test_the_checkpoint_stores_the_runs_config(tmp_path):
    path = tmp_path / "run.npz"
    lora_run(1, checkpoint=path, early_stopping=3)
    with np.load(path, allow_pickle=False) as f:
        saved = json.loads(str(f["config"]))
    assert saved == {"n_samples": 200, "epochs": 1, "batch_size": 32, "loss": "cross_entropy", "shuffle": True,
                     "has_val": True, "clip_grad_norm": 1.0, "early_stopping": 3, "accumulate": 1,
                     "checkpoint": str(path),
                     "resume": None, "verbose": False}


@pytest.mark.parametrize(
    ("setting", "overrides", "message"),
    [
        ("n_samples", {"n": 199}, "n_samples: checkpoint 200, now 199"),
        ("batch_size", {"batch_size": 16}, "batch_size: checkpoint 32, now 16"),
        ("shuffle", {"shuffle": False}, "shuffle: checkpoint True, now False"),
        ("loss", {"loss": lambda out, y: F.cross_entropy(out, y)}, "loss: checkpoint 'cross_entropy', now None"),
        ("early_stopping", {"early_stopping": 2}, "early_stopping: checkpoint None, now 2"),
    ],
)
def test_a_checkpoint_refuses_a_resume_under_another_config(tmp_path, setting, overrides, message):
    path = tmp_path / "run.npz"
    lora_run(1, checkpoint=path)
    good = path.read_bytes()
    model = nn.inject_lora(pretrained(), r=2, alpha=4, dropout=0.1, random_state=1)
    before = model.state_dict()
    d = TASKS.downstream
    opt = Adam(model.named_parameters(), lr=2e-2)
    n = overrides.pop("n", 200)
    kwargs = {"loss": "cross_entropy", "optimizer": opt, "schedule": WarmupCosine(opt, warmup_steps=3, total_steps=40),
              "epochs": 2, "batch_size": 32, "val": (d.X_val, d.y_val), "clip_grad_norm": 1.0, "verbose": False,
              "resume": path, **overrides}
    with pytest.raises(ValueError, match=rf"cannot continue it: {re.escape(message)}$"):
        fit(model, d.X_train[:n], d.y_train[:n], **kwargs)
    assert_same_weights_as(model, before)  # refused before anything was loaded
    assert path.read_bytes() == good


def assert_same_weights_as(model, state):
    for k, v in model.state_dict().items():
        assert np.array_equal(v, state[k]), k


def test_save_and_load_checkpoint_round_trip_one_state(tmp_path):
    """The state object alone carries everything: weights, optimizer, schedule, both kinds of generator."""
    path = tmp_path / "state.npz"

    def state_of(model_seed, rng_seed):
        model = nn.inject_lora(pretrained(model_seed), r=2, alpha=4, dropout=0.1, random_state=model_seed + 1)
        opt = Adam(model.named_parameters(), lr=1e-2)
        schedule = WarmupCosine(opt, warmup_steps=2, total_steps=10)
        config = FitConfig(n_samples=10, epochs=4, batch_size=5, loss="mse")
        return TrainState(config, model, opt, schedule, np.random.default_rng(rng_seed))

    saved = state_of(0, 0)
    for p in saved.model.parameters():
        if p.trainable:
            p.grad = np.ones_like(p.data)
    saved.optimizer.step()
    saved.schedule.step()
    saved.epoch = 2
    saved.history.epoch.extend([1, 2])
    saved.history.train_loss.extend([0.5, 0.25])
    save_checkpoint(path, saved)

    loaded = state_of(7, 99)
    load_checkpoint(path, loaded)
    assert loaded.epoch == 2 and loaded.history == saved.history
    assert_same_weights_as(loaded.model, saved.model.state_dict())
    assert loaded.schedule.last_step == 1 and loaded.optimizer.lr == saved.optimizer.lr
    assert loaded.rng.integers(0, 2**62, 4).tolist() == saved.rng.integers(0, 2**62, 4).tolist()
    for (name_a, a), (name_b, b) in zip(loaded.model.named_generators(), saved.model.named_generators(), strict=True):
        assert name_a == name_b and a.random(3).tolist() == b.random(3).tolist()

    other = state_of(0, 0)
    other.config = FitConfig(n_samples=10, epochs=4, batch_size=2, loss="mse")
    with pytest.raises(ValueError, match="batch_size: checkpoint 5, now 2"):
        load_checkpoint(path, other)


# ---------------------------------------------------------------- the optimizer must hold the trainable parameters


def test_an_optimizer_built_before_inject_lora_is_refused_by_name():
    d = TASKS.downstream
    model = pretrained()
    opt = Adam(model.named_parameters(), lr=1e-2)  # the base weights only: inject_lora comes after
    model = nn.inject_lora(model, r=2, alpha=4, random_state=1)
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"^optimizer must hold every trainable parameter of the model, but it "
                                         r"misses 4: '0\.lora_A\.weight', '0\.lora_B\.weight', '2\.lora_A\.weight', "
                                         r"'2\.lora_B\.weight'; build the optimizer after inject_lora"):
        fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=opt, epochs=3, batch_size=32,
            verbose=False)
    assert_same_weights_as(model, before)


def test_an_optimizer_missing_one_parameter_or_holding_a_foreign_one_is_refused():
    d = TASKS.pretrain
    model = pretrained()
    held = [(k, p) for k, p in model.named_parameters() if k != "2.bias"]
    with pytest.raises(ValueError, match=r"misses 1: '2\.bias';"):
        fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=SGD(held, lr=0.1), epochs=1,
            batch_size=32, verbose=False)
    stray = nn.Linear(3, 3, random_state=0)
    opt = SGD([*model.named_parameters(), ("stray.weight", stray.weight)], lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer must hold only parameters of the model .* but 1 are not "
                                         r"the model's: 'stray\.weight';"):
        fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=opt, epochs=1, batch_size=32,
            verbose=False)


def test_an_optimizer_may_hold_frozen_parameters_of_the_model():
    """Allowed, as in PyTorch: the optimizer skips them. The oracle: the same run with an optimizer of the
    trainable parameters only takes bit-identical steps."""
    d = TASKS.downstream
    models = []
    for only_trainable in (False, True):
        model = nn.inject_lora(pretrained(), r=2, alpha=4, random_state=1)
        params = [(k, p) for k, p in model.named_parameters() if p.trainable or not only_trainable]
        fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=AdamW(params, lr=1e-2, weight_decay=0.1),
            epochs=2, batch_size=32, random_state=0, verbose=False)
        models.append(model)
    assert_same_weights(*models)


# ---------------------------------------------------------------- data converted to the model's dtype


def test_integer_bool_and_list_data_are_converted_to_the_models_dtype():
    """The oracle: the same run on data the caller cast to float32 by hand."""
    rng = np.random.default_rng(0)
    X_int = rng.integers(-3, 4, size=(60, 8))
    y = rng.integers(0, 3, size=60)
    cases = {"int": X_int, "bool": X_int > 0, "list": X_int.tolist()}
    for name, X in cases.items():
        runs = []
        for data in (X, np.asarray(X).astype(np.float32)):
            model = pretrained()
            history = fit(model, data, y, loss="cross_entropy", optimizer=SGD(model.named_parameters(), lr=0.1),
                          epochs=2, batch_size=16, val=(data, y), random_state=0, verbose=False)
            runs.append((model, history, evaluate(model, data, y)))
        (a, ha, ea), (b, hb, eb) = runs
        assert_same_weights(a, b)
        assert ha == hb and ea == eb, name


def test_float_data_of_the_other_precision_is_refused_as_the_layers_refuse_it():
    model = pretrained()
    X = np.ones((4, 8))  # float64 for a float32 model
    message = (r"^X must have the layer's dtype float32, got float64: cast it with X\.astype\(np\.float32\) "
               r"or build the layer with dtype=np\.float64$")
    with pytest.raises(TypeError, match=message):
        evaluate(model, X, np.zeros(4, np.int64))
    with pytest.raises(TypeError, match=message):
        fit(model, X, np.zeros(4, np.int64), loss="cross_entropy", optimizer=SGD(model.parameters(), lr=0.1),
            epochs=1, batch_size=2, verbose=False)
    with pytest.raises(TypeError, match=r"^val\[0\] must have the layer's dtype float32, got float64"):
        fit(model, X.astype(np.float32), np.zeros(4, np.int64), loss="cross_entropy", val=(X, np.zeros(4, np.int64)),
            optimizer=SGD(model.parameters(), lr=0.1), epochs=1, batch_size=2, verbose=False)


# ---------------------------------------------------------------- the loss contract


@pytest.mark.parametrize(
    ("bad_loss", "error", "match"),
    [
        (lambda out, y: F.cross_entropy(out, y)[0], TypeError,
         r"^loss must follow loss\(out, y\) -> \(loss, dout\), a pair; the loss returned float "),
        (lambda out, y: [*F.cross_entropy(out, y)], TypeError, r"a pair; the loss returned list"),
        (lambda out, y: ("0.5", F.cross_entropy(out, y)[1]), TypeError,
         r"with the loss a real number; it returned str '0\.5' as the loss$"),
        (lambda out, y: (F.cross_entropy(out, y)[0], 1.0), TypeError, r"with dout an ndarray; it returned float"),
        (lambda out, y: (F.cross_entropy(out, y)[0], F.cross_entropy(out, y)[1][:, :2]), ValueError,
         r"with dout of out's shape \(32, 3\); it returned dout of shape \(32, 2\)$"),
    ],
)
def test_a_loss_that_breaks_the_contract_is_named(bad_loss, error, match):
    d = TASKS.pretrain
    model = pretrained()
    with pytest.raises(error, match=match):
        fit(model, d.X_train, d.y_train, loss=bad_loss, optimizer=SGD(model.parameters(), lr=0.1), epochs=1,
            batch_size=32, verbose=False)
    if error is TypeError:
        with pytest.raises(error, match=match.replace("(32, ", "(")):
            evaluate(model, d.X_val, d.y_val, loss=bad_loss)


def test_a_loss_may_return_numpy_scalars_and_0d_arrays():
    d = TASKS.pretrain
    histories = []
    for wrap in (float, np.float64, np.asarray):
        model = pretrained()
        def loss(out, y, wrap=wrap):
            value, dout = F.cross_entropy(out, y)
            return wrap(value), dout
        histories.append(fit(model, d.X_train, d.y_train, loss=loss, optimizer=SGD(model.parameters(), lr=0.1),
                             epochs=1, batch_size=32, random_state=0, verbose=False))
    assert histories[0] == histories[1] == histories[2]


# ---------------------------------------------------------------- hostile checkpoint fields


def _tampered(tmp_path, **changes):
    """A good checkpoint of lora_run(2), then one with ``changes`` to its arrays (None deletes)."""
    from lowrank.io.files import save_npz

    good = tmp_path / "good.npz"
    lora_run(2, checkpoint=good)
    with np.load(good, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    for key, value in changes.items():
        arrays[key.replace("__", ".")] = np.asarray(value)
    bad = tmp_path / "bad.npz"
    save_npz(bad, arrays)
    return bad


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"config": "{not json"}, r"the checkpoint's 'config' is not valid JSON: Expecting property name"),
        ({"config": "[1, 2]"}, r"the checkpoint's 'config' must be a JSON object, got a JSON list$"),
        ({"config": np.arange(3)}, r"the checkpoint's 'config' must be a JSON text, got an array of shape \(3,\)"),
        ({"config": "[" * 100_000 + "]" * 100_000}, r"the checkpoint's 'config' is not valid JSON"),
        ({"rng": '{"bit_generator": "PCG64"}'}, r"the checkpoint's 'rng' is not a PCG64 state: it has no key 'state'$"),
        ({"rng": '{"bit_generator": "MT19937", "state": {}}'}, r"the checkpoint's 'rng' is not a PCG64 state: "),
        ({"rng": "3"}, r"the checkpoint's 'rng' must be a JSON object, got a JSON int$"),
        ({"rng": '{"bit_generator": "PCG64", "state": {"state": "a", "inc": 1}, "has_uint32": 0, "uinteger": 0}'},
         r"the checkpoint's 'rng' is not a PCG64 state: "),
        ({"module_rng__0": "{"}, r"the checkpoint's 'module_rng\.0' is not valid JSON"),
        ({"epoch": -5}, r"the checkpoint's 'epoch' \(epochs completed\) must be >= 0, got -5$"),
        ({"epoch": 1.5}, r"the checkpoint's 'epoch' must be one integer, got an array of shape \(\) and dtype "
                         r"float64$"),
        ({"epoch": [1, 2]}, r"the checkpoint's 'epoch' must be one integer, got an array of shape \(2,\)"),
        ({"epoch": 1}, r"the checkpoint's 'history\.epoch' must count the 1 epochs completed, got \[1, 2\]$"),
        ({"history__epoch": [[1, 2]]}, r"the checkpoint's 'history\.epoch' must count the 2 epochs completed"),
        ({"history__best_epoch": [1, 2]}, r"the checkpoint's 'history\.\*' is not a History: "),
    ],
)
def test_a_hostile_checkpoint_field_is_a_one_line_error_naming_the_file_and_field(tmp_path, changes, match):
    bad = _tampered(tmp_path, **changes)
    model = nn.inject_lora(pretrained(), r=2, alpha=4, dropout=0.1, random_state=1)
    before = model.state_dict()
    rng = np.random.default_rng(7)
    rng_before = rng.bit_generator.state
    d = TASKS.downstream
    opt = Adam(model.named_parameters(), lr=2e-2)
    with pytest.raises(ValueError, match=rf"^resume={re.escape(repr(str(bad)))}: {match}") as info:
        fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=opt,
            schedule=WarmupCosine(opt, warmup_steps=3, total_steps=40), epochs=3, batch_size=32,
            val=(d.X_val, d.y_val), random_state=rng, clip_grad_norm=1.0, resume=bad, verbose=False)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    assert_same_weights_as(model, before)  # nothing was restored
    assert rng.bit_generator.state == rng_before


def test_a_model_state_that_does_not_fit_names_the_file_and_changes_nothing(tmp_path):
    bad = _tampered(tmp_path, **{"optim__state.0.lora_A.weight.exp_avg": np.ones((7, 7), np.float32)})
    model = nn.inject_lora(pretrained(), r=2, alpha=4, dropout=0.1, random_state=1)
    before = model.state_dict()
    d = TASKS.downstream
    opt = Adam(model.named_parameters(), lr=2e-2)
    with pytest.raises(ValueError, match=rf"^resume={re.escape(repr(str(bad)))}: the checkpoint's 'optim\.\*' "
                                         r"arrays: "):
        fit(model, d.X_train, d.y_train, loss="cross_entropy", optimizer=opt,
            schedule=WarmupCosine(opt, warmup_steps=3, total_steps=40), epochs=3, batch_size=32,
            val=(d.X_val, d.y_val), clip_grad_norm=1.0, resume=bad, verbose=False)
    assert_same_weights_as(model, before)  # the model's part, loaded first, was put back


def test_resume_refuses_fewer_epochs_than_done_and_a_finished_run_is_a_no_op(tmp_path):
    path = tmp_path / "run.npz"
    model, _, _, history = lora_run(2, checkpoint=path)
    with pytest.raises(ValueError, match=rf"^resume={re.escape(repr(str(path)))} has completed 2 epochs, more "
                                         r"than epochs=1: pass epochs >= 2 to continue it$"):
        lora_run(1, resume=path)
    again, _, _, history_again = lora_run(2, resume=path, model_seed=5)
    assert history_again == history
    assert_same_weights(again, model)


# ---------------------------------------------------------------- the checkpoint path, checked before any epoch


def _unwritable_folder(tmp_path):
    """A folder where no file can be created, or a skip when run as root (root ignores the mode)."""
    import tempfile

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return str(folder)
    folder.chmod(0o700)
    pytest.skip("a read-only folder is writable here (root)")


def test_a_bad_checkpoint_path_fails_before_the_first_epoch(tmp_path):
    d = TASKS.pretrain
    calls = {"n": 0}

    def counting_loss(out, y):
        calls["n"] += 1
        return F.cross_entropy(out, y)

    def run(checkpoint):
        model = pretrained()
        fit(model, d.X_train, d.y_train, loss=counting_loss, optimizer=SGD(model.parameters(), lr=0.1), epochs=1,
            batch_size=32, checkpoint=checkpoint, verbose=False)

    with pytest.raises(ValueError, match=r"^checkpoint must be a path, got ''$"):
        run("")
    with pytest.raises(IsADirectoryError, match=r"^cannot write checkpoint '.*': it is a folder$"):
        run(tmp_path)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"^cannot write checkpoint '.*/file/run\.npz': '.*/file' is a file"):
        run(tmp_path / "file" / "run.npz")
    assert calls["n"] == 0
    with pytest.raises(PermissionError, match=r"^cannot write checkpoint '.*/run\.npz': the folder '.*' is not "
                                              r"writable$"):
        run(f"{_unwritable_folder(tmp_path)}/run.npz")
    assert calls["n"] == 0


def test_ignored_targets_are_left_out_of_the_loss_and_accuracy_whatever_the_batches():
    """cross_entropy and its accuracy average the kept targets: evaluate's batch_size changes nothing."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((7, 3))
    layer = nn.Linear(3, 4, bias=False, dtype=np.float64, random_state=0)
    target = np.array([-100, -100, 1, 2, 3, -100, 0])  # rows 0-1 (one batch of 2) keep nothing
    z = X @ layer.weight.data.T  # (7, 4): the loss by hand over the 4 kept rows
    kept = target != -100
    lse = np.log(np.exp(z).sum(axis=1))
    want_loss = np.mean(lse[kept] - z[kept, target[kept]])
    want_acc = np.mean(np.argmax(z, axis=1)[kept] == target[kept])
    for batch_size in (1, 2, 3, 7):
        got = evaluate(layer, X, target, loss="cross_entropy", batch_size=batch_size)
        assert got.loss == pytest.approx(want_loss, rel=1e-12), batch_size
        assert got.accuracy == pytest.approx(want_acc, rel=1e-12), batch_size
    hist = fit(layer, X, target, loss="cross_entropy", optimizer=SGD(layer.named_parameters(), lr=0.0), epochs=1,
               batch_size=3, shuffle=False, verbose=False)  # fmt: skip
    assert hist.train_loss[0] == pytest.approx(want_loss, rel=1e-12)
    assert hist.train_acc[0] == pytest.approx(want_acc, rel=1e-12)
