"""GPT-2 by hand: transformers' ``GPT2LMHeadModel``, its key names and layouts, forward and backward.

The model is assembled from the layers of :mod:`lowrank.nn.modules`
(``Embedding``, ``LayerNorm``, ``Conv1D``, ``Linear``, ``GELU``) and the
attention kernel of :mod:`lowrank.nn.functional`; every formula lives there
and in ``docs/attention.md``, and ``docs/gpt2.md`` describes the assembly.
The module tree is named exactly as transformers names it, so parameter keys
match 1:1 and :func:`lowrank.nn.inject_lora` finds the layers PEFT targets::

    GPT2
      transformer
        wte  Embedding (vocab_size, n_embd)          token embedding, tied to lm_head
        wpe  Embedding (n_positions, n_embd)         position embedding
        h.0 … h.{n_layer-1}  GPT2Block
          ln_1  LayerNorm
          attn  GPT2Attention: c_attn Conv1D (n_embd, 3 n_embd), c_proj Conv1D (n_embd, n_embd)
          ln_2  LayerNorm
          mlp   GPT2MLP: c_fc Conv1D (n_embd, 4 n_embd), act GELU("tanh"), c_proj Conv1D (4 n_embd, n_embd)
        ln_f  LayerNorm
      lm_head  Linear (n_embd → vocab_size, no bias), its weight the same Parameter as wte's

>>> import numpy as np
>>> from lowrank import nn
>>> model = nn.GPT2(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2, random_state=0)
>>> logits = model(np.array([[1, 2, 3]]))
>>> logits.shape
(1, 3, 11)
>>> loss, dlogits = nn.lm_loss(logits, np.array([[1, 2, 3]]))
>>> dx = model.backward(dlogits)   # fills .grad of every trainable parameter
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from lowrank.nn import functional as F
from lowrank.nn.modules import (
    GELU,
    Conv1D,
    Embedding,
    IncompatibleKeys,
    LayerNorm,
    Linear,
    Module,
    Sequential,
)
from lowrank.utils.validation import (
    RandomState,
    as_float_array,
    check_bool,
    check_finite,
    check_float_dtype,
    check_int,
    check_random_state,
    check_real,
)

__all__ = [
    "GPT2",
    "GPT2MLP",
    "IGNORED_BUFFERS",
    "GPT2Attention",
    "GPT2Block",
    "GPT2Config",
    "GPT2Model",
    "check_token_ids",
    "lm_accuracy",
    "lm_loss",
    "shift_labels",
]

# Keys some transformers versions put in GPT-2 state dicts that are not weights:
# ``attn.bias``, the causal mask as a (1, 1, n_positions, n_positions) buffer, and
# ``attn.masked_bias``, the -1e4 written where the mask is False. The model applies its
# causal mask itself, so ``load_state_dict`` drops them (as transformers does today).
IGNORED_BUFFERS = re.compile(r"transformer\.h\.\d+\.(attn|crossattention)\.(bias|masked_bias)")


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2's hyperparameters, with transformers' names and defaults (GPT-2 small); checked once.

    Attributes
    ----------
    vocab_size : int, default 50257
    n_positions : int, default 1024
        The longest sequence the model reads (rows of ``wpe``).
    n_embd : int, default 768
        The width of the residual stream; divisible by ``n_head``.
    n_layer : int, default 12
    n_head : int, default 12
    layer_norm_epsilon : float, default 1e-5
    embd_pdrop, attn_pdrop, resid_pdrop : float in [0, 1), default 0.1
        Dropout after the embeddings, on the attention weights, and on the
        output of each attention and MLP sub-block; active in training mode only.
    initializer_range : float, default 0.02
        The standard deviation of the initial weights (transformers' init:
        ``N(0, 0.02²)``, the ``c_proj`` weights ``N(0, (0.02 / sqrt(2 n_layer))²)``,
        biases 0, LayerNorm weight 1 and bias 0).

    The MLP's inner width is ``4 * n_embd`` and its activation GPT-2's
    ``gelu_new`` (GELU's tanh form): transformers' defaults, the only ones
    this model supports.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {
            name: check_int(getattr(self, name), name, low=1)
            for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        }
        checked["layer_norm_epsilon"] = check_real(self.layer_norm_epsilon, "layer_norm_epsilon", 0.0, low_open=True)
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            checked[name] = check_real(getattr(self, name), name, 0.0, 1.0, high_open=True)
        checked["initializer_range"] = check_real(self.initializer_range, "initializer_range", 0.0)
        if checked["n_embd"] % checked["n_head"] != 0:
            raise ValueError(
                f"n_embd must be divisible by n_head (each head gets n_embd / n_head features), "
                f"got n_embd={checked['n_embd']} and n_head={checked['n_head']}"
            )
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: the checked, normalised values

    @property
    def head_dim(self) -> int:
        """Features per attention head, ``n_embd // n_head``."""
        return self.n_embd // self.n_head

    @classmethod
    def from_transformers(cls, config: Any) -> GPT2Config:
        """The config of a ``transformers.GPT2Config`` (or its ``to_dict()``), refusing what this model lacks.

        Raises ValueError for a setting that changes the computation and that
        this model does not implement: ``n_inner`` other than None or
        ``4 * n_embd``, an activation other than ``"gelu_new"``,
        ``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx``,
        ``add_cross_attention``, untied word embeddings.
        """
        d = dict(config if isinstance(config, Mapping) else config.to_dict())
        unsupported = {
            "activation_function": ("gelu_new", d.get("activation_function", "gelu_new")),
            "scale_attn_weights": (True, d.get("scale_attn_weights", True)),
            "scale_attn_by_inverse_layer_idx": (False, d.get("scale_attn_by_inverse_layer_idx", False)),
            "add_cross_attention": (False, d.get("add_cross_attention", False)),
            "tie_word_embeddings": (True, d.get("tie_word_embeddings", True)),
        }
        bad = [f"{k}={got!r} (supported: {want!r})" for k, (want, got) in unsupported.items() if got != want]
        n_inner = d.get("n_inner")
        if n_inner is not None and n_inner != 4 * d.get("n_embd", cls.n_embd):
            bad.append(f"n_inner={n_inner!r} (supported: None or 4 * n_embd)")
        if bad:
            raise ValueError("config has settings lowrank's GPT2 does not implement: " + ", ".join(bad))
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain Python values."""
        return asdict(self)


# ---------------------------------------------------------------- token ids and the LM loss


def check_token_ids(input_ids: Any, vocab_size: int, n_positions: int, name: str = "input_ids") -> np.ndarray:
    """``input_ids`` as an integer array of shape (batch, T) with ids in [0, vocab_size) and T <= n_positions.

    Raises
    ------
    TypeError
        Not an integer array (a float array of whole numbers too: token ids
        are never rounded silently).
    ValueError
        Not 2-D, empty, longer than ``n_positions``, or an id out of range
        (the message names the first one and its index).
    """
    ids = F.check_indices(input_ids, vocab_size, name)  # integers in [0, vocab_size), or the named error
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape (batch, T) with batch >= 1 and T >= 1, got shape {ids.shape}")
    if ids.shape[1] > n_positions:
        raise ValueError(
            f"{name} must have at most n_positions = {n_positions} tokens per sequence, got T = {ids.shape[1]}"
        )
    return ids


def shift_labels(labels: np.ndarray, ignore_index: int = -100) -> np.ndarray:
    """The next-token targets of ``labels`` (batch, T): ``labels[:, t + 1]`` at position t, ``ignore_index`` last.

    transformers' causal-LM loss shifts the same way: the logits at position
    t predict the token at t + 1, and the last position predicts nothing.
    """
    target = np.full(labels.shape, ignore_index, dtype=np.int64)  # (B, T)
    target[:, :-1] = labels[:, 1:]
    return target


def _check_lm_inputs(logits: Any, labels: Any, ignore_index: Any) -> tuple[np.ndarray, np.ndarray, int]:
    logits = as_float_array(logits, "logits")
    labels = np.asarray(labels)
    ignore_index = check_int(ignore_index, "ignore_index")
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (batch, T, vocab_size), got shape {logits.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must hold integer token ids, got dtype {labels.dtype}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape logits.shape[:2] = {logits.shape[:2]} for logits of shape "
            f"{logits.shape}, got labels of shape {labels.shape}"
        )
    vocab_size = logits.shape[2]
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"labels must hold token ids in [0, vocab_size-1] = [0, {vocab_size - 1}] or ignore_index = "
            f"{ignore_index}, got {labels[index]} at index {index}"
        )
    return logits, labels, ignore_index


def lm_loss(logits: Any, labels: Any, ignore_index: int = -100) -> tuple[float, np.ndarray]:
    """The next-token loss of a causal language model, exactly as transformers' ``GPT2LMHeadModel(labels=...)``.

    ``loss = mean over t < T-1, labels[:, t+1] != ignore_index of
    cross_entropy(logits[:, t], labels[:, t+1])``: the labels are shifted
    inside (pass ``labels = input_ids``), positions whose *next* label is
    ``ignore_index`` are left out of the mean, and so is the last position.
    It is :func:`lowrank.nn.functional.cross_entropy` with ``ignore_index`` on
    the targets :func:`shift_labels` makes.

    Parameters
    ----------
    logits : ndarray of shape (batch, T, vocab_size)
        The model's output.
    labels : ndarray of int of shape (batch, T)
        Token ids in [0, vocab_size), or ``ignore_index``.
    ignore_index : int, default -100

    Returns
    -------
    loss : float
        Accumulated in float64.
    dlogits : ndarray of logits' shape and dtype
        Zero at the last position and wherever the next label is ignored.

    Raises
    ------
    ValueError
        Logits not (batch, T, vocab_size) or not finite, labels of another
        shape or out of range, or no position left to count (T = 1, or every
        next label ignored: PyTorch returns NaN there, lowrank refuses).
    TypeError
        Labels that are not integers.
    """
    logits, labels, ignore_index = _check_lm_inputs(logits, labels, ignore_index)
    check_finite(logits, "logits")
    return F.cross_entropy_core(logits, shift_labels(labels, ignore_index), ignore_index)


def lm_accuracy(logits: np.ndarray, labels: np.ndarray, ignore_index: int = -100) -> float:
    """The fraction of counted positions (as in :func:`lm_loss`) whose largest logit is the next label."""
    target = shift_labels(np.asarray(labels), ignore_index)  # (B, T)
    counted = target != ignore_index
    if not counted.any():
        return float("nan")
    return float(np.mean(np.argmax(logits, axis=-1)[counted] == target[counted]))


# ---------------------------------------------------------------- the blocks


def _draw_mask(module: Module, shape: tuple[int, ...], p: float, dtype: np.dtype) -> np.ndarray | None:
    """A dropout mask from the module's generator in training mode with ``p > 0``; else None (no draw)."""
    if not module.training or p == 0.0:
        return None
    return F.dropout_mask(shape, p, module.generator, dtype)


class GPT2Attention(Module):
    """Causal multi-head self-attention with a fused qkv projection, as transformers' ``GPT2Attention``.

    ``qkv = c_attn(x)`` (batch, T, 3 C) splits into q, k, v (C each, in that
    order), each viewed as ``n_head`` heads of ``C / n_head`` features;
    ``y = softmax(q kᵀ / sqrt(head_dim) + causal mask) v`` per head
    (:func:`lowrank.nn.functional.scaled_dot_product_attention`), the heads
    concatenated again, ``out = dropout(c_proj(y))``.

    Parameters
    ----------
    n_embd, n_head : int
        ``n_embd`` divisible by ``n_head`` (checked by :class:`GPT2Config`).
    attn_pdrop, resid_pdrop : float
        Dropout on the attention weights and on the output.
    dtype : float32 or float64
    random_state : None, int or numpy.random.Generator
        Initializes the projections and draws the dropout masks.
    """

    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float = 0.0, resid_pdrop: float = 0.0,
                 dtype: Any = np.float32, random_state: RandomState = None) -> None:
        super().__init__()
        rng = check_random_state(random_state)
        self._set_generator(rng)
        self.n_embd, self.n_head, self.head_dim = n_embd, n_head, n_embd // n_head
        self.attn_pdrop, self.resid_pdrop = attn_pdrop, resid_pdrop
        self.c_attn = Conv1D(n_embd, 3 * n_embd, dtype=dtype, random_state=rng)
        self.c_proj = Conv1D(n_embd, n_embd, dtype=dtype, random_state=rng)

    def forward(self, x: Any) -> np.ndarray:
        """``x`` (batch, T, n_embd) → (batch, T, n_embd)."""
        qkv = self.c_attn(x)  # (B, T, 3C)
        B, T, _ = qkv.shape
        H, D = self.n_head, self.head_dim
        heads = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D), a view
        q, k, v = heads[0], heads[1], heads[2]  # (B, H, T, D) each
        attn_mask = _draw_mask(self, (B, H, T, T), self.attn_pdrop, qkv.dtype)
        y, attn_cache = F.scaled_dot_product_attention_core(q, k, v, None, True, attn_mask, None)  # (B, H, T, D)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, self.n_embd)  # (B, T, C): the heads side by side
        out = self.c_proj(y)  # (B, T, C)
        resid_mask = _draw_mask(self, out.shape, self.resid_pdrop, out.dtype)
        if resid_mask is not None:
            out = out * resid_mask  # not in place: c_proj's cache may hold its output (DoRA, as Tanh does)
        self._save_for_backward((attn_cache, resid_mask), out)
        return out

    def backward(self, dy: Any) -> np.ndarray:
        """``dy`` (batch, T, n_embd) → ``dx``; adds into the projections' gradients."""
        (attn_cache, resid_mask), dy = self._take_for_backward(dy)
        if resid_mask is not None:
            dy = dy * resid_mask
        dh = self.c_proj.backward(dy)  # (B, T, C)
        B, T, C = dh.shape
        H, D = self.n_head, self.head_dim
        g = F.scaled_dot_product_attention_backward_core(dh.reshape(B, T, H, D).transpose(0, 2, 1, 3), attn_cache)
        dqkv = np.empty((B, T, 3, H, D), dtype=dh.dtype)  # (B, T, 3C) once reshaped
        dqkv[:, :, 0] = g.q.transpose(0, 2, 1, 3)  # (B, T, H, D)
        dqkv[:, :, 1] = g.k.transpose(0, 2, 1, 3)
        dqkv[:, :, 2] = g.v.transpose(0, 2, 1, 3)
        return self.c_attn.backward(dqkv.reshape(B, T, 3 * C))

    def extra_repr(self) -> str:
        """``n_embd=…, n_head=…``."""
        return f"n_embd={self.n_embd}, n_head={self.n_head}"


class GPT2MLP(Module):
    """``dropout(c_proj(gelu_tanh(c_fc(x))))``, as transformers' ``GPT2MLP`` (inner width 4 n_embd).

    Parameters
    ----------
    n_embd : int
    resid_pdrop : float
    dtype : float32 or float64
    random_state : None, int or numpy.random.Generator
    """

    def __init__(self, n_embd: int, resid_pdrop: float = 0.0, dtype: Any = np.float32,
                 random_state: RandomState = None) -> None:
        super().__init__()
        rng = check_random_state(random_state)
        self._set_generator(rng)
        self.resid_pdrop = resid_pdrop
        self.c_fc = Conv1D(n_embd, 4 * n_embd, dtype=dtype, random_state=rng)
        self.act = GELU("tanh")  # GPT-2's "gelu_new"
        self.c_proj = Conv1D(4 * n_embd, n_embd, dtype=dtype, random_state=rng)

    def forward(self, x: Any) -> np.ndarray:
        """``x`` (batch, T, n_embd) → (batch, T, n_embd)."""
        out = self.c_proj(self.act(self.c_fc(x)))  # (B, T, C), through (B, T, 4C)
        mask = _draw_mask(self, out.shape, self.resid_pdrop, out.dtype)
        if mask is not None:
            out = out * mask  # not in place: c_proj's cache may hold its output (DoRA, as Tanh does)
        self._save_for_backward(mask, out)
        return out

    def backward(self, dy: Any) -> np.ndarray:
        """``dy`` (batch, T, n_embd) → ``dx``; adds into c_fc's and c_proj's gradients."""
        mask, dy = self._take_for_backward(dy)
        if mask is not None:
            dy = dy * mask
        return self.c_fc.backward(self.act.backward(self.c_proj.backward(dy)))


class GPT2Block(Module):
    """One pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Parameters
    ----------
    config : GPT2Config
    dtype : float32 or float64
    random_state : None, int or numpy.random.Generator
    """

    def __init__(self, config: GPT2Config, dtype: Any = np.float32, random_state: RandomState = None) -> None:
        super().__init__()
        rng = check_random_state(random_state)
        c = config
        self.ln_1 = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon, dtype=dtype)
        self.attn = GPT2Attention(c.n_embd, c.n_head, c.attn_pdrop, c.resid_pdrop, dtype=dtype, random_state=rng)
        self.ln_2 = LayerNorm(c.n_embd, eps=c.layer_norm_epsilon, dtype=dtype)
        self.mlp = GPT2MLP(c.n_embd, c.resid_pdrop, dtype=dtype, random_state=rng)

    def forward(self, x: Any) -> np.ndarray:
        """``x`` (batch, T, n_embd) → (batch, T, n_embd)."""
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        out: np.ndarray = x + self.mlp(self.ln_2(x))
        return out

    def backward(self, dy: Any) -> np.ndarray:
        """Both residual branches: ``dx = dy + ln_1ᵀ(attnᵀ(dy'))`` with ``dy' = dy + ln_2ᵀ(mlpᵀ(dy))``."""
        dy = dy + self.ln_2.backward(self.mlp.backward(dy))  # (B, T, C): through the MLP branch and around it
        dx: np.ndarray = dy + self.ln_1.backward(self.attn.backward(dy))
        return dx


class GPT2Model(Module):
    """transformers' ``GPT2Model``: embeddings, the blocks, the final LayerNorm; hidden states out.

    ``h = dropout(wte[input_ids] + wpe[0..T-1])``, then each block, then
    ``ln_f``. Build it through :class:`GPT2`; its input is checked there.

    Parameters
    ----------
    config : GPT2Config
    dtype : float32 or float64
    random_state : None, int or numpy.random.Generator
    """

    def __init__(self, config: GPT2Config, dtype: Any = np.float32, random_state: RandomState = None) -> None:
        super().__init__()
        rng = check_random_state(random_state)
        self._set_generator(rng)
        self.config = config
        self.wte = Embedding(config.vocab_size, config.n_embd, dtype=dtype, random_state=rng)
        self.wpe = Embedding(config.n_positions, config.n_embd, dtype=dtype, random_state=rng)
        self.h = Sequential(*(GPT2Block(config, dtype=dtype, random_state=rng) for _ in range(config.n_layer)))
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype)

    def forward(self, x: Any) -> np.ndarray:
        """``input_ids`` (batch, T), checked by the caller → hidden states (batch, T, n_embd)."""
        T = x.shape[1]
        h = self.wte(x) + self.wpe(np.arange(T))  # (B, T, C) + (T, C)
        mask = _draw_mask(self, h.shape, self.config.embd_pdrop, h.dtype)
        if mask is not None:
            h *= mask
        out = self.ln_f(self.h(h))  # (B, T, C)
        self._save_for_backward(mask, out)
        return out

    def backward(self, dy: Any) -> np.ndarray:
        """``dy`` (batch, T, n_embd) → the gradient with respect to ``wte[input_ids] + wpe[positions]``."""
        mask, dy = self._take_for_backward(dy)
        dh = self.h.backward(self.ln_f.backward(dy))  # (B, T, C)
        if mask is not None:
            dh = dh * mask
        self.wte.backward(dh)  # scatters into wte.weight.grad
        self.wpe.backward(dh.sum(axis=0))  # (T, C): one position row, summed over the batch
        return dh


class GPT2(Module):
    """GPT-2 with its language-model head: transformers' ``GPT2LMHeadModel``, by hand.

    ``logits = model(input_ids)``; ``model.backward(dlogits)`` fills
    ``.grad`` of every trainable parameter. Build it from a
    :class:`GPT2Config` or from the config's fields as keywords::

        GPT2(vocab_size=..., n_positions=..., n_embd=..., n_layer=..., n_head=..., random_state=0)

    Parameters
    ----------
    config : GPT2Config, optional
        Or give its fields as keyword arguments (not both).
    dtype : float32 or float64, default float32
    random_state : None, int or numpy.random.Generator
        Resolved once: draws the initial weights (transformers' init, see
        :class:`GPT2Config`), then every dropout mask in training mode. Each
        layer with dropout keeps it as its :attr:`~Module.generator`, so
        :func:`lowrank.train.fit` saves and restores it with a checkpoint.
    **fields
        :class:`GPT2Config`'s fields.

    Notes
    -----
    The tied head
        ``lm_head.weight`` *is* ``transformer.wte.weight`` (one Parameter):
        ``logits = h @ wte.weightᵀ``. Both uses add their gradient into
        ``wte.weight.grad`` (the embedding's scatter and the head's
        ``dlogitsᵀ h``), so it holds their sum, as PyTorch's autograd
        gives for transformers' tied weights. ``named_parameters()`` lists the
        Parameter once, as ``transformer.wte.weight`` (an optimizer steps it
        once); ``state_dict()`` adds ``lm_head.weight``, a copy of it, so the
        keys are exactly ``GPT2LMHeadModel.state_dict()``'s.
    Loading transformers' weights
        ``load_state_dict`` takes ``{k: v.numpy() for k, v in hf.state_dict().items()}``
        (dtypes must match the model's). ``lm_head.weight`` may be absent (a
        checkpoint saved without the tied copy); if present it must equal
        ``transformer.wte.weight`` exactly, and a dict holding only the head
        loads it into the embedding. The non-persistent buffers older
        transformers versions saved, ``transformer.h.N.attn.bias`` (the causal
        mask) and ``transformer.h.N.attn.masked_bias``, are ignored
        (:data:`IGNORED_BUFFERS`).
    LoRA
        The sub-modules are ordinary registered Modules named as in
        transformers, so ``inject_lora`` replaces ``c_attn``, ``c_proj``,
        ``c_fc`` or ``wte`` by name; without targets it adapts every
        Conv1D projection and leaves the tied ``lm_head`` alone. ``lm_head``
        is a :class:`Linear` sharing wte's weight: freezing either freezes
        both (as in PyTorch), and merging an adapter of either changes both.
    """

    takes_token_ids = True  # lowrank.train.fit passes integer X through unchanged

    def __init__(self, config: GPT2Config | None = None, *, dtype: Any = np.float32,
                 random_state: RandomState = None, **fields: Any) -> None:
        super().__init__()
        if config is None:
            config = GPT2Config(**fields)
        elif not isinstance(config, GPT2Config):
            raise TypeError(f"config must be a GPT2Config, got {type(config).__name__}")
        elif fields:
            raise TypeError(f"give either config or its fields as keywords, not both; got config and {sorted(fields)}")
        dtype = check_float_dtype(dtype)
        rng = check_random_state(random_state)
        self.config = config
        self.transformer = GPT2Model(config, dtype=dtype, random_state=rng)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, dtype=dtype, random_state=rng)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one Parameter, both gradients summed into it
        self._init_weights(rng)  # then rng draws the dropout masks, as the generator of transformer, attn and mlp

    def _init_weights(self, rng: np.random.Generator) -> None:
        """GPT-2's init as in transformers: ``N(0, range²)``, ``c_proj`` ``N(0, range² / (2 n_layer))``, biases 0.

        Drawn in float64 then cast, in the order of ``named_parameters()``, so
        both dtypes start from the same numbers.
        """
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.data[...] = 1.0
            elif name.endswith(".bias"):
                p.data[...] = 0.0
            else:
                scale = std / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else std
                p.data[...] = rng.normal(0.0, scale, p.shape)

    @property
    def n_params(self) -> int:
        """The number of parameters, the tied head counted once (as transformers' ``num_parameters()``)."""
        return sum(p.size for p in self.parameters())

    def forward(self, x: Any) -> np.ndarray:
        """``input_ids`` (batch, T) of integers → logits (batch, T, vocab_size); checks the ids once.

        Raises TypeError for ids that are not integers, ValueError for ids
        out of ``[0, vocab_size)`` or ``T > n_positions``.
        """
        ids = check_token_ids(x, self.config.vocab_size, self.config.n_positions)
        h = self.transformer(ids)  # (B, T, C)
        return self.lm_head(h)  # (B, T, V)

    def backward(self, dy: Any) -> np.ndarray:
        """``dlogits`` (batch, T, vocab_size) → the gradient with respect to the summed input embeddings (B, T, C).

        Adds into every trainable parameter's ``.grad``; the token embedding's
        holds the sum of its two uses (the lookup and the tied head).
        """
        return self.transformer.backward(self.lm_head.backward(dy))

    # -- state: transformers' keys

    def state_dict(self) -> dict[str, np.ndarray]:
        """``named_parameters()``'s arrays plus ``lm_head.weight`` (a copy of the tied embedding), last."""
        state = super().state_dict()
        state["lm_head.weight"] = self.lm_head.weight.data.copy()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """:meth:`Module.load_state_dict` for transformers' ``GPT2LMHeadModel`` keys; see the class Notes.

        ``lm_head.weight`` is optional and must equal ``transformer.wte.weight``
        (ValueError otherwise); the keys of :data:`IGNORED_BUFFERS` are dropped.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping from names to arrays, got {type(state_dict).__name__}")
        strict = check_bool(strict, "strict")
        state = {k: v for k, v in state_dict.items() if not (isinstance(k, str) and IGNORED_BUFFERS.fullmatch(k))}
        wte_key = next(name for name, p in self.named_parameters() if p is self.lm_head.weight)
        if "lm_head.weight" in state:
            head = state.pop("lm_head.weight")
            if wte_key not in state:
                state[wte_key] = head  # the head alone: it is the embedding
            elif not np.array_equal(np.asarray(head), np.asarray(state[wte_key])):
                raise ValueError(
                    f"load_state_dict for GPT2: lm_head.weight must equal {wte_key} (the head is tied to the "
                    f"token embedding), but the two arrays differ"
                )
        return super().load_state_dict(state, strict)

    def extra_repr(self) -> str:
        """The config's sizes."""
        c = self.config
        return (f"vocab_size={c.vocab_size}, n_positions={c.n_positions}, n_embd={c.n_embd}, "
                f"n_layer={c.n_layer}, n_head={c.n_head}")
