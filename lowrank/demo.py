"""``lowrank demo``: the story in numbers, every one measured in this run.

``run_demo`` returns plain JSON-ready data; ``format_report`` turns it into
the text the command prints.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import lowrank
from lowrank.utils.validation import check_int, check_random_state


def nine_by_nine(seed: int = 0) -> dict[str, Any]:
    """The 9×9 example: a multiplication table plus a little noise, factorized three ways.

    The table ``outer(1..9, 1..9)`` has rank 1, so 18 numbers hold it where
    the dense matrix needs 81; the noise makes the error against rank worth
    looking at. For each rank the Eckart–Young optimum (the tail of the
    singular values, the truncated SVD's error) is the floor; against it
    stand the randomized SVD with 2 oversampling columns and no power
    iteration (``randomized_q0``) or one (``randomized_q1``), and ALS from a
    random start (``als``, with its number of sweeps). ``relative_error`` is
    the truncated SVD's own measured error.
    """
    rng = check_random_state(seed)
    k = np.arange(1.0, 10.0)
    M = np.outer(k, k) + 0.5 * rng.standard_normal((9, 9))  # (9, 9)
    norm = float(np.linalg.norm(M))
    s_all = np.linalg.svd(M, compute_uv=False)
    predicted = lowrank.eckart_young_errors(s_all)
    rows = []
    for rank in range(1, 10):
        lr = lowrank.truncated_svd(M, rank).to_lowrank()
        randomized = {
            q: float(np.linalg.norm(M - lowrank.randomized_svd(
                M, rank, oversample=2, n_iter=q, random_state=seed).to_lowrank().to_dense()) / norm)
            for q in (0, 1)
        }
        fit = lowrank.als(M, rank, init="random", tol=1e-10, max_iter=200, random_state=seed)
        rows.append({
            "rank": rank,
            "params": lr.n_params,
            "relative_error": lr.error(M, relative=True),
            "eckart_young": float(predicted[rank]) / norm,
            "randomized_q0": randomized[0],
            "randomized_q1": randomized[1],
            "als": float(np.linalg.norm(M - fit.left @ fit.right) / norm),
            "als_sweeps": fit.n_iter,
        })
    return {"dense_params": M.size, "ranks": rows}


def completion(seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """ALS fills in a low-rank matrix from 40 % of its entries."""
    m, n, rank = (60, 40, 3) if quick else (300, 200, 5)
    rng = check_random_state(seed)
    M = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))  # (m, n), rank 5
    mask = rng.random((m, n)) < 0.4
    start = time.perf_counter()
    fit = lowrank.als(np.where(mask, M, np.nan), rank, mask=mask, init="svd", tol=1e-12,
                      max_iter=300, random_state=seed)
    seconds = time.perf_counter() - start
    hidden = ~mask
    err = np.linalg.norm((fit.left @ fit.right - M)[hidden]) / np.linalg.norm(M[hidden])
    return {"shape": [m, n], "rank": rank, "observed_fraction": float(mask.mean()),
            "sweeps": fit.n_iter, "relative_error_hidden": float(err), "seconds": seconds}


def gpt3_budget() -> dict[str, Any]:
    """LoRA on GPT-3 175B: W_q and W_v of 96 layers at r = 1."""
    total = 175_255.8e6
    trainable = lowrank.lora_param_count(d_model=12288, n_layers=96, n_matrices=2, r=1)
    return {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total}


# The demo's network and training settings, chosen so that the whole story
# runs in well under a minute on 2 cores (the --quick sizes in a few seconds).
_HIDDEN = 128  # the student MLP: n_features -> 128 -> n_classes, tanh like the teacher
_BATCH = 128
_PRETRAIN_LR, _FULL_LR, _LORA_LR = 3e-3, 3e-3, 1e-2  # LoRA's few parameters take a larger step
_RANKS = (1, 2, 4, 8)
_TOP = (1, 2, 4, 8)


def _train(model: Any, task: Any, lr: float, epochs: int, seed: int) -> tuple[dict[str, Any], float]:
    from lowrank.nn.optim import Adam
    from lowrank.train.fit import fit

    optimizer = Adam(model.named_parameters(), lr=lr)
    start = time.perf_counter()
    history = fit(model, task.X_train, task.y_train, loss="cross_entropy", optimizer=optimizer,
                  epochs=epochs, batch_size=_BATCH, val=(task.X_val, task.y_val),
                  random_state=seed, verbose=False)
    return history.to_dict(), time.perf_counter() - start


def _top_right_vectors(delta: np.ndarray, k: int) -> np.ndarray:
    """The top-``k`` right singular vectors of ``delta``, as rows: the input directions it acts on."""
    return lowrank.truncated_svd(delta.astype(np.float64), k).Vt  # (k, in)


def subspace_similarity(Vi: np.ndarray, Vj: np.ndarray) -> float:
    """The LoRA paper's §7.2 measure ``φ(i, j) = ‖U_iᵀ U_j‖²_F / min(i, j)``, in [0, 1].

    ``Vi (i, d)`` and ``Vj (j, d)`` hold orthonormal rows: 1 when one span
    contains the other, 0 when they are orthogonal.
    """
    return float(np.sum((Vi @ Vj.T) ** 2) / min(Vi.shape[0], Vj.shape[0]))


def linear_layer_names(model: Any) -> list[str]:
    """The dotted module names of ``model``'s Linear layers, LoRA-wrapped or not, in order.

    For ``MLP([32, 128, 6])``, a Sequential of Linear, activation, Linear:
    ``["0", "2"]``; ``inject_lora`` keeps the names.
    """
    from lowrank.nn import Linear, LoRALinear

    return [name for name, m in model.named_modules() if isinstance(m, (Linear, LoRALinear))]


def _adapt(task: Any, pretrained: dict[str, np.ndarray], layer_sizes: list[int], layer: str, epochs: int,
           seed: int) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Fine-tune copies of the pretrained MLP on ``task``: fully, by LoRA and by DoRA at each rank.

    DoRA trains the same factors plus one magnitude per output feature of each
    adapted layer, with the same settings (alpha, learning rate, epochs).

    Returns a row per method and the updates of the Linear layer named
    ``layer``: ``"full"``, ``W_finetuned - W_pretrained``, and ``"lora8"``,
    ``scaling * B @ A`` at r = 8.
    """
    from lowrank.nn import MLP, inject_lora

    rows, updates = [], {}
    full_params = sum(int(np.prod(v.shape)) for v in pretrained.values())
    for method in ["full"] + [f"lora r={r}" for r in _RANKS] + [f"dora r={r}" for r in _RANKS]:
        student = MLP(layer_sizes, activation="tanh", random_state=seed)
        student.load_state_dict(pretrained)
        if method == "full":
            lr = _FULL_LR
        else:
            r = int(method.split("=")[1])
            use_dora = method.startswith("dora")  # + m (out,) per layer, counted among the trainable
            inject_lora(student, r=r, alpha=2 * r, use_dora=use_dora, random_state=seed)  # scaling 2 at every rank
            lr = _LORA_LR
        history, seconds = _train(student, task, lr, epochs, seed)
        trainable = sum(p.size for p in student.parameters() if p.trainable)
        rows.append({
            "method": method,
            "trainable_params": trainable,
            "percent_of_full": 100 * trainable / full_params,
            "val_acc": history["val_acc"][-1],
            "val_loss": history["val_loss"][-1],
            "seconds": seconds,
            "val_loss_curve": history["val_loss"],
        })
        adapted: Any = dict(student.named_modules())[layer]  # a Linear, or a LoRALinear
        if method == "full":
            updates["full"] = adapted.weight.data.astype(np.float64) - pretrained[f"{layer}.weight"]  # (hidden, in)
        elif method == "lora r=8":
            updates["lora8"] = adapted.scaling * (adapted.B.data.astype(np.float64) @ adapted.A.data)  # (hidden, in)
    return rows, updates


def _energy_top(s: np.ndarray) -> dict[str, float]:
    """The fraction of ``‖ΔW‖_F²`` in its top 1, 2, 4, 8 singular directions, from its singular values ``s``."""
    kept = lowrank.energy_kept(s)
    return {str(k): float(kept[k]) for k in _TOP}


def adaptation(seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Pretrain an MLP on task A, then adapt it to task B by full fine-tuning and by LoRA.

    Returns the pretraining curve; a row per method (trainable parameters,
    their share of the full model, validation accuracy and loss, seconds);
    the analysis of the full fine-tuning update of the first layer,
    ``ΔW = W_finetuned − W_pretrained``: the energy of its top singular
    directions, and their similarity to the LoRA r=8 update's and to the
    planted change's input directions; and, for contrast, the same methods
    on a task whose change from A is full-rank.
    """
    from lowrank.nn import MLP
    from lowrank.train.data import make_tasks

    sizes: dict[str, Any] = dict(n_pretrain=4_000, n_downstream=1_000, n_val=1_000) if quick else {}
    pre_epochs, ft_epochs = (4, 6) if quick else (12, 15)
    tasks = make_tasks(random_state=seed, **sizes)
    A, B, C = tasks.pretrain, tasks.downstream, tasks.contrast
    layer_sizes = [A.n_features, _HIDDEN, A.n_classes]

    model = MLP(layer_sizes, activation="tanh", random_state=seed)
    pretrain_history, pretrain_seconds = _train(model, A, _PRETRAIN_LR, pre_epochs, seed)
    pretrained = model.state_dict()
    before = _evaluate_on(model, B)

    first = linear_layer_names(model)[0]  # the layer whose update ΔW is analysed
    rows, updates = _adapt(B, pretrained, layer_sizes, first, ft_epochs, seed)
    contrast_rows, contrast_updates = _adapt(C, pretrained, layer_sizes, first, ft_epochs, seed)

    return {
        "layer_sizes": layer_sizes,
        "planted_rank": B.delta_rank,
        "labels_changed": B.label_change,
        "pretrain": {"epochs": pre_epochs, "val_acc": pretrain_history["val_acc"][-1],
                     "val_loss": pretrain_history["val_loss"][-1], "seconds": pretrain_seconds,
                     "val_loss_curve": pretrain_history["val_loss"]},
        "before_adaptation": before,
        "finetune_epochs": ft_epochs,
        "methods": rows,
        "delta_w": _delta_w_analysis(updates, tasks.delta_low, B.delta_rank, f"{first}.weight"),
        "contrast": {
            "planted_rank": C.delta_rank,
            "labels_changed": C.label_change,
            "before_adaptation": _evaluate_on(model, C),
            "methods": contrast_rows,
            "energy_top": _energy_top(np.linalg.svd(contrast_updates["full"], compute_uv=False)),
        },
    }


def _delta_w_analysis(updates: dict[str, np.ndarray], planted_delta: np.ndarray, planted_rank: int,
                      layer: str) -> dict[str, Any]:
    """The full fine-tuning update's spectrum and energy; its subspaces next to LoRA's and the planted one's."""
    delta = updates["full"]  # (hidden, in)
    s = np.linalg.svd(delta, compute_uv=False)
    planted = _top_right_vectors(planted_delta, planted_rank)
    full_top = {k: _top_right_vectors(delta, k) for k in _TOP}
    lora_top = {k: _top_right_vectors(updates["lora8"], k) for k in _TOP}
    return {
        "layer": layer,
        "singular_values": s.tolist(),
        "energy_top": _energy_top(s),
        "similarity_lora8_vs_full": {f"{i},{j}": subspace_similarity(lora_top[i], full_top[j])
                                     for i in _TOP for j in _TOP},
        "similarity_full_vs_planted": {str(k): subspace_similarity(full_top[k], planted) for k in _TOP},
    }


def _evaluate_on(model: Any, task: Any) -> dict[str, float | None]:
    from lowrank.train.fit import evaluate

    loss, acc = evaluate(model, task.X_val, task.y_val)
    return {"val_loss": loss, "val_acc": acc}


# ---------------------------------------------------------------- part 7: the paper in miniature

# A tiny GPT-2 and a sequence task: token x_{t+1} = (x_t + s) mod V, the stride s drawn per sequence.
# Pretraining uses strides 1-3, the downstream task strides 4-5: the same rule, continued with strides
# the model has never seen. Sizes chosen so that part 7 takes a few seconds on 2 cores.
_GPT_VOCAB, _GPT_T, _GPT_EMBD, _GPT_LAYERS, _GPT_HEADS = 16, 16, 32, 2, 2
_GPT_PRE_STRIDES, _GPT_NEW_STRIDES = (1, 2, 3), (4, 5)
_GPT_BATCH, _GPT_RANK = 64, 4
_GPT_FULL_LR, _GPT_LORA_LR = 3e-3, 1e-2
# method -> inject_lora's arguments (None: full fine-tuning); every LoRA variant at rank _GPT_RANK, alpha 2r
_GPT_METHODS: dict[str, dict[str, Any] | None] = {
    "full": None,
    "lora W_q,W_v": {"target_modules": ["c_attn"], "enable_lora": [True, False, True]},  # the paper's choice
    "lora c_attn": {"target_modules": ["c_attn"]},
    "lora all proj": {"target_modules": ["c_attn", "c_proj", "c_fc"]},
}


def stride_sequences(n: int, strides: tuple[int, ...], seed: int) -> np.ndarray:
    """``n`` sequences of ``_GPT_T`` tokens, ``x_{t+1} = (x_t + s) mod V``, start and stride ``s`` drawn per sequence.

    The first token and the stride are random, every later token follows:
    a model must read the stride off the first two tokens (through attention)
    and continue it.
    """
    rng = check_random_state(seed)
    start = rng.integers(0, _GPT_VOCAB, (n, 1))  # (n, 1)
    stride = rng.choice(np.asarray(strides), (n, 1))  # (n, 1)
    return (start + stride * np.arange(_GPT_T)) % _GPT_VOCAB  # (n, T), int64


def _tiny_gpt2(seed: int) -> Any:
    from lowrank.nn import GPT2

    return GPT2(vocab_size=_GPT_VOCAB, n_positions=_GPT_T, n_embd=_GPT_EMBD, n_layer=_GPT_LAYERS,
                n_head=_GPT_HEADS, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, random_state=seed)


def _fit_lm(model: Any, train: np.ndarray, val: np.ndarray, lr: float, epochs: int,
            seed: int) -> tuple[dict[str, Any], float]:
    from lowrank.nn.optim import AdamW
    from lowrank.train.fit import fit

    optimizer = AdamW(model.named_parameters(), lr=lr)
    start = time.perf_counter()
    history = fit(model, train, train, loss="lm", optimizer=optimizer, epochs=epochs, batch_size=_GPT_BATCH,
                  val=(val, val), random_state=seed, verbose=False)
    return history.to_dict(), time.perf_counter() - start


def _qv_updates(model: Any, pretrained: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """ΔW_q and ΔW_v (n_embd, n_embd) of every layer: the merged ``c_attn`` weight minus the pretrained one.

    ``c_attn.weight`` is transformers' Conv1D layout (in, 3 n_embd): columns
    ``[0, C)`` project to q, ``[C, 2C)`` to k, ``[2C, 3C)`` to v.
    """
    from lowrank.nn import merge_lora

    merged = merge_lora(model).state_dict()  # a copy with scaling * B @ A folded in (a plain model: a copy)
    c = _GPT_EMBD
    out = {}
    for i in range(_GPT_LAYERS):
        key = f"transformer.h.{i}.attn.c_attn.weight"
        delta = merged[key].astype(np.float64) - pretrained[key]  # (C, 3C)
        out[f"transformer.h.{i}"] = {"q": delta[:, :c], "v": delta[:, 2 * c:]}
    return out


def _spectrum(delta: np.ndarray) -> dict[str, Any]:
    """Singular values of ``delta``, the energy of its top directions, and its numerical rank."""
    s = np.linalg.svd(delta, compute_uv=False)
    tol = s[0] * max(delta.shape) * np.finfo(np.float32).eps if s[0] > 0 else 0.0  # the weights are float32
    return {"singular_values": s.tolist(), "energy_top": _energy_top(s), "numerical_rank": int(np.sum(s > tol))}


def gpt2_adaptation(seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Part 7: pretrain a tiny GPT-2 on strides 1-3, adapt it to strides 4-5, four ways; ΔW_q and ΔW_v.

    Returns the pretraining result; one row per method (trainable
    parameters, their share of the model, validation loss and next-token
    accuracy, seconds): full fine-tuning, and LoRA at the same rank on W_q and
    W_v only (loralib's ``enable_lora=[True, False, True]`` on the fused
    ``c_attn``), on all of ``c_attn``, and on every projection (``c_attn``,
    ``c_proj``, ``c_fc``); then the singular values of ΔW_q and ΔW_v of each
    layer after full fine-tuning and after LoRA on W_q, W_v.
    """
    from lowrank.nn import inject_lora
    from lowrank.train.fit import evaluate

    n_pre, n_new, n_val = (1_500, 600, 300) if quick else (4_000, 1_000, 500)
    pre_epochs, ft_epochs = (3, 3) if quick else (4, 4)
    pre_train, pre_val = stride_sequences(n_pre, _GPT_PRE_STRIDES, seed), stride_sequences(n_val, _GPT_PRE_STRIDES,
                                                                                            seed + 1)
    new_train, new_val = stride_sequences(n_new, _GPT_NEW_STRIDES, seed + 2), stride_sequences(
        n_val, _GPT_NEW_STRIDES, seed + 3)

    model = _tiny_gpt2(seed)
    pre_history, pre_seconds = _fit_lm(model, pre_train, pre_val, _GPT_FULL_LR, pre_epochs, seed)
    pretrained = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    before = evaluate(model, new_val, new_val, loss="lm")
    n_params = model.n_params

    rows, spectra = [], {}
    for method, lora in _GPT_METHODS.items():
        student = _tiny_gpt2(seed)
        student.load_state_dict(model.state_dict())
        if lora is not None:
            inject_lora(student, r=_GPT_RANK, alpha=2 * _GPT_RANK, random_state=seed, **lora)
        history, seconds = _fit_lm(student, new_train, new_val, _GPT_FULL_LR if lora is None else _GPT_LORA_LR,
                                   ft_epochs, seed)
        trainable = sum(p.size for p in student.parameters() if p.trainable)
        rows.append({"method": method, "trainable_params": trainable, "percent_of_full": 100 * trainable / n_params,
                     "val_loss": history["val_loss"][-1], "val_acc": history["val_acc"][-1], "seconds": seconds,
                     "val_loss_curve": history["val_loss"]})
        if method in ("full", "lora W_q,W_v"):
            spectra[method] = {layer: {w: _spectrum(d) for w, d in qv.items()}
                               for layer, qv in _qv_updates(student, pretrained).items()}
    return {
        "sizes": {"vocab_size": _GPT_VOCAB, "T": _GPT_T, "n_embd": _GPT_EMBD, "n_layer": _GPT_LAYERS,
                  "n_head": _GPT_HEADS, "n_params": n_params},
        "strides": {"pretrain": list(_GPT_PRE_STRIDES), "downstream": list(_GPT_NEW_STRIDES)},
        "rank": _GPT_RANK,
        "pretrain": {"epochs": pre_epochs, "val_loss": pre_history["val_loss"][-1],
                     "val_acc": pre_history["val_acc"][-1], "seconds": pre_seconds},
        "before_adaptation": {"val_loss": before.loss, "val_acc": before.accuracy},
        "finetune_epochs": ft_epochs,
        "methods": rows,
        "delta_qv": spectra,
    }


def run_demo(seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Run every part of the demo and return its measurements."""
    seed = check_int(seed, "seed", 0)
    from lowrank.utils.threads import blas_threads

    start = time.perf_counter()
    with blas_threads(1):  # every matrix here is small: a second thread only costs (see lowrank.utils.threads)
        results = {
            "seed": seed,
            "quick": quick,
            "nine_by_nine": nine_by_nine(seed),
            "completion": completion(seed, quick),
            "gpt3": gpt3_budget(),
            "adaptation": adaptation(seed, quick),
            "gpt2": gpt2_adaptation(seed, quick),
        }
    results["seconds"] = time.perf_counter() - start
    return results


def format_report(results: dict[str, Any]) -> str:
    """The human-readable report of :func:`run_demo`'s results."""
    lines = ["1. A 9×9 matrix (a multiplication table plus noise): rank-r factorizations against the best possible",
             "   relative Frobenius error ‖M − L R‖ / ‖M‖; the Eckart–Young optimum is the floor no method can beat",
             "   rank  params (of 81)  Eckart–Young  randomized q=0  randomized q=1  ALS (random start, sweeps)"]
    for row in results["nine_by_nine"]["ranks"]:
        lines.append(f"   {row['rank']:>4}  {row['params']:>14}  {row['eckart_young']:>12.3e}"
                     f"  {row['randomized_q0']:>14.3e}  {row['randomized_q1']:>14.3e}"
                     f"  {row['als']:>12.3e} ({row['als_sweeps']})")
    dense = results["nine_by_nine"]["dense_params"]
    last = max(row["rank"] for row in results["nine_by_nine"]["ranks"] if row["params"] < dense)
    lines.append(f"   (past rank {last} the two factors hold more numbers than the {dense} of the matrix itself)")
    excess = {key: max(100 * (row[key] / row["eckart_young"] - 1)
                       for row in results["nine_by_nine"]["ranks"] if row["eckart_young"] > 0)
              for key in ("randomized_q0", "randomized_q1", "als")}
    lines.append(f"   Take-away: no method beats the optimum; the randomized SVD misses it by up to "
                 f"{excess['randomized_q0']:.1f} % without a power iteration and {excess['randomized_q1']:.1f} % "
                 f"with one, ALS by {excess['als']:.1f} %, and only ranks up to {last} save memory.")
    c = results["completion"]
    lines += ["", f"2. Matrix completion: a rank-{c['rank']} {c['shape'][0]}×{c['shape'][1]} matrix "
              f"from {100 * c['observed_fraction']:.0f} % of its entries (ALS)",
              f"   relative error on the hidden entries: {c['relative_error_hidden']:.2e} "
              f"after {c['sweeps']} sweeps ({c['seconds']:.2f} s)",
              "   Take-away: a low-rank matrix is determined by far fewer entries than it has; "
              "ALS recovers the hidden ones."]
    g = results["gpt3"]
    lines += ["", "3. LoRA's budget on GPT-3 175B (W_q and W_v of 96 layers, r = 1)",
              f"   trainable {g['trainable']:,} of {g['total']:,.0f} parameters: "
              f"{g['trainable_percent']:.4f} %",
              "   Take-away: r·(in + out) per adapted matrix is a vanishing share of a large model."]
    lines += ["", *_format_adaptation(results["adaptation"])]
    lines += ["", *_format_gpt2(results["gpt2"]), "", f"({results['seconds']:.1f} s in all)"]
    return "\n".join(lines)


def _format_adaptation(a: dict[str, Any]) -> list[str]:
    sizes = " → ".join(str(n) for n in a["layer_sizes"])
    p, b = a["pretrain"], a["before_adaptation"]
    lines = [f"4. Pretrain an MLP ({sizes}, tanh) on task A: val accuracy {p['val_acc']:.3f} "
             f"after {p['epochs']} epochs ({p['seconds']:.1f} s)",
             f"   Task B relabels {100 * a['labels_changed']:.0f} % of inputs by a rank-{a['planted_rank']} change "
             f"to the teacher; the pretrained model scores {b['val_acc']:.3f} on it.",
             "   Take-away: the pretrained model is good at A and worse at B: there is something to adapt.",
             "",
             f"5. Adapt to task B ({a['finetune_epochs']} epochs each)",
             "   method        trainable   % of full   val acc   val loss   seconds"]
    for row in a["methods"]:
        lines.append(f"   {row['method']:<12}  {row['trainable_params']:>9,}  {row['percent_of_full']:>9.2f}"
                     f"  {row['val_acc']:>8.3f}  {row['val_loss']:>9.4f}  {row['seconds']:>8.2f}")
    c = a["contrast"]
    lines += ["",
              f"   For contrast, task C relabels {100 * c['labels_changed']:.0f} % of inputs by a rank-"
              f"{c['planted_rank']} (full-rank) change; the pretrained model scores "
              f"{c['before_adaptation']['val_acc']:.3f} on it:"]
    for row in c["methods"]:
        lines.append(f"   {row['method']:<12}  {row['trainable_params']:>9,}  {row['percent_of_full']:>9.2f}"
                     f"  {row['val_acc']:>8.3f}  {row['val_loss']:>9.4f}  {row['seconds']:>8.2f}")
    by = {row["method"]: row for row in a["methods"]}
    cby = {row["method"]: row for row in c["methods"]}
    r1, full = by["lora r=1"], by["full"]
    lines.append(f"   Take-away: on B's rank-{a['planted_rank']} change LoRA r=1 scores {r1['val_acc']:.3f} "
                 f"against full fine-tuning's {full['val_acc']:.3f} with {r1['percent_of_full']:.1f} % "
                 f"of its parameters; on C's full-rank change r=1 scores {cby['lora r=1']['val_acc']:.3f} "
                 f"against {cby['full']['val_acc']:.3f}: a low rank fits a low-rank change.")
    d = a["delta_w"]
    energy = "  ".join(f"top {k}: {100 * v:.1f} %" for k, v in d["energy_top"].items())
    contrast_energy = "  ".join(f"top {k}: {100 * v:.1f} %" for k, v in c["energy_top"].items())
    planted = "  ".join(f"top {k}: {v:.2f}" for k, v in d["similarity_full_vs_planted"].items())
    lines += ["",
              f"6. The full fine-tuning update ΔW = W_finetuned − W_pretrained of layer {d['layer']}",
              f"   energy of its singular spectrum in the top directions: {energy}",
              f"   (on task C, whose change is full-rank: {contrast_energy})",
              f"   similarity of its top input directions to the planted change's: {planted}",
              "   subspace similarity φ(i, j) = ‖U_iᵀ U_j‖²_F / min(i, j), LoRA r=8 update (i) vs ΔW (j):",
              "          " + "".join(f"j={j:<6}" for j in _TOP)]
    for i in _TOP:
        lines.append(f"   i={i:<4} " + "".join(f"{d['similarity_lora8_vs_full'][f'{i},{j}']:<8.2f}" for j in _TOP))
    lines.append(f"   Take-away: full fine-tuning's ΔW puts {100 * d['energy_top']['2']:.0f} % of its energy in 2 "
                 f"directions on B (against {100 * c['energy_top']['2']:.0f} % on C), and LoRA's top direction "
                 f"is φ(1, 1) = {d['similarity_lora8_vs_full']['1,1']:.2f} aligned with ΔW's: "
                 "LoRA's update points where full fine-tuning's does.")
    return lines


def _format_gpt2(g: dict[str, Any]) -> list[str]:
    z, p, b = g["sizes"], g["pretrain"], g["before_adaptation"]
    lines = [f"7. The LoRA paper in miniature: a GPT-2 ({z['n_layer']} layers, n_embd {z['n_embd']}, "
             f"{z['n_head']} heads, {z['n_params']:,} parameters) learns x_t+1 = x_t + s mod {z['vocab_size']}",
             f"   pretrained on strides {g['strides']['pretrain']}: val next-token accuracy {p['val_acc']:.3f} "
             f"after {p['epochs']} epochs ({p['seconds']:.1f} s); on strides {g['strides']['downstream']} it "
             f"scores {b['val_acc']:.3f} (loss {b['val_loss']:.2f}).",
             f"   Adapt to strides {g['strides']['downstream']} ({g['finetune_epochs']} epochs each, "
             f"LoRA at r = {g['rank']}):",
             "   method          trainable   % of full   val acc   val loss   seconds"]
    for row in g["methods"]:
        lines.append(f"   {row['method']:<14}  {row['trainable_params']:>9,}  {row['percent_of_full']:>9.2f}"
                     f"  {row['val_acc']:>8.3f}  {row['val_loss']:>9.4f}  {row['seconds']:>8.2f}")
    lines.append("   ΔW_q and ΔW_v (n_embd × n_embd): numerical rank, energy in the top 1 / 2 / 4 directions")
    for method, layers in g["delta_qv"].items():
        for layer, ws in layers.items():
            parts = [f"{w}: rank {d['numerical_rank']:>2}, "
                     + " / ".join(f"{100 * d['energy_top'][k]:.0f} %" for k in ("1", "2", "4"))
                     for w, d in ws.items()]
            lines.append(f"   {method:<13} {layer}  " + "   ".join(parts))
    by = {row["method"]: row for row in g["methods"]}
    qv, full, before = by["lora W_q,W_v"]["val_acc"], by["full"]["val_acc"], b["val_acc"]
    share = 100 * (qv - before) / (full - before) if full != before else float("nan")
    last = list(g["delta_qv"]["full"])[-1]
    top4 = 100 * g["delta_qv"]["full"][last]["q"]["energy_top"]["4"]
    lines.append(f"   Take-away: with {by['lora W_q,W_v']['percent_of_full']:.1f} % of the parameters, LoRA on W_q "
                 f"and W_v alone recovers {share:.0f} % of full fine-tuning's gain ({before:.3f} -> {qv:.3f}, "
                 f"full {full:.3f}); full fine-tuning's ΔW_q in {last} is full-rank yet puts {top4:.0f} % of its "
                 "energy in 4 directions, the room a rank-4 update works in.")
    return lines


def check_plot_path(path: str) -> None:
    """Fail fast, before the demo runs: matplotlib must import and ``path`` must be writable.

    See :func:`lowrank.io.files.check_writable` for what writable means and
    what each failure raises (an empty ``path`` is a ValueError).
    """
    from lowrank.io.files import check_writable

    check_writable(path, "--plot")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'lowrank[plot]'") from None


def plot(results: dict[str, Any], path: str) -> None:
    """Draw ΔW's singular spectrum and the loss curves into a PNG at ``path``, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    from lowrank.io.files import atomic_write

    a = results["adaptation"]
    fig, (ax_s, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    s = np.asarray(a["delta_w"]["singular_values"])
    ax_s.semilogy(np.arange(1, s.size + 1), s, "o-", ms=3)
    ax_s.set(title=f"Singular values of ΔW ({a['delta_w']['layer']}, full fine-tuning)",
             xlabel="index", ylabel="singular value")
    ax_s.axvline(a["planted_rank"] + 0.5, color="grey", ls="--", label=f"planted rank {a['planted_rank']}")
    ax_s.legend()
    for row in a["methods"]:
        curve = row["val_loss_curve"]
        ax_l.plot(np.arange(1, len(curve) + 1), curve, label=row["method"])
    ax_l.set(title="Validation loss on task B", xlabel="epoch", ylabel="cross-entropy")
    ax_l.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)

