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
        ({"loss": "hinge"}, ValueError, "loss must be one of 'cross_entropy', 'mse', 'bce' or a callable, got 'hinge'"),
        ({"loss": 3}, TypeError, "loss must be a loss name or a callable"),
        ({"epochs": 0}, ValueError, r"epochs must be in \[1, inf\], got 0"),
        ({"batch_size": 0}, ValueError, r"batch_size must be in \[1, inf\], got 0"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an integer"),
        ({"val": np.ones(3)}, TypeError, "val must be a pair"),
        ({"val": (np.ones((3, 8)), np.ones(2))}, ValueError, r"val\[1\] must have one target per sample of val\[0\]"),
        ({"early_stopping": 2}, ValueError, "early_stopping needs val"),
        ({"early_stopping": 0, "val": (np.ones((2, 8)), np.zeros(2, int))}, ValueError, "early_stopping must be in"),
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
        ({"loss": "hinge"}, ValueError, "loss must be one of 'cross_entropy', 'mse', 'bce' or None, got 'hinge'"),
        ({"shuffle": 1}, TypeError, "shuffle must be True or False"),
        ({"has_val": "yes"}, TypeError, "has_val must be True or False"),
        ({"clip_grad_norm": 0.0}, ValueError, r"clip_grad_norm must be in \(0, inf\)"),
        ({"clip_grad_norm": -1.0}, ValueError, "clip_grad_norm must be in"),
        ({"clip_grad_norm": math.nan}, ValueError, "clip_grad_norm"),
        ({"clip_grad_norm": "1"}, TypeError, "clip_grad_norm"),
        ({"early_stopping": 2}, ValueError, "early_stopping needs val"),
        ({"early_stopping": 0, "has_val": True}, ValueError, r"early_stopping must be in \[1, inf\], got 0"),
        ({"early_stopping": 1.5, "has_val": True}, TypeError, "early_stopping must be an integer"),
        ({"checkpoint": "/nonexistent/folder/run.npz"}, FileNotFoundError, "the folder /nonexistent/folder does not"),
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
        "clip_grad_norm": 1.0, "early_stopping": 2, "checkpoint": str(tmp_path / "run.npz"),
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
                     "has_val": True, "clip_grad_norm": 1.0, "early_stopping": 3, "checkpoint": str(path),
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
