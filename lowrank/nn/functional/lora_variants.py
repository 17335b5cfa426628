"""LoRA on an Embedding and on a fused projection (loralib's ``MergedLinear``): forward and backward.

LoRA on transformers' ``Conv1D`` needs no kernel of its own: it is
:func:`lowrank.nn.functional.lora_linear` with the base weight passed as the
``(out, in)`` view ``weight.T`` (PEFT's ``fan_in_fan_out``). The two kernels
here are the ones whose maths differs from ``lora_linear``:

- :func:`lora_embedding`: ``y = W[idx] + scaling * A.T[idx] @ B.T`` (PEFT's
  ``lora_embedding_A (r, num_embeddings)``, ``lora_embedding_B
  (embedding_dim, r)``); the gradient of ``A`` is scattered, repeated indices
  summed.
- :func:`lora_merged_linear`: a fused projection whose output is ``k_total``
  equal blocks (GPT-2's ``c_attn``: q, k, v), with an update on the blocks
  ``enable_lora`` marks only (loralib's ``MergedLinear``): the ``j``-th
  enabled block gets ``scaling * B_j @ A_j``.

Each public kernel checks its arguments and calls its ``*_core``. The
derivations are in ``docs/lora_variants.md``, symbol for symbol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.nn.functional.checks import (
    as_grad,
    as_input,
    as_mask,
    as_param,
    check_bias,
    check_cache,
    check_fits,
    check_weight,
)
from lowrank.nn.functional.dense import LoRAGrads
from lowrank.nn.functional.embedding import EmbeddingCache, check_indices, embedding_backward_core
from lowrank.utils.validation import check_bool, check_real

__all__ = [
    "LoRAEmbeddingCache",
    "LoRAEmbeddingGrads",
    "LoRAMergedCache",
    "check_enable_lora",
    "enabled_rows",
    "lora_embedding",
    "lora_embedding_backward",
    "lora_embedding_backward_core",
    "lora_embedding_core",
    "lora_merged_linear",
    "lora_merged_linear_backward",
    "lora_merged_linear_backward_core",
    "lora_merged_linear_core",
    "merged_delta_core",
]


# ---------------------------------------------------------------- LoRA on an Embedding


@dataclass(frozen=True, slots=True)
class LoRAEmbeddingCache:
    """What :func:`lora_embedding_backward` needs.

    Attributes
    ----------
    lookup : EmbeddingCache
        The indices, flattened to (N,): the row lookup both tables share, whose
        backward (:func:`embedding_backward_core`) scatters ``dA`` and ``dW``.
    ea : ndarray of shape (N, r)
        ``A.T[idx]``, the rows of ``A.T`` looked up.
    weight, A, B : ndarray
        The caller's arrays, referenced.
    scaling : float
    idx_shape : tuple of int
        The indices' shape, restored on ``dy``'s leading dimensions.
    """

    lookup: EmbeddingCache
    ea: np.ndarray
    weight: np.ndarray
    A: np.ndarray
    B: np.ndarray
    scaling: float
    idx_shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoRAEmbeddingGrads:
    """Gradients of :func:`lora_embedding`; ``weight`` is None unless the base is trainable.

    An integer input has no gradient, so there is no ``x``.
    """

    A: np.ndarray
    B: np.ndarray
    weight: np.ndarray | None


def lora_embedding(idx: Any, weight: Any, A: Any, B: Any, scaling: float) -> tuple[np.ndarray, LoRAEmbeddingCache]:
    """``y = W[idx] + scaling * A.T[idx] @ B.T``: LoRA on an Embedding, as PEFT computes it.

    The update of the table is ``ΔW = scaling * (B @ A).T`` of shape
    ``(num_embeddings, embedding_dim)``, and row ``i`` of it is
    ``scaling * A[:, i] @ B.T``, so looking up ``A.T`` and multiplying by
    ``B.T`` never forms ``ΔW``. PEFT applies no dropout on an Embedding's
    LoRA path (its ``lora_dropout`` is not called there), so neither does this.

    Parameters
    ----------
    idx : ndarray of int, any shape
        Token ids in ``[0, num_embeddings)``.
    weight : ndarray of shape (num_embeddings, embedding_dim)
    A : ndarray of shape (r, num_embeddings)
        PEFT's ``lora_embedding_A``, weight's dtype.
    B : ndarray of shape (embedding_dim, r)
        PEFT's ``lora_embedding_B``.
    scaling : float

    Returns
    -------
    y : ndarray of shape (*idx.shape, embedding_dim)
    cache : LoRAEmbeddingCache
    """
    weight = as_input(weight, "weight")
    if weight.ndim != 2 or weight.size == 0:
        raise ValueError(f"weight must be a non-empty 2-D array (num_embeddings, embedding_dim), got {weight.shape}")
    num, dim = weight.shape
    idx = check_indices(idx, num, "idx")
    A = as_param(A, "A", weight.dtype, "weight")
    B = as_param(B, "B", weight.dtype, "weight")
    if A.ndim != 2 or A.shape[0] == 0 or A.shape[1] != num:
        raise ValueError(f"A must have shape (r, num_embeddings) with r >= 1 and num_embeddings = {num}, got {A.shape}")
    if B.shape != (dim, A.shape[0]):
        raise ValueError(f"B must have shape (embedding_dim, r) = ({dim}, {A.shape[0]}), got {B.shape}")
    return lora_embedding_core(idx, weight, A, B, check_real(scaling, "scaling"))


def lora_embedding_core(
    idx: np.ndarray, weight: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float
) -> tuple[np.ndarray, LoRAEmbeddingCache]:
    """:func:`lora_embedding` without validation: ``idx`` integer and in range, shapes and dtypes fit."""
    dim = weight.shape[1]
    flat = idx.reshape(-1)  # (N,)
    ea = A.T[flat]  # (N, r): a fancy index copies, so ea is C-contiguous
    y = weight[flat]  # (N, dim)
    y += ea @ (scaling * B).T  # (N, dim); scaling applied to the small B
    lookup = EmbeddingCache(indices=flat, num_embeddings=weight.shape[0], embedding_dim=dim, dtype=weight.dtype)
    cache = LoRAEmbeddingCache(lookup=lookup, ea=ea, weight=weight, A=A, B=B, scaling=scaling, idx_shape=idx.shape)
    return y.reshape(*idx.shape, dim), cache


def lora_embedding_backward(dy: Any, cache: LoRAEmbeddingCache, base_trainable: bool = False) -> LoRAEmbeddingGrads:
    """Gradients of :func:`lora_embedding`.

    ``dB = scaling * dy.T @ ea``; ``dea = scaling * dy @ B``, scattered back to
    ``A``'s columns: ``dA[:, i] = Σ_{n: idx[n] = i} dea[n]``; ``dW[i] = Σ_{n:
    idx[n] = i} dy[n]`` only when ``base_trainable``. Derivation:
    ``docs/lora_variants.md``.

    Parameters
    ----------
    dy : ndarray of shape (*idx.shape, embedding_dim)
    cache : LoRAEmbeddingCache
    base_trainable : bool, default False

    Returns
    -------
    LoRAEmbeddingGrads
        ``.A`` (r, num_embeddings), ``.B`` (embedding_dim, r), ``.weight``
        (num_embeddings, embedding_dim) or None.
    """
    check_cache(cache, LoRAEmbeddingCache, "lora_embedding")
    base_trainable = check_bool(base_trainable, "base_trainable")
    dy = as_grad(dy, (*cache.idx_shape, cache.weight.shape[1]), cache.weight.dtype, "the output y")
    return lora_embedding_backward_core(dy, cache, base_trainable=base_trainable)


def lora_embedding_backward_core(
    dy: np.ndarray, cache: LoRAEmbeddingCache, base_trainable: bool = False
) -> LoRAEmbeddingGrads:
    """:func:`lora_embedding_backward` without validation: ``dy`` has the output's shape and dtype."""
    lookup, ea, B, scaling = cache.lookup, cache.ea, cache.B, cache.scaling
    dim = cache.weight.shape[1]
    dy = dy.reshape(ea.shape[0], dim)  # (N, dim)
    dB = scaling * (dy.T @ ea)  # (dim, r)
    dea = dy @ (scaling * B)  # (N, r): the gradient reaching the rows A.T[idx]
    dA = embedding_backward_core(dea, lookup).T.copy()  # (r, num): scattered, repeated indices summed
    dW = embedding_backward_core(dy, lookup) if base_trainable else None  # (num, dim)
    return LoRAEmbeddingGrads(A=dA, B=dB, weight=dW)


# ---------------------------------------------------------------- loralib's MergedLinear: LoRA on some blocks


def enabled_rows(out_features: int, enable_lora: tuple[bool, ...]) -> np.ndarray:
    """The output rows the update reaches, in order: loralib's ``lora_ind``.

    The ``out_features`` outputs are ``len(enable_lora)`` equal blocks
    (q, k, v for ``c_attn``); the rows of the enabled blocks, ascending.

    Returns
    -------
    ndarray of int of shape (out_features // len(enable_lora) * sum(enable_lora),)
    """
    d = out_features // len(enable_lora)
    return np.concatenate([np.arange(g * d, (g + 1) * d) for g, on in enumerate(enable_lora) if on])


@dataclass(frozen=True, slots=True)
class LoRAMergedCache:
    """What :func:`lora_merged_linear_backward` needs.

    Attributes
    ----------
    x, xm : ndarray of shape (N, in_features)
        The input and ``x * mask``, batch dimensions flattened.
    xa : ndarray of shape (N, k, r)
        ``xm @ A_j.T`` for each of the ``k`` enabled blocks.
    weight, A, B : ndarray
        The caller's arrays, referenced.
    rows : ndarray of int of shape (k * d,)
        :func:`enabled_rows`.
    scaling : float
    mask : ndarray or None
    has_bias : bool
    x_shape : tuple of int
    """

    x: np.ndarray
    xm: np.ndarray
    xa: np.ndarray
    weight: np.ndarray
    A: np.ndarray
    B: np.ndarray
    rows: np.ndarray
    scaling: float
    mask: np.ndarray | None
    has_bias: bool
    x_shape: tuple[int, ...]


def lora_merged_linear(
    x: Any,
    weight: Any,
    bias: Any,
    A: Any,
    B: Any,
    scaling: float,
    enable_lora: Any,
    dropout_mask: Any = None,
) -> tuple[np.ndarray, LoRAMergedCache]:
    """``y = x @ W.T + b + scaling * (x * mask) @ ΔW.T``, ΔW nonzero on the enabled blocks only.

    loralib's ``MergedLinear``: ``A`` stacks ``k = sum(enable_lora)`` factors
    ``A_j (r, in)``, ``B`` stacks ``k`` factors ``B_j (d, r)`` with ``d =
    out_features / len(enable_lora)``, and the rows of the ``j``-th enabled
    block of ``ΔW (out, in)`` are ``B_j @ A_j`` (loralib computes it as a
    grouped 1-D convolution with ``groups = k``); the rows of a disabled
    block are 0. ``enable_lora=[True, False, True]`` on GPT-2's fused
    ``c_attn`` adapts W_q and W_v only, the LoRA paper's setting.

    Parameters
    ----------
    x : ndarray of shape (..., in_features)
    weight : ndarray of shape (out_features, in_features)
        ``W``; for a Conv1D base pass ``conv1d_weight.T``.
    bias : ndarray of shape (out_features,) or None
    A : ndarray of shape (k * r, in_features)
    B : ndarray of shape (k * d, r)
    scaling : float
    enable_lora : sequence of bool
        One per block; its length divides ``out_features``; at least one True.
    dropout_mask : ndarray broadcastable to x's shape, optional

    Returns
    -------
    y : ndarray of shape (..., out_features)
    cache : LoRAMergedCache
    """
    x = as_input(x)
    weight = check_weight(weight, x.dtype)
    check_fits(x, weight)
    bias = check_bias(bias, weight, x.dtype)
    out_features, in_features = weight.shape
    enable = check_enable_lora(enable_lora, out_features)
    k, d = sum(enable), out_features // len(enable)
    A = as_param(A, "A", x.dtype)
    B = as_param(B, "B", x.dtype)
    if A.ndim != 2 or A.shape[0] == 0 or A.shape[0] % k or A.shape[1] != in_features:
        raise ValueError(
            f"A must have shape (k * r, in_features) with k = sum(enable_lora) = {k}, r >= 1 and "
            f"in_features = {in_features}, got {A.shape}"
        )
    r = A.shape[0] // k
    if B.shape != (k * d, r):
        raise ValueError(
            f"B must have shape (k * d, r) = ({k * d}, {r}) with d = out_features / {len(enable)}, got {B.shape}"
        )
    scaling = check_real(scaling, "scaling")
    mask = None if dropout_mask is None else as_mask(dropout_mask, x, "dropout_mask")
    return lora_merged_linear_core(x, weight, bias, A, B, scaling, enabled_rows(out_features, enable), mask)


def check_enable_lora(enable_lora: Any, out_features: int) -> tuple[bool, ...]:
    """``enable_lora`` as a tuple of bools: at least one True, its length dividing ``out_features``."""
    if isinstance(enable_lora, (str, bytes)) or not hasattr(enable_lora, "__iter__"):
        raise TypeError(f"enable_lora must be a list of bools such as [True, False, True], got {enable_lora!r}")
    enable = tuple(enable_lora)
    if not enable or not all(isinstance(e, (bool, np.bool_)) for e in enable):
        raise TypeError(
            f"enable_lora must be a non-empty list of bools such as [True, False, True], got {enable_lora!r}"
        )
    enable = tuple(bool(e) for e in enable)
    if not any(enable):
        raise ValueError(f"enable_lora must enable at least one block, got {list(enable)}")
    if out_features % len(enable):
        raise ValueError(
            f"len(enable_lora) must divide out_features = {out_features} (equal blocks), got {len(enable)}"
        )
    return enable


def lora_merged_linear_core(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
    rows: np.ndarray,
    dropout_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, LoRAMergedCache]:
    """:func:`lora_merged_linear` without validation; ``rows`` is :func:`enabled_rows`."""
    out_features, in_features = weight.shape
    n = math.prod(x.shape[:-1])
    r, d = B.shape[1], B.shape[0] * B.shape[1] // A.shape[0]
    k = A.shape[0] // r
    x2 = x.reshape(n, in_features)  # (N, in)
    mask = dropout_mask
    xm = x2 if mask is None else (x * mask).reshape(n, in_features)  # (N, in)
    xa = (xm @ A.T).reshape(n, k, r)  # (N, k, r): block j is xm @ A_j.T
    y = x2 @ weight.T  # (N, out)
    Bs = (scaling * B).reshape(k, d, r)  # (k, d, r): B_j, scaled
    # one product per enabled block, added into its slice of y (a view; k is 1 to 3 in practice). Measured
    # by benchmarks/bench_lora_variants.py (N = 2048, 768 -> 2304, r = 8, a loaded machine): the step took
    # 1.47x a LoRALinear step on the whole projection with one einsum scattered through y[:, rows], 1.06x so
    for j, start in enumerate(rows[::d]):
        y[:, start : start + d] += xa[:, j] @ Bs[j].T  # (N, d)
    if bias is not None:
        y += bias  # (N, out)
    cache = LoRAMergedCache(
        x=x2, xm=xm, xa=xa, weight=weight, A=A, B=B, rows=rows, scaling=scaling, mask=mask,
        has_bias=bias is not None, x_shape=x.shape,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features), cache


def lora_merged_linear_backward(dy: Any, cache: LoRAMergedCache, base_trainable: bool = False) -> LoRAGrads:
    """Gradients of :func:`lora_merged_linear`: per enabled block ``j``, LoRA's rule on ``dy_j = dy[:, rows_j]``.

    ``dB_j = scaling * dy_j.T @ xa_j``, ``dxa_j = scaling * dy_j @ B_j``,
    ``dA_j = dxa_j.T @ xm``, ``dx = dy @ W + (Σ_j dxa_j @ A_j) * mask``;
    ``dW = dy.T @ x``, ``db = Σ_batch dy`` only when ``base_trainable``.
    Derivation: ``docs/lora_variants.md``.

    Returns
    -------
    LoRAGrads
        ``.x`` (..., in_features), ``.A`` (k * r, in_features), ``.B`` (k * d, r),
        ``.weight`` (out_features, in_features) and ``.bias`` or None.
    """
    check_cache(cache, LoRAMergedCache, "lora_merged_linear")
    base_trainable = check_bool(base_trainable, "base_trainable")
    dy = as_grad(dy, (*cache.x_shape[:-1], cache.weight.shape[0]), cache.x.dtype, "the output y")
    return lora_merged_linear_backward_core(dy, cache, base_trainable=base_trainable)


def lora_merged_linear_backward_core(dy: np.ndarray, cache: LoRAMergedCache, base_trainable: bool = False) -> LoRAGrads:
    """:func:`lora_merged_linear_backward` without validation: ``dy`` has the output's shape and dtype."""
    x, xm, xa, W, A, B = cache.x, cache.xm, cache.xa, cache.weight, cache.A, cache.B
    scaling, mask, rows = cache.scaling, cache.mask, cache.rows
    n, (out_features, in_features) = x.shape[0], W.shape
    _, k, r = xa.shape
    d = B.shape[0] // k
    dy = dy.reshape(n, out_features)  # (N, out)
    Bs = (scaling * B).reshape(k, d, r)  # (k, d, r)
    dB = np.empty((k, d, r), dtype=B.dtype)  # (k, d, r)
    dxa = np.empty((n, k, r), dtype=B.dtype)  # (N, k, r)
    for j, start in enumerate(rows[::d]):  # per enabled block, as the forward (see there)
        dy_j = dy[:, start : start + d]  # (N, d): the gradient reaching block j
        dB[j] = scaling * (dy_j.T @ xa[:, j])  # (d, r)
        dxa[:, j] = dy_j @ Bs[j]  # (N, r)
    dB = dB.reshape(k * d, r)
    dxa = dxa.reshape(n, k * r)
    dA = (xm.T @ dxa).T.copy()  # (k*r, in); the order lora_linear_backward_core uses
    dxm = (dxa @ A).reshape(cache.x_shape)  # (..., in)
    if mask is not None:
        dxm *= mask
    dx = dy @ W  # (N, in)
    dx += dxm.reshape(n, in_features)
    dW = db = None
    if base_trainable:
        dW = dy.T @ x  # (out, in)
        db = dy.sum(axis=0) if cache.has_bias else None  # (out,)
    return LoRAGrads(x=dx.reshape(cache.x_shape), A=dA, B=dB, weight=dW, bias=db)


def merged_delta_core(A: np.ndarray, B: np.ndarray, scaling: float, rows: np.ndarray, out_features: int) -> np.ndarray:
    """The update ``ΔW`` of :func:`lora_merged_linear` in float64 (loralib's ``merge_AB() * scaling``).

    Block ``j``'s rows are ``scaling * B_j @ A_j``, a disabled block's 0.

    Returns
    -------
    ndarray of shape (out_features, in_features), float64
    """
    r = B.shape[1]
    k = A.shape[0] // r
    d = B.shape[0] // k
    A64 = A.astype(np.float64).reshape(k, r, -1)  # (k, r, in)
    B64 = B.astype(np.float64).reshape(k, d, r)  # (k, d, r)
    delta = np.zeros((out_features, A.shape[1]))  # (out, in)
    delta[rows] = scaling * np.matmul(B64, A64).reshape(k * d, -1)  # (k*d, in)
    return delta
