"""LoRA layers and LoRA on a whole model: LoRALinear, LoRAEmbedding, LoRAMergedLinear, injection, merging, counting.

>>> from lowrank import nn
>>> model = nn.MLP([16, 32, 4], random_state=0)
>>> model = nn.inject_lora(model, r=2, alpha=4, targets=["0"], random_state=0)
>>> text = nn.trainable_summary(model)
trainable params: 96 || all params: 772 || trainable%: 12.4352
>>> plain = nn.merge_lora(model)   # a plain MLP again, LoRA folded into "0.weight"
>>> [name for name, _ in plain.named_parameters()]
['0.weight', '0.bias', '2.weight', '2.bias']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lowrank.io.adapter import BIAS_MODES, lora_scaling, match_target_modules  # the one matcher and scaling rule
from lowrank.nn import functional as F
from lowrank.nn.functional import lora_variants as FV
from lowrank.nn.functional.dora import check_row_norm, row_norm
from lowrank.nn.modules import (
    Conv1D,
    Embedding,
    Linear,
    Module,
    Parameter,
    accumulate_grad,
    as_array_of,
    base_is_trainable,
    check_features,
)
from lowrank.utils.validation import RandomState, check_bool, check_choice, check_int, check_random_state, check_real

__all__ = [
    "ADAPTABLE",
    "LORA_BIAS",
    "LORA_INITS",
    "LORA_LAYERS",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRAMergedLinear",
    "TrainedBeside",
    "check_lora_config",
    "check_pissa_rank",
    "inject_lora",
    "mark_only_lora_as_trainable",
    "match_target_modules",
    "merge_lora",
    "replace_modules",
    "trainable_summary",
    "trained_beside_lora",
]

LORA_INITS = ("kaiming", "gaussian", "pissa")
LORA_BIAS = BIAS_MODES  # PEFT's LoraConfig.bias: which biases train beside the factors, defined with the config

# A per-layer setting (r or alpha in inject_lora): one value for every layer, a mapping from
# layer name to value, or a function of the layer name.
PerLayer = float | Mapping[str, float] | Callable[[str], float]


# ---------------------------------------------------------------- the LoRA settings, checked once


def check_lora_config(
    r: Any, alpha: Any = 8, dropout: Any = 0.0, use_rslora: Any = False, init: Any = "kaiming"
) -> tuple[int, float, float, bool, str]:
    """Check the settings of a LoRA layer; return them normalised.

    The one place these rules live: :class:`LoRALinear` and
    :func:`inject_lora` (before it changes the model) both call it, so a bad
    value gets the same message wherever it is passed.

    Parameters
    ----------
    r : int
        The rank, ``>= 1``.
    alpha : real, default 8
        ``> 0`` and finite.
    dropout : real, default 0.0
        In ``[0, 1)``.
    use_rslora : bool, default False
    init : {"kaiming", "gaussian", "pissa"}, default "kaiming"

    Returns
    -------
    tuple of (int, float, float, bool, str)
        ``(r, alpha, dropout, use_rslora, init)`` as Python scalars.

    Raises
    ------
    TypeError
        A value of the wrong kind (``r=2.0``, ``alpha="8"``, ``use_rslora=1``).
    ValueError
        A value outside its range, or an unknown ``init``.

    Examples
    --------
    >>> check_lora_config(4, 8, 0.1)
    (4, 8.0, 0.1, False, 'kaiming')
    """
    r = check_int(r, "r", low=1)
    alpha = check_real(alpha, "alpha", 0.0, low_open=True)
    dropout = check_real(dropout, "dropout", 0.0, 1.0, high_open=True)
    use_rslora = check_bool(use_rslora, "use_rslora")
    init = check_choice(init, "init", LORA_INITS)
    return r, alpha, dropout, use_rslora, init


def check_pissa_rank(r: int, weight_shape: tuple[int, ...], layer: str | None = None) -> int:
    """Check PiSSA's rule ``r <= min(in_features, out_features)``; return ``r``.

    PiSSA takes the top ``r`` singular triplets of the weight, and a matrix
    of shape ``(out, in)`` has ``min(out, in)`` of them.

    Parameters
    ----------
    r : int
        A rank already checked by :func:`check_lora_config`.
    weight_shape : tuple of (int, int)
        ``(out_features, in_features)``: a Linear's ``weight.shape``.
    layer : str, optional
        The layer's dotted name, to say which one in a model fails.

    Raises
    ------
    ValueError
        ``r`` is larger than the smaller side of the weight.
    """
    out_features, in_features = weight_shape
    if not 1 <= r <= min(in_features, out_features):
        where = "" if layer is None else f"layer {layer!r}, "
        raise ValueError(
            f"r must be in [1, min(in_features, out_features)] = [1, {min(in_features, out_features)}] "
            f"for init='pissa' ({where}weight shape {tuple(weight_shape)}), got {r}"
        )
    return r


# ---------------------------------------------------------------- LoRA


class _Factor(Module):
    """One LoRA factor, held as ``weight``.

    So the state-dict keys read ``lora_A.weight`` and ``lora_B.weight``, as in
    PEFT. Not a layer: it has no forward of its own (LoRALinear's kernel uses
    both factors at once).
    """

    def __init__(self, data: np.ndarray) -> None:
        super().__init__()
        self.weight = Parameter(data)

    def extra_repr(self) -> str:
        """The factor's shape and dtype, for ``repr``."""
        return f"shape={self.weight.shape}, dtype={self.weight.dtype}"


class LoRALinear(Module):
    """A frozen Linear (or Conv1D) plus a trainable low-rank update: ``W + scaling * B @ A``.

    ``y = x @ W.T + b + scaling * (drop(x) @ A.T) @ B.T``
    (:func:`lowrank.nn.functional.lora_linear`); with ``use_dora=True``,
    DoRA's ``y = x @ ((m / n)[:, None] * V).T + b``, ``V = W + scaling * B @ A``,
    ``n = ‖V‖`` per output row (:func:`lowrank.nn.functional.dora_linear`,
    ``docs/dora.md``).

    Parameters
    ----------
    base : Linear or Conv1D
        A :class:`~lowrank.nn.Conv1D` (transformers' layout, weight ``(in,
        out)``) is PEFT's ``fan_in_fan_out=True``: A and B keep LoRA's
        layout ``(r, in)`` and ``(out, r)``, only the base weight is stored
        transposed, so the kernels get the ``(out, in)`` view ``weight.T``
        and ``merge()`` adds ``(scaling * B @ A).T`` into it.
        Wrapped, not copied: its weight and bias Parameters become this
        layer's ``weight`` and ``bias`` and are frozen (``trainable=False``).
        ``init="pissa"`` replaces the weight's data with the residual, and
        ``merge()`` writes into it, so ``base`` always shows the current W.
    r : int, default 8
        The rank of the update, ``>= 1`` (``<= min(in, out)`` for PiSSA).
    alpha : float, default 8
        ``scaling = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
    dropout : float in [0, 1), default 0.0
        Dropout on the input of the LoRA path, in training mode only.
    use_rslora : bool, default False
        Rank-stabilized scaling ``alpha / sqrt(r)`` (Kalajdzievski, 2023).
    init : {"kaiming", "gaussian", "pissa"}, default "kaiming"
        ``"kaiming"``: ``A ~ U(-1/sqrt(in), 1/sqrt(in))``, ``B = 0`` (PyTorch's
        ``kaiming_uniform_(a=sqrt(5))``, as PEFT), so a fresh adapter changes
        nothing. ``"gaussian"``: ``A ~ N(0, (1/r)^2)``, ``B = 0``. ``"pissa"``
        (Meng et al., 2024): from the truncated SVD ``W ≈ U_r diag(s_r) Vt_r``,
        ``A = diag(sqrt(s_r/scaling)) @ Vt_r``, ``B = U_r @ diag(sqrt(s_r/scaling))``,
        and the frozen weight becomes the residual ``W - scaling * B @ A``
        (computed in float64 from the stored A and B, cast once), so the
        layer's output is unchanged up to that one rounding.
    random_state : None, int or numpy.random.Generator
        Resolved once: draws the initial A, then every dropout mask.
    use_dora : bool, default False
        DoRA (Liu et al., 2024): adds the trainable magnitude ``m`` (out,),
        initialised, after A and B (and PiSSA's residual), to the row norms
        ``‖W + scaling * B @ A‖`` exactly as the forward computes them, as PEFT
        does, so a fresh adapter reproduces the base output bit for bit.
        Refused (ValueError) if a row of that matrix has norm 0.

    Attributes
    ----------
    A : Parameter of shape (r, in_features)
        Registered as ``lora_A.weight``.
    B : Parameter of shape (out_features, r)
        Registered as ``lora_B.weight``.
    scaling : float
    fan_in_fan_out : bool
        True for a Conv1D base (weight stored ``(in, out)``).
    merged : bool
        True between ``merge()`` and ``unmerge()``. While merged, forward is
        the plain linear with ``W + scaling * B @ A`` (DoRA: ``(m / n)[:, None] *
        (W + scaling * B @ A)``), ``state_dict()["weight"]`` holds that merged
        W, and backward is refused.
    use_dora : bool
    magnitude : Parameter of shape (out_features,)
        DoRA only: registered as ``lora_magnitude_vector`` (PEFT's name on disk).
    detach_norm : bool
        DoRA only, default True: the gradient treats ``n`` as a constant
        (PEFT's); set it to False for the exact gradient.

    Notes
    -----
    State-dict keys: ``"weight"``, ``"bias"`` (if any), ``"lora_A.weight"``,
    ``"lora_B.weight"``, and with DoRA ``"lora_magnitude_vector"``. Trainable
    numbers: ``r * (in_features + out_features)``, plus ``out_features`` with DoRA.
    The gradients of A and B are always computed by the kernel (they cost
    ``O(N r (in + out))``) and stored only if trainable; the base's are
    computed only if its Parameters are trainable.
    """

    _base: Linear | Conv1D  # held, not registered as a sub-module: its Parameters are, as weight and bias

    def __init__(
        self,
        base: Linear | Conv1D,
        r: int = 8,
        alpha: float = 8,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        random_state: RandomState = None,
        *,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, (Linear, Conv1D)):
            raise TypeError(f"base must be a Linear or a Conv1D, got {type(base).__name__}")
        r, alpha, dropout, use_rslora, init = check_lora_config(r, alpha, dropout, use_rslora, init)
        use_dora = check_bool(use_dora, "use_dora")
        in_features, out_features = base.in_features, base.out_features
        self.fan_in_fan_out = isinstance(base, Conv1D)  # weight stored (in, out): PEFT's fan_in_fan_out
        if init == "pissa":
            check_pissa_rank(r, (out_features, in_features))
        self._set_generator(random_state)
        object.__setattr__(self, "_base", base)  # held, not registered: its Parameters are, below
        self.weight = base.weight
        self.bias = base.bias
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout, self.use_rslora, self.init = r, alpha, dropout, use_rslora, init
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.merged = False
        A, B = self._initial_factors()
        self.lora_A = _Factor(A)  # (r, in)
        self.lora_B = _Factor(B)  # (out, r)
        self.use_dora = use_dora
        self._detach_norm = True
        self._merge_scale: np.ndarray | None = None  # DoRA's m / n, float64 (out,), while merged
        if use_dora:  # after the factors (and PiSSA's residual), as PEFT: the norm the forward divides by
            norm = F.weight_norm_core(self.weight_out_in(), A, B, self.scaling)  # (out,)
            self.lora_magnitude_vector = Parameter(check_row_norm(norm))  # PEFT's key
        self.weight.trainable = False
        if self.bias is not None:
            self.bias.trainable = False

    def _initial_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """A (r, in) and B (out, r) in the weight's dtype; PiSSA also rewrites W."""
        r, n_in, n_out, dtype = self.r, self.in_features, self.out_features, self.weight.dtype
        rng = self.generator
        assert rng is not None  # set in __init__, before this runs
        if self.init == "kaiming":
            bound = 1.0 / math.sqrt(n_in)
            A = rng.uniform(-bound, bound, (r, n_in))
            return A.astype(dtype), np.zeros((n_out, r), dtype)
        if self.init == "gaussian":
            A = rng.normal(0.0, 1.0 / r, (r, n_in))
            return A.astype(dtype), np.zeros((n_out, r), dtype)
        from lowrank.factor.svd import truncated_svd  # lazily: svd is not needed otherwise

        W = self.weight_out_in().astype(np.float64)  # (out, in)
        svd = truncated_svd(W, r)  # U (out, r), s (r,), Vt (r, in)
        root = np.sqrt(svd.s / self.scaling)  # (r,)
        A = (root[:, None] * svd.Vt).astype(dtype)  # (r, in)
        B = (svd.U * root).astype(dtype)  # (out, r)
        # the residual from the factors as stored, so residual + scaling * B @ A == W up to one rounding
        residual = W - self.scaling * (B.astype(np.float64) @ A.astype(np.float64))  # (out, in)
        self._set_weight_out_in(residual.astype(dtype))
        return A, B

    def weight_out_in(self) -> np.ndarray:
        """The base weight as ``(out_features, in_features)``: ``weight``, or the view ``weight.T`` for Conv1D."""
        W = self.weight.data
        return W.T if self.fan_in_fan_out else W

    def _set_weight_out_in(self, W: np.ndarray) -> None:
        """Store an ``(out, in)`` weight in the base's layout (C-contiguous)."""
        self.weight.data = np.ascontiguousarray(W.T) if self.fan_in_fan_out else W

    @property
    def base(self) -> Linear | Conv1D:
        """The wrapped Linear or Conv1D (sharing this layer's weight and bias Parameters)."""
        return self._base

    @property
    def A(self) -> Parameter:
        """The down-projection, shape (r, in_features)."""
        return self.lora_A.weight

    @property
    def B(self) -> Parameter:
        """The up-projection, shape (out_features, r)."""
        return self.lora_B.weight

    @property
    def magnitude(self) -> Parameter:
        """DoRA's magnitude ``m``, shape (out_features,); AttributeError without ``use_dora``."""
        if not self.use_dora:
            raise AttributeError("LoRALinear.magnitude: this layer has no magnitude (built with use_dora=False)")
        magnitude: Parameter = self.lora_magnitude_vector
        return magnitude

    @property
    def detach_norm(self) -> bool:
        """DoRA's gradient mode: True (default, PEFT's) treats ``n`` as a constant, False is exact."""
        return self._detach_norm

    @detach_norm.setter
    def detach_norm(self, value: bool) -> None:
        self._detach_norm = check_bool(value, "detach_norm")

    def adapter_parameters(self) -> list[Parameter]:
        """The parameters the adapter trains: A and B, and DoRA's magnitude."""
        return [self.A, self.B, self.magnitude] if self.use_dora else [self.A, self.B]

    def forward(self, x: Any) -> np.ndarray:
        """Map ``x`` (..., in_features) to ``y`` (..., out_features); checks ``x`` once.

        The parameters are this layer's own, so the kernels' unchecked cores run.
        """
        x = as_array_of(x, "x", self.weight.dtype)
        check_features(x, self.in_features)
        bias = None if self.bias is None else self.bias.data
        cache: F.LinearCache | F.LoRACache | F.DoRACache
        if self.merged:  # the update lives inside W now: the plain linear is the whole layer
            y, cache = F.linear_core(x, self.weight_out_in(), bias)
        else:
            mask = None
            if self.training and self.dropout > 0:
                mask = F.dropout_mask(x.shape, self.dropout, random_state=self.generator, dtype=x.dtype)
            W = self.weight_out_in()  # (out, in): a view for a Conv1D base
            if self.use_dora:
                y, cache = F.dora_linear_core(
                    x, W, bias, self.A.data, self.B.data, self.magnitude.data, self.scaling, mask, self.detach_norm
                )
            else:
                y, cache = F.lora_linear_core(x, W, bias, self.A.data, self.B.data, self.scaling, mask)
        self._save_for_backward(cache, y)
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Map ``dy`` (..., out_features) to ``dx`` (..., in_features); adds into A.grad and B.grad.

        Raises RuntimeError while merged: A and B are inside W then, and their
        gradients need the unmerged forward (``unmerge()``, forward again).
        """
        if self.merged:
            raise RuntimeError("LoRALinear.backward while merged: call unmerge() and run forward again")
        base_trainable = base_is_trainable(self)  # before taking the cache: an error leaves it in place
        cache, dy = self._take_for_backward(dy)  # dy checked there, once
        g: F.LoRAGrads | F.DoRAGrads
        if isinstance(cache, F.DoRACache):
            g = F.dora_linear_backward_core(dy, cache, base_trainable=base_trainable)
            if self.magnitude.trainable:
                accumulate_grad(self.magnitude, g.magnitude)
        else:
            g = F.lora_linear_backward_core(dy, cache, base_trainable=base_trainable)
        if self.A.trainable:
            accumulate_grad(self.A, g.A)
        if self.B.trainable:
            accumulate_grad(self.B, g.B)
        if base_trainable:
            assert g.weight is not None  # computed when base_trainable
            accumulate_grad(self.weight, np.ascontiguousarray(g.weight.T) if self.fan_in_fan_out else g.weight)
            if self.bias is not None:
                accumulate_grad(self.bias, g.bias)
        elif self.bias is not None and self.bias.trainable:  # PEFT's bias="lora_only"/"all": db alone
            accumulate_grad(self.bias, dy.reshape(-1, self.out_features).sum(axis=0))  # (out,)
        return g.x

    def delta_weight(self) -> np.ndarray:
        """The update ``scaling * B @ A``, ndarray of shape (out_features, in_features), float64.

        In LoRA's layout for a Conv1D base too (whose weight takes its transpose).
        """
        B = self.B.data.astype(np.float64)  # (out, r)
        A = self.A.data.astype(np.float64)  # (r, in)
        return self.scaling * (B @ A)  # (out, in)

    def merge(self) -> None:
        """Fold the update into the weight: ``W <- W + scaling * B @ A``.

        Accumulated in float64 and cast to W's dtype once. If the result is not
        finite (overflow in W's dtype, or NaN/inf in A or B) it raises
        FloatingPointError and leaves every weight bit-identical. This is the
        one fold of the package: :func:`merge_lora` calls it on each layer.

        Raises
        ------
        RuntimeError
            The layer is merged already.
        FloatingPointError
            The merged weight would not be finite in W's dtype.
        """
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged (call unmerge() first)")
        if self.use_dora:
            self._merge_dora()
        else:
            self._add_to_weight(+1.0, "merge")
        self.merged = True

    def unmerge(self) -> None:
        """Take the update back out: ``W <- W - scaling * B @ A``, in float64, cast once.

        Tolerance: after ``merge(); unmerge()`` each entry of W is within
        ``eps * (|W| + |scaling * B @ A|)`` of its value before (``eps =
        np.finfo(W.dtype).eps``; one rounding at merge, one here), and is
        bit-identical where ``B @ A`` is 0 (e.g. a fresh adapter).

        DoRA: ``W <- W' / c - scaling * B @ A`` with the float64 ``c = m / n``
        the merge used (the norm cannot be recomputed from the merged W), cast
        once; each entry comes back within ``eps * (|W| + 2 |W + scaling * B @
        A|)`` (``docs/dora.md`` derives it), as long as ``c * V`` stayed in the
        normal range of W's dtype; bit-identical for a fresh adapter.
        """
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        if self.use_dora:
            self._unmerge_dora()
        else:
            self._add_to_weight(-1.0, "unmerge")
        self.merged = False

    def _merge_dora(self) -> None:
        """DoRA's merge: ``W <- c * (W + scaling * B @ A)``, ``c = m / n`` (docs/dora.md), float64, cast once.

        ``n`` is the row norm exactly as the forward computes it (in W's
        dtype), so a fresh adapter (``m == n``) has ``c == 1`` and W keeps
        every bit. Refused (ValueError) if a row norm or a magnitude is 0: a
        zero magnitude erases the row, which unmerge could not restore.
        """
        W = self.weight_out_in()  # (out, in)
        norm = check_row_norm(F.weight_norm_core(W, self.A.data, self.B.data, self.scaling))  # (out,)
        m = self.magnitude.data  # (out,)
        zero = np.flatnonzero(m == 0)
        if zero.size:
            raise ValueError(
                f"LoRALinear.merge refused: magnitude is 0 at rows {zero[:8].tolist()}; the merged weight "
                f"(m / n) * V would erase those rows of W, and unmerge could not restore them"
            )
        scale = m.astype(np.float64) / norm.astype(np.float64)  # (out,): c
        V = W.astype(np.float64) + self.delta_weight()  # (out, in)
        V *= scale[:, None]
        self._set_weight(V, "merge", "(m / n) * (W + scaling * B @ A)")
        self._merge_scale = scale

    def _unmerge_dora(self) -> None:
        """DoRA's unmerge: ``W <- W' / c - scaling * B @ A`` with the merge's ``c``, float64, cast once."""
        scale = self._merge_scale
        assert scale is not None  # set by _merge_dora, the only way merged becomes True with DoRA
        V = self.weight_out_in().astype(np.float64) / scale[:, None]  # (out, in)
        V -= self.delta_weight()
        self._set_weight(V, "unmerge", "W' / (m / n) - scaling * B @ A")
        self._merge_scale = None

    def _set_weight(self, new64: np.ndarray, action: str, what: str) -> None:
        """``W <- new64`` (out, in) cast to W's dtype once; FloatingPointError (W unchanged) if not finite there."""
        new = _cast_once(
            new64, self.weight.dtype, f"LoRALinear.{action} refused: {what}",
            lambda: f"max |W| = {np.abs(self.weight.data).max():.3g}",
        )  # fmt: skip
        self._set_weight_out_in(new)

    def _add_to_weight(self, sign: float, action: str) -> None:
        """``W <- W + sign * scaling * B @ A`` in float64, cast once; refused if not finite.

        For a Conv1D base the ``(out, in)`` view ``weight.T`` is updated, so its
        ``(in, out)`` weight gets ``(scaling * B @ A).T``.
        """
        delta = self.delta_weight()  # (out, in), float64
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused by _cast_once
            new64 = self.weight_out_in().astype(np.float64) + sign * delta  # (out, in)
        new = _cast_once(
            new64, self.weight.dtype, f"LoRALinear.{action} refused: W {'+' if sign > 0 else '-'} scaling * B @ A",
            lambda: f"max |W| = {np.abs(self.weight.data).max():.3g}, "
            f"max |scaling * B @ A| = {np.abs(delta).max():.3g}",
        )  # fmt: skip
        self._set_weight_out_in(new)

    def extra_repr(self) -> str:
        """The layer's sizes and settings, for ``repr``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}, use_rslora={self.use_rslora}, "
            f"init={self.init!r}, merged={self.merged}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
            + (f", use_dora=True, detach_norm={self.detach_norm}" if self.use_dora else "")
        )


def _cast_once(new64: np.ndarray, dtype: np.dtype, refused: str, detail: Callable[[], str]) -> np.ndarray:
    """``new64`` (float64) cast to ``dtype`` once; FloatingPointError if an entry is not finite there.

    The one check of every fold (merge and unmerge of each LoRA layer): the
    message is ``"{refused} would have N non-finite entries in {dtype}
    ({detail()}); the weights are unchanged"``, ``detail`` evaluated only
    then. The caller assigns the result, so on refusal nothing has changed.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # checked right below
        new = new64.astype(dtype)
    finite = np.isfinite(new)
    if not finite.all():
        raise FloatingPointError(
            f"{refused} would have {int(np.count_nonzero(~finite))} non-finite entries in {dtype} "
            f"({detail()}); the weights are unchanged"
        )
    return new


def _add_delta(weight: Parameter, delta: np.ndarray, sign: float, who: str, action: str) -> None:
    """``weight <- weight + sign * delta`` in float64, cast once; FloatingPointError if not finite, weight unchanged.

    ``delta`` is float64 and already in the weight's layout. The fold of
    :class:`LoRAEmbedding` and :class:`LoRAMergedLinear` (the rule of
    :meth:`LoRALinear.merge`).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused by _cast_once
        new64 = weight.data.astype(np.float64) + sign * delta
    weight.data = _cast_once(
        new64, weight.dtype, f"{who}.{action} refused: W {'+' if sign > 0 else '-'} delta",
        lambda: f"max |W| = {np.abs(weight.data).max():.3g}, max |delta| = {np.abs(delta).max():.3g}",
    )  # fmt: skip


class LoRAEmbedding(Module):
    """A frozen Embedding plus a trainable low-rank update, as PEFT's ``lora.Embedding``.

    ``y = W[idx] + scaling * A.T[idx] @ B.T`` (:func:`lowrank.nn.functional.lora_embedding`):
    the table ``W (num_embeddings, embedding_dim)`` gets ``ΔW = scaling * (B @ A).T``.

    Parameters
    ----------
    base : Embedding
        Wrapped, not copied: its weight Parameter becomes this layer's
        ``weight`` and is frozen; ``merge()`` writes into it.
    r : int, default 8
    alpha : float, default 8
    use_rslora : bool, default False
        As :class:`LoRALinear`.
    init : {"kaiming", "gaussian"}, default "kaiming"
        PEFT initialises an Embedding's factors the same way for both (and
        for ``init_lora_weights=True``): ``A = 0``, ``B ~ N(0, 1)``
        (loralib's choice), so a fresh adapter changes nothing. PiSSA is
        refused.
    random_state : None, int or numpy.random.Generator
        Draws the initial B. PEFT applies no dropout on an Embedding's LoRA
        path, so this layer has none and draws nothing while training.

    Attributes
    ----------
    A : Parameter of shape (r, num_embeddings)
        Registered as ``lora_embedding_A`` (PEFT's key, without ``.weight``).
    B : Parameter of shape (embedding_dim, r)
        Registered as ``lora_embedding_B``.
    scaling : float
    merged : bool

    Notes
    -----
    State-dict keys: ``"weight"``, ``"lora_embedding_A"``, ``"lora_embedding_B"``.
    Trainable numbers: ``r * (num_embeddings + embedding_dim)``.
    """

    _base: Embedding

    def __init__(
        self,
        base: Embedding,
        r: int = 8,
        alpha: float = 8,
        use_rslora: bool = False,
        init: str = "kaiming",
        random_state: RandomState = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, Embedding):
            raise TypeError(f"base must be an Embedding, got {type(base).__name__}")
        r, alpha, _, use_rslora, init = check_lora_config(r, alpha, 0.0, use_rslora, init)
        if init == "pissa":
            raise ValueError("init='pissa' is not available for an Embedding; use 'kaiming' or 'gaussian'")
        object.__setattr__(self, "_base", base)
        self.weight = base.weight
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.r, self.alpha, self.use_rslora, self.init = r, alpha, use_rslora, init
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.merged = False
        rng = check_random_state(random_state)
        dtype = self.weight.dtype
        self.lora_embedding_A = Parameter(np.zeros((r, self.num_embeddings), dtype))  # (r, num)
        self.lora_embedding_B = Parameter(rng.standard_normal((self.embedding_dim, r)).astype(dtype))  # (dim, r)
        self.weight.trainable = False

    @property
    def base(self) -> Embedding:
        """The wrapped Embedding (sharing this layer's weight Parameter)."""
        return self._base

    @property
    def A(self) -> Parameter:
        """PEFT's ``lora_embedding_A``, shape (r, num_embeddings)."""
        return self.lora_embedding_A

    @property
    def B(self) -> Parameter:
        """PEFT's ``lora_embedding_B``, shape (embedding_dim, r)."""
        return self.lora_embedding_B

    def adapter_parameters(self) -> list[Parameter]:
        """The parameters the adapter trains: A and B."""
        return [self.A, self.B]

    def forward(self, x: Any) -> np.ndarray:
        """Map integer ids ``x`` (any shape) to ``y`` (*x.shape, embedding_dim); checks ``x`` once."""
        idx = F.check_indices(x, self.num_embeddings, "indices")
        cache: Any
        if self.merged:
            flat = idx.reshape(-1)
            y = self.weight.data[flat].reshape(*idx.shape, self.embedding_dim)  # (..., dim)
            cache = None
        else:
            y, cache = FV.lora_embedding_core(idx, self.weight.data, self.A.data, self.B.data, self.scaling)
        self._save_for_backward(cache, y)
        return y

    def backward(self, dy: Any) -> None:  # type: ignore[override]  # integer input: no dx
        """Add into A.grad and B.grad (and the table's, if trainable); an integer input has no gradient.

        Raises RuntimeError while merged.
        """
        if self.merged:
            raise RuntimeError("LoRAEmbedding.backward while merged: call unmerge() and run forward again")
        cache, dy = self._take_for_backward(dy)
        g = FV.lora_embedding_backward_core(dy, cache, base_trainable=self.weight.trainable)
        if self.A.trainable:
            accumulate_grad(self.A, g.A)
        if self.B.trainable:
            accumulate_grad(self.B, g.B)
        if self.weight.trainable:
            accumulate_grad(self.weight, g.weight)
        return None

    def delta_weight(self) -> np.ndarray:
        """The update ``scaling * (B @ A).T``, ndarray of shape (num_embeddings, embedding_dim), float64."""
        return self.scaling * (self.B.data.astype(np.float64) @ self.A.data.astype(np.float64)).T  # (num, dim)

    def merge(self) -> None:
        """``W <- W + scaling * (B @ A).T``, in float64, cast once (as :meth:`LoRALinear.merge`)."""
        if self.merged:
            raise RuntimeError("LoRAEmbedding.merge: already merged (call unmerge() first)")
        _add_delta(self.weight, self.delta_weight(), +1.0, "LoRAEmbedding", "merge")
        self.merged = True

    def unmerge(self) -> None:
        """``W <- W - scaling * (B @ A).T``, in float64, cast once (as :meth:`LoRALinear.unmerge`)."""
        if not self.merged:
            raise RuntimeError("LoRAEmbedding.unmerge: not merged")
        _add_delta(self.weight, self.delta_weight(), -1.0, "LoRAEmbedding", "unmerge")
        self.merged = False

    def extra_repr(self) -> str:
        """The layer's sizes and settings, for ``repr``."""
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, r={self.r}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g}, use_rslora={self.use_rslora}, merged={self.merged}"
        )


class LoRAMergedLinear(Module):
    """LoRA on some output blocks of a fused projection: loralib's ``MergedLinear``.

    The ``out_features`` outputs of the base are ``len(enable_lora)`` equal
    blocks of ``d`` rows (GPT-2's ``c_attn``: q, k, v); each enabled block
    ``j`` gets its own update ``scaling * B_j @ A_j``, the others none
    (:func:`lowrank.nn.functional.lora_merged_linear`).
    ``enable_lora=[True, False, True]`` on ``c_attn`` adapts W_q and W_v
    only: the LoRA paper's GPT-2 and GPT-3 setting.

    Parameters
    ----------
    base : Linear or Conv1D
        As :class:`LoRALinear` (a Conv1D is ``fan_in_fan_out``).
    r, alpha, dropout, use_rslora
        As :class:`LoRALinear`; ``r`` is each block's rank.
    enable_lora : sequence of bool
        One per block; its length divides ``out_features``; one True at least.
    init : {"kaiming", "gaussian"}, default "kaiming"
        As :class:`LoRALinear` over the stacked ``A`` (loralib: kaiming, B = 0).
    random_state : None, int or numpy.random.Generator

    Attributes
    ----------
    A : Parameter of shape (k * r, in_features)
        ``k = sum(enable_lora)``; rows ``j*r:(j+1)*r`` are ``A_j``. Registered
        as ``lora_A`` (loralib's key, no ``.weight``).
    B : Parameter of shape (k * d, r)
        Rows ``j*d:(j+1)*d`` are ``B_j``. Registered as ``lora_B``.
    scaling : float
    merged : bool

    Notes
    -----
    State-dict keys: ``"weight"``, ``"bias"``, ``"lora_A"``, ``"lora_B"``,
    the names and shapes of a loralib checkpoint. PEFT has no equivalent
    (it adapts the whole fused projection), so
    :func:`lowrank.io.save_peft_adapter` refuses this layer.
    Trainable numbers: ``k * r * (in_features + d)``.
    """

    _base: Linear | Conv1D

    def __init__(
        self,
        base: Linear | Conv1D,
        r: int = 8,
        alpha: float = 8,
        dropout: float = 0.0,
        enable_lora: Any = (True, False, True),
        use_rslora: bool = False,
        init: str = "kaiming",
        random_state: RandomState = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, (Linear, Conv1D)):
            raise TypeError(f"base must be a Linear or a Conv1D, got {type(base).__name__}")
        r, alpha, dropout, use_rslora, init = check_lora_config(r, alpha, dropout, use_rslora, init)
        if init == "pissa":
            raise ValueError("init='pissa' is not available with enable_lora; use 'kaiming' or 'gaussian'")
        in_features, out_features = base.in_features, base.out_features
        self.enable_lora = FV.check_enable_lora(enable_lora, out_features)
        self.rows = FV.enabled_rows(out_features, self.enable_lora)  # (k * d,)
        k, d = sum(self.enable_lora), out_features // len(self.enable_lora)
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self._set_generator(random_state)
        object.__setattr__(self, "_base", base)
        self.weight = base.weight
        self.bias = base.bias
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout, self.use_rslora, self.init = r, alpha, dropout, use_rslora, init
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.merged = False
        rng = self.generator
        assert rng is not None
        dtype = self.weight.dtype
        if init == "kaiming":
            bound = 1.0 / math.sqrt(in_features)
            A = rng.uniform(-bound, bound, (k * r, in_features))
        else:
            A = rng.normal(0.0, 1.0 / r, (k * r, in_features))
        self.lora_A = Parameter(A.astype(dtype))  # (k*r, in)
        self.lora_B = Parameter(np.zeros((k * d, r), dtype))  # (k*d, r)
        self.weight.trainable = False
        if self.bias is not None:
            self.bias.trainable = False

    @property
    def base(self) -> Linear | Conv1D:
        """The wrapped Linear or Conv1D."""
        return self._base

    @property
    def A(self) -> Parameter:
        """The stacked down-projections, shape (k * r, in_features)."""
        return self.lora_A

    @property
    def B(self) -> Parameter:
        """The stacked up-projections, shape (k * d, r)."""
        return self.lora_B

    def adapter_parameters(self) -> list[Parameter]:
        """The parameters the adapter trains: A and B."""
        return [self.A, self.B]

    def weight_out_in(self) -> np.ndarray:
        """The base weight as ``(out_features, in_features)`` (a view for Conv1D)."""
        W = self.weight.data
        return W.T if self.fan_in_fan_out else W

    def forward(self, x: Any) -> np.ndarray:
        """Map ``x`` (..., in_features) to ``y`` (..., out_features); checks ``x`` once."""
        x = as_array_of(x, "x", self.weight.dtype)
        check_features(x, self.in_features)
        bias = None if self.bias is None else self.bias.data
        cache: F.LinearCache | FV.LoRAMergedCache
        if self.merged:
            y, cache = F.linear_core(x, self.weight_out_in(), bias)
        else:
            mask = None
            if self.training and self.dropout > 0:
                mask = F.dropout_mask(x.shape, self.dropout, random_state=self.generator, dtype=x.dtype)
            y, cache = FV.lora_merged_linear_core(
                x, self.weight_out_in(), bias, self.A.data, self.B.data, self.scaling, self.rows, mask
            )
        self._save_for_backward(cache, y)
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Map ``dy`` (..., out_features) to ``dx``; adds into A.grad and B.grad. RuntimeError while merged."""
        if self.merged:
            raise RuntimeError("LoRAMergedLinear.backward while merged: call unmerge() and run forward again")
        base_trainable = base_is_trainable(self)
        cache, dy = self._take_for_backward(dy)
        g = FV.lora_merged_linear_backward_core(dy, cache, base_trainable=base_trainable)
        if self.A.trainable:
            accumulate_grad(self.A, g.A)
        if self.B.trainable:
            accumulate_grad(self.B, g.B)
        if base_trainable:
            assert g.weight is not None
            accumulate_grad(self.weight, np.ascontiguousarray(g.weight.T) if self.fan_in_fan_out else g.weight)
            if self.bias is not None:
                accumulate_grad(self.bias, g.bias)
        elif self.bias is not None and self.bias.trainable:
            accumulate_grad(self.bias, dy.reshape(-1, self.out_features).sum(axis=0))  # (out,)
        return g.x

    def delta_weight(self) -> np.ndarray:
        """The update ``ΔW``, ndarray of shape (out_features, in_features), float64: loralib's ``merge_AB() * scaling``.

        Block ``j``'s rows are ``scaling * B_j @ A_j``; a disabled block's are 0.
        """
        return FV.merged_delta_core(self.A.data, self.B.data, self.scaling, self.rows, self.out_features)

    def _delta_in_layout(self) -> np.ndarray:
        delta = self.delta_weight()  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        """``W <- W + ΔW`` (transposed for Conv1D), in float64, cast once (as :meth:`LoRALinear.merge`)."""
        if self.merged:
            raise RuntimeError("LoRAMergedLinear.merge: already merged (call unmerge() first)")
        _add_delta(self.weight, self._delta_in_layout(), +1.0, "LoRAMergedLinear", "merge")
        self.merged = True

    def unmerge(self) -> None:
        """``W <- W - ΔW``, in float64, cast once (as :meth:`LoRALinear.unmerge`)."""
        if not self.merged:
            raise RuntimeError("LoRAMergedLinear.unmerge: not merged")
        _add_delta(self.weight, self._delta_in_layout(), -1.0, "LoRAMergedLinear", "unmerge")
        self.merged = False

    def extra_repr(self) -> str:
        """The layer's sizes and settings, for ``repr``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, alpha={self.alpha:g}, enable_lora={list(self.enable_lora)}, "
            f"scaling={self.scaling:g}, dropout={self.dropout:g}, merged={self.merged}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )


# The LoRA layer classes: what mark_only_lora_as_trainable keeps trainable, merge_lora folds,
# inject_lora refuses to adapt twice. Each has .A, .B, .base, .merged, merge() and unmerge().
LORA_LAYERS = (LoRALinear, LoRAEmbedding, LoRAMergedLinear)
ADAPTABLE = (Linear, Conv1D, Embedding)  # the base layers inject_lora wraps


# ---------------------------------------------------------------- LoRA on a model: replace, freeze, match


def _module_at(model: Module, name: str) -> Module | None:
    """The sub-module at dotted ``name`` (``""``: the model), or None; follows every registered name."""
    module = model
    for part in name.split(".") if name else ():
        child = dict(module.named_children()).get(part)
        if child is None:
            return None
        module = child
    return module


def replace_modules(model: Module, replacements: Mapping[str, Module]) -> Module:
    """Swap sub-modules of ``model`` by dotted name, in place, wherever they are referenced.

    The one replace path of the package: :func:`inject_lora`,
    :func:`merge_lora` and :func:`lowrank.io.load_peft_adapter` all swap
    layers through it. Every parent/child edge of the model is visited, so a
    module registered under two names (shared) is replaced under both, by the
    same new module, keeping each name and its position (a Sequential's order
    and state-dict keys stay). Every name is resolved before anything is
    replaced.

    Parameters
    ----------
    model : Module
    replacements : mapping of str to Module
        Dotted module name (as :meth:`Module.named_modules` gives it, or any
        other name a shared module is registered under) to its replacement.
        ``""`` names the model itself, and must then be the only key.

    Returns
    -------
    Module
        ``model``, or ``replacements[""]`` when the model itself is replaced
        (a module cannot replace itself in place).

    Raises
    ------
    TypeError
        ``model`` is not a Module, ``replacements`` is not a mapping, a key is
        not a str or a value is not a Module.
    ValueError
        A name the model does not have, ``""`` beside other names, or two
        names of one shared module given different replacements. The model
        is unchanged then.

    Examples
    --------
    >>> from lowrank import nn
    >>> model = nn.MLP([4, 3, 2], random_state=0)
    >>> model = replace_modules(model, {"1": nn.Tanh()})
    >>> type(model[1]).__name__
    'Tanh'
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    if not isinstance(replacements, Mapping):
        raise TypeError(f"replacements must be a mapping of module name to Module, got {type(replacements).__name__}")
    by_id: dict[int, tuple[str, Module]] = {}  # id(old) -> (its name, new)
    for name, new in replacements.items():
        if not isinstance(name, str):
            raise TypeError(f"replacements keys must be module names (str), got {type(name).__name__} {name!r}")
        if not isinstance(new, Module):
            raise TypeError(f"replacements[{name!r}] must be a lowrank.nn.Module, got {type(new).__name__}")
        old = _module_at(model, name)
        if old is None:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(f"replacements names {name!r}, which is not a module of model; its modules are {names}")
        seen = by_id.get(id(old))
        if seen is not None and seen[1] is not new:
            raise ValueError(
                f"replacements gives {seen[0]!r} and {name!r}, two names of one shared module, different "
                f"replacements; a shared module is replaced everywhere by one module"
            )
        by_id[id(old)] = (name, new)
    if "" in replacements:
        if len(replacements) > 1:
            raise ValueError(
                f"replacements names the model itself ('') beside {sorted(n for n in replacements if n)}: "
                f"replacing the model replaces everything in it, so '' must be the only name"
            )
        return replacements[""]
    for module in model.modules():  # listed before any change: the new modules are not visited
        for child_name, child in module.named_children():
            if id(child) in by_id:
                setattr(module, child_name, by_id[id(child)][1])  # keeps the name and its position
    return model


def mark_only_lora_as_trainable(
    model: Module, bias: str = "none", also_trainable: Iterable[str] | None = None
) -> Module:
    """Freeze every parameter of ``model`` except the LoRA factors, in place (loralib's and PEFT's name).

    Every parameter that is not the ``A`` or ``B`` of a LoRA layer (:class:`LoRALinear`,
    :class:`LoRAEmbedding`, :class:`LoRAMergedLinear`), or DoRA's magnitude,
    gets ``trainable=False``, except the biases ``bias`` names and the
    modules ``also_trainable`` names, which get ``trainable=True``; the
    factors keep their flags (a new layer's are True). :func:`inject_lora`
    and :func:`lowrank.io.load_peft_adapter` end with it, as PEFT's
    ``get_peft_model`` and loralib's ``mark_only_lora_as_trainable`` do.

    Parameters
    ----------
    model : Module
    bias : {"none", "lora_only", "all"}, default "none"
        PEFT's ``LoraConfig.bias``: ``"lora_only"`` trains the bias of every
        LoRALinear, ``"all"`` every parameter named ``bias`` in the model.
        A trainable bias beside a frozen weight gets ``db`` alone.
    also_trainable : iterable of str, optional
        Dotted names of modules (as :meth:`Module.named_modules` gives them)
        whose every parameter trains: PEFT's ``modules_to_save`` (a
        classifier head trained in full beside the adapter). They must not be
        LoRA layers.

    Returns
    -------
    Module
        ``model``, which remembers ``bias`` and ``also_trainable`` for
        :func:`trained_beside_lora` (so an adapter saves back with them).

    Raises
    ------
    TypeError
        ``model`` is not a Module, or ``also_trainable`` is a string or holds non-strings.
    ValueError
        ``model`` has no LoRA layer (it would freeze every parameter),
        an unknown ``bias``, or an ``also_trainable`` name that is no module
        of ``model`` or is a LoRA layer. The model is unchanged then.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    bias = check_choice(bias, "bias", LORA_BIAS)
    modules = dict(model.named_modules())
    keep = _check_module_names(also_trainable, modules, "also_trainable")
    factors = {id(p) for m in model.modules() if isinstance(m, LORA_LAYERS) for p in m.adapter_parameters()}
    if not factors:
        raise ValueError(
            f"model has no LoRA layer ({type(model).__name__}; LoRALinear, LoRAEmbedding or LoRAMergedLinear): "
            f"marking only LoRA factors as "
            f"trainable would freeze every parameter; inject_lora(model, ...) first"
        )
    trained = {id(p) for name in keep for p in modules[name].parameters()}
    if bias == "lora_only":
        linear_lora = (LoRALinear, LoRAMergedLinear)  # an Embedding has no bias
        trained |= {id(m.bias) for m in model.modules() if isinstance(m, linear_lora) and m.bias is not None}
    elif bias == "all":
        trained |= {id(p) for name, p in model.named_parameters() if name.rpartition(".")[2] == "bias"}
    for p in model.parameters():
        if id(p) in trained:
            p.trainable = True
        elif id(p) not in factors:
            p.trainable = False
    object.__setattr__(model, "_lora_trained_beside", TrainedBeside(bias=bias, modules_to_save=tuple(keep)))
    return model


@dataclass(frozen=True, slots=True)
class TrainedBeside:
    """What trains beside the LoRA factors: PEFT's ``bias`` and ``modules_to_save``.

    Attributes
    ----------
    bias : {"none", "lora_only", "all"}
    modules_to_save : tuple of str
        Dotted names of the modules trained in full.
    """

    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()


def trained_beside_lora(model: Module) -> TrainedBeside:
    """The ``bias`` and ``modules_to_save`` the last :func:`mark_only_lora_as_trainable` on ``model`` set.

    :func:`inject_lora` and :func:`lowrank.io.load_peft_adapter` end with that
    call, so :func:`lowrank.io.save_peft_adapter` saves a loaded or injected
    adapter back with its settings without being told them again.
    ``TrainedBeside("none", ())`` for a model never marked.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    found = model.__dict__.get("_lora_trained_beside")
    return found if isinstance(found, TrainedBeside) else TrainedBeside()


def _check_module_names(names: Any, modules: Mapping[str, Module], what: str) -> list[str]:
    """``names`` as a list of module names of the model, none of them a LoRA layer; else Type/ValueError."""
    if names is None:
        return []
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(f"{what} must be a list of module names such as ['2'], got {type(names).__name__} {names!r}")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} must hold module names (str), got {bad!r}")
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"{what} {unknown} are not modules of the model; its modules are {[n for n in modules if n]}")
    lora = [n for n in names if isinstance(modules[n], (*LORA_LAYERS, _Factor))]
    if lora:
        raise ValueError(f"{what} {lora} are LoRA layers: their factors train already, and their base stays frozen")
    return names


def inject_lora(
    model: Module,
    r: PerLayer,
    alpha: PerLayer,
    targets: Iterable[str] | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    random_state: RandomState = None,
    *,
    target_modules: str | Iterable[str] | None = None,
    bias: str = "none",
    modules_to_save: Iterable[str] | None = None,
    use_dora: bool = False,
    enable_lora: Iterable[bool] | None = None,
) -> Module:
    """Wrap Linear, Conv1D and Embedding layers in LoRA layers and freeze everything else, in place.

    A :class:`~lowrank.nn.Linear` or :class:`~lowrank.nn.Conv1D` becomes a
    :class:`LoRALinear` (a Conv1D is PEFT's ``fan_in_fan_out``), or a
    :class:`LoRAMergedLinear` with ``enable_lora``; an
    :class:`~lowrank.nn.Embedding` becomes a :class:`LoRAEmbedding`.

    Parameters
    ----------
    model : Module
        Changed in place: each targeted Linear is replaced, under the same
        name, by a LoRALinear that wraps it (sharing its weight and bias), so
        the state-dict keys of the base stay (``"0.weight"``) and the adapter
        adds ``"0.lora_A.weight"`` and ``"0.lora_B.weight"``, as PEFT names them.
    r, alpha : int and real, or a mapping or function giving each layer's value
        As :class:`LoRALinear`. One value for every layer; or, per layer
        (PEFT's ``rank_pattern`` and ``alpha_pattern``), a mapping from each
        adapted layer's dotted name to its value (every adapted layer must be
        a key), or a function ``f(name) -> value``. Each layer's value is
        checked by :func:`check_lora_config`, the message naming the layer.
    dropout, use_rslora, init
        As :class:`LoRALinear`, the same for every adapted layer.
    targets : iterable of str, optional
        The exact dotted names of the layers to adapt (``["0", "2"]``,
        or ``"block.fc"`` in nested modules): Linear, Conv1D or Embedding
        layers. An entry that is the name of no module of the model is
        taken as a dotted suffix, PEFT's list rule: ``["c_attn"]`` adapts
        every ``transformer.h.N.attn.c_attn`` of a GPT-2. When None (and
        ``target_modules`` is None), every Linear and Conv1D layer except
        one whose weight is tied to another module (GPT-2's ``lm_head``,
        tied to ``wte``: PEFT's ``"all-linear"`` leaves the output layer
        out too); an Embedding or a tied head is adapted only when named. An
        Embedding's LoRA path has no dropout (PEFT applies none there), so
        ``dropout`` does not reach it.
    random_state : None, int or numpy.random.Generator
        Resolved once and handed to every new layer, in the model's order:
        the same seed gives the same adapters (and the same dropout masks).
    target_modules : str or iterable of str, optional
        Instead of ``targets``, PEFT's rule, by :func:`match_target_modules`:
        a list entry matches a name or a dotted suffix (``"fc"`` adapts
        ``"block.0.fc"`` and ``"block.1.fc"``), a string is a regular
        expression that must match the whole name. Every Linear layer it
        matches is adapted, and it must match at least one. Not with ``targets``.
    bias : {"none", "lora_only", "all"}, default "none"
        Which biases train beside the factors (PEFT's ``bias``): see
        :func:`mark_only_lora_as_trainable`.
    modules_to_save : iterable of str, optional
        Modules trained in full beside the adapter (PEFT's ``modules_to_save``,
        e.g. a classifier head): an entry names a module or a dotted suffix of
        its name, and must match at least one module that is not adapted.
    use_dora : bool, default False
        Every new layer is DoRA (:class:`LoRALinear` with ``use_dora=True``):
        its trainable magnitude (key ``"0.lora_magnitude_vector"``) joins the factors.
    enable_lora : sequence of bool, optional
        loralib's ``MergedLinear``: each targeted Linear/Conv1D becomes a
        :class:`LoRAMergedLinear` whose output is ``len(enable_lora)`` equal
        blocks, only the enabled ones adapted (``[True, False, True]`` on
        GPT-2's fused ``c_attn``: W_q and W_v, the LoRA paper's choice).
        Not with an Embedding target or ``init="pissa"``.

    Returns
    -------
    Module
        ``model`` itself. If ``model`` is a bare Linear it cannot be changed
        in place, and the new LoRALinear wrapping it is returned instead.

    Raises
    ------
    ValueError
        An unknown target (the message lists the Linear layers there are), a
        target that is already a LoRA layer, no Linear layer to adapt, a
        per-layer mapping without an adapted layer, a ``modules_to_save``
        entry that matches no module or an adapted layer, ``enable_lora``
        with an Embedding target or a length that does not divide a
        targeted layer's ``out_features``, ``init="pissa"`` with an Embedding
        or ``enable_lora``, ``use_dora`` with an Embedding or ``enable_lora``
        or a weight with a zero row (DoRA's direction is undefined there), or
        a value :func:`check_lora_config` or :func:`check_pissa_rank` refuses.
    TypeError
        ``model`` is not a Module, ``targets`` is a string or holds
        non-strings, both ``targets`` and ``target_modules`` are given, or a
        setting is of the wrong kind.

    Notes
    -----
    Everything is checked before the model is changed. The settings are
    checked by :func:`check_lora_config`, as :class:`LoRALinear` checks them;
    the layers are swapped in by :func:`replace_modules` and the model is
    frozen by :func:`mark_only_lora_as_trainable` (with ``bias`` and the
    ``modules_to_save`` modules), so the trainable parameters afterwards are
    exactly the LoRA factors (the new ones, and those of layers adapted
    earlier), plus what ``bias`` and ``modules_to_save`` name. Each new layer
    takes the training mode of the Linear it wraps.

    Examples
    --------
    >>> from lowrank import nn
    >>> model = nn.MLP([4, 8, 8, 2], random_state=0)
    >>> model = nn.inject_lora(model, r={"0": 2, "2": 4}, alpha=8, target_modules=["0", "2"],
    ...                        modules_to_save=["4"], random_state=0)
    >>> [(model[i].r, model[i].scaling) for i in (0, 2)]
    [(2, 4.0), (4, 2.0)]
    >>> model[4].weight.trainable
    True
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    _, _, dropout, use_rslora, init = check_lora_config(1, 1, dropout, use_rslora, init)
    use_dora = check_bool(use_dora, "use_dora")
    bias = check_choice(bias, "bias", LORA_BIAS)
    modules = model.named_modules()
    linears = {name: m for name, m in modules if isinstance(m, ADAPTABLE)}  # what LoRA can wrap
    adapted = [name for name, m in modules if isinstance(m, LORA_LAYERS)]
    if targets is not None and target_modules is not None:
        raise TypeError("give targets (exact layer names) or target_modules (PEFT's rule), not both")
    if target_modules is not None:
        chosen = [name for name in linears if match_target_modules(target_modules, name)]
        if not chosen:
            raise ValueError(
                f"target_modules {target_modules!r} matches no Linear, Conv1D or Embedding layer of the model; "
                f"its layers LoRA can adapt are {list(linears)}"
            )
        chosen = _check_targets(chosen, linears, adapted)
    elif targets is None:
        if adapted:
            raise ValueError(
                f"model already has LoRA layers at {adapted}: name the Linear layers still to adapt "
                f"with targets (plain Linear layers: {list(linears)}), or merge_lora(model) first"
            )
        tied = _tied_weights(modules)
        chosen = [name for name, m in linears.items() if not isinstance(m, Embedding) and id(m.weight) not in tied]
        if not chosen:
            raise ValueError(
                f"model has no Linear or Conv1D layer to adapt ({type(model).__name__}); name an Embedding with targets"
            )
    else:
        chosen = _check_targets(targets, linears, adapted, {name for name, _ in modules})
    settings = {name: _layer_settings(r, alpha, dropout, use_rslora, init, name) for name in chosen}
    embeddings = [name for name in chosen if isinstance(linears[name], Embedding)]
    if init == "pissa":
        if embeddings or enable_lora is not None:
            raise ValueError(
                f"init='pissa' is for Linear and Conv1D layers without enable_lora, got "
                f"{f'the Embedding layers {embeddings}' if embeddings else f'enable_lora={enable_lora!r}'}"
            )
        for name in chosen:
            base = linears[name]
            assert not isinstance(base, Embedding)  # refused just above
            check_pissa_rank(settings[name][0], (base.out_features, base.in_features), layer=name)
    if enable_lora is not None:
        if embeddings:
            raise ValueError(
                f"enable_lora is for fused Linear/Conv1D projections, not the Embedding layers {embeddings}"
            )
        for name in chosen:
            base = linears[name]
            assert not isinstance(base, Embedding)  # refused just above
            try:
                enable_lora = FV.check_enable_lora(enable_lora, base.out_features)
            except ValueError as exc:
                raise ValueError(f"layer {name or '<the model itself>'!r}: {exc}") from None
    if use_dora:  # each new layer refuses a zero row norm; find one before any layer (PiSSA's) changes W
        if embeddings or enable_lora is not None:
            raise ValueError(
                f"use_dora is for Linear and Conv1D layers without enable_lora, got "
                f"{f'the Embedding layers {embeddings}' if embeddings else f'enable_lora={enable_lora!r}'}"
            )
        for name in chosen:
            base = linears[name]
            assert not isinstance(base, Embedding)  # refused just above
            weight = base.weight.data.T if isinstance(base, Conv1D) else base.weight.data  # (out, in)
            try:
                check_row_norm(row_norm(weight))  # V = W while B = 0
            except (ValueError, FloatingPointError) as exc:
                raise type(exc)(f"layer {name or '<the model itself>'!r}: {exc}") from None
    saved = _match_modules_to_save(modules_to_save, [n for n, _ in modules], set(chosen))
    rng = check_random_state(random_state)

    new_layers = {}
    for name in chosen:  # in model order: the generator's draws follow it
        base = linears[name]
        r_i, alpha_i = settings[name]
        lora: Module
        if isinstance(base, Embedding):
            lora = LoRAEmbedding(base, r=r_i, alpha=alpha_i, use_rslora=use_rslora, init=init, random_state=rng)
        elif enable_lora is not None:
            lora = LoRAMergedLinear(
                base, r=r_i, alpha=alpha_i, dropout=dropout, enable_lora=enable_lora, use_rslora=use_rslora,
                init=init, random_state=rng,
            )  # fmt: skip
        else:
            lora = LoRALinear(
                base, r=r_i, alpha=alpha_i, dropout=dropout, use_rslora=use_rslora, init=init, random_state=rng,
                use_dora=use_dora,
            )  # fmt: skip
        new_layers[name] = lora.train(base.training)
    model = replace_modules(model, new_layers)
    return mark_only_lora_as_trainable(model, bias=bias, also_trainable=saved)


def _tied_weights(modules: list[tuple[str, Module]]) -> set[int]:
    """The ids of weight Parameters that more than one module holds (a head tied to an embedding)."""
    seen: dict[int, int] = {}
    for _, m in modules:
        weight = getattr(m, "weight", None)
        if isinstance(weight, Parameter):
            seen[id(weight)] = seen.get(id(weight), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _layer_settings(
    r: PerLayer, alpha: PerLayer, dropout: float, use_rslora: bool, init: str, name: str
) -> tuple[int, float]:
    """Layer ``name``'s ``(r, alpha)`` from a value, a mapping or a function, checked by check_lora_config."""
    values = []
    for what, value in (("r", r), ("alpha", alpha)):
        per_layer = isinstance(value, Mapping) or callable(value)
        if isinstance(value, Mapping):
            if name not in value:
                raise ValueError(
                    f"{what} maps layer names to values but has no entry for the adapted layer {name!r}; "
                    f"its keys are {list(value)}"
                )
            value = value[name]
        elif callable(value):
            value = value(name)
        values.append((per_layer, value))
    (r_per, r_i), (alpha_per, alpha_i) = values
    try:
        r_i, alpha_i, *_ = check_lora_config(r_i, alpha_i, dropout, use_rslora, init)
    except (TypeError, ValueError) as exc:
        if not (r_per or alpha_per):
            raise
        raise type(exc)(f"layer {name or '<the model itself>'!r}: {exc}") from None
    return r_i, alpha_i


def _match_modules_to_save(modules_to_save: Any, names: list[str], adapted: set[str]) -> list[str]:
    """The module names ``modules_to_save`` matches by the target_modules list rule; each entry must match."""
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, (str, bytes)) or not isinstance(modules_to_save, Iterable):
        raise TypeError(
            f"modules_to_save must be a list of module names such as ['classifier'], got "
            f"{type(modules_to_save).__name__} {modules_to_save!r}"
        )
    entries = list(modules_to_save)
    matched: list[str] = []
    for entry in entries:
        found = [n for n in names if n and match_target_modules([entry], n)]
        if not found:
            raise ValueError(
                f"modules_to_save entry {entry!r} matches no module of the model; its modules are "
                f"{[n for n in names if n]}"
            )
        clash = [n for n in found if n in adapted]
        if clash:
            raise ValueError(
                f"modules_to_save entry {entry!r} matches {clash}, which are adapted: a module is "
                f"either adapted or trained in full, not both"
            )
        matched += [n for n in found if n not in matched]
    return matched


def _check_targets(
    targets: Any, linears: Mapping[str, Module], adapted: list[str], names: set[str] | None = None
) -> list[str]:
    """The targeted layer names, in the model's order; every problem in one message.

    With ``names`` (every module name of the model), an entry that is none of
    them is matched as a dotted suffix (PEFT's list rule) against the layers.
    """
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Iterable):
        raise TypeError(
            f"targets must be a list of layer names such as ['0', '2'], got {type(targets).__name__} {targets!r}"
        )
    targets = list(targets)
    bad_types = [t for t in targets if not isinstance(t, str)]
    if bad_types:
        raise TypeError(f"targets must hold layer names (str), got {bad_types!r}")
    if not targets:
        raise ValueError(f"targets must name at least one layer of {list(linears)}, got []")
    if names is not None:  # "c_attn", the name of no module: every layer whose name ends in ".c_attn"
        targets = [
            n
            for t in targets
            for n in ([t] if t in names else [m for m in (*linears, *adapted) if match_target_modules([t], m)] or [t])
        ]
    again = [t for t in targets if t in adapted]
    if again:
        raise ValueError(
            f"targets {again} are already LoRA layers: a layer is adapted once (merge_lora(model) "
            f"returns a plain model to adapt anew)"
        )
    unknown = [t for t in targets if t not in linears]
    if unknown:
        raise ValueError(
            f"targets {unknown} are not Linear, Conv1D or Embedding layers of the model; "
            f"the layers LoRA can adapt are {list(linears)}"
        )
    wanted = set(targets)
    return [name for name in linears if name in wanted]


def trainable_summary(model: Module, *, quiet: bool = False) -> str:
    """PEFT's ``print_trainable_parameters`` line, printed and returned.

    ``trainable params: 1,234 || all params: 100,000 || trainable%: 1.2340``:
    counts of numbers (not arrays), every parameter counted once, the LoRA
    factors included in "all params", as PEFT counts them.

    Parameters
    ----------
    model : Module
    quiet : bool, default False
        Only return the line, do not print it.

    Returns
    -------
    str
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    quiet = check_bool(quiet, "quiet")
    params = model.parameters()
    total = sum(p.size for p in params)
    if total == 0:
        raise ValueError(f"model has no parameters to count ({type(model).__name__})")
    trainable = sum(p.size for p in params if p.trainable)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    if not quiet:
        print(line)
    return line


def merge_lora(model: Module) -> Module:
    """A new plain model, every LoRA layer folded into its base layer: for deployment.

    Each LoRA layer (:class:`LoRALinear`, :class:`LoRAEmbedding`,
    :class:`LoRAMergedLinear`) of a deep copy of ``model`` is folded by its own
    ``merge()`` (``W + scaling * B @ A``, DoRA's rescaled form, accumulated in float64
    and cast to W's dtype once; a layer already merged holds that weight and
    is taken as it is), then replaced by its base Linear, Conv1D or Embedding, in the layer's
    training mode, through :func:`replace_modules`. The copy's forward equals
    the adapted model's in eval mode, up to that one rounding per weight,
    except where an adapted weight is tied to another module (GPT-2's ``wte``
    and ``lm_head``): the fold changes that module too, as PEFT's
    ``merge_and_unload`` does (``docs/gpt2.md``). Its
    state-dict keys are the base model's (``"0.weight"``, no ``lora_`` keys)
    and its caches are cleared (:meth:`Module.clear_cache`).

    Parameters
    ----------
    model : Module
        Left untouched (weights, gradients, flags, mode).

    Returns
    -------
    Module
        Of ``model``'s class (a bare LoRALinear gives a Linear). Every
        parameter is trainable, as in a freshly built model, and no gradient
        is set.

    Raises
    ------
    TypeError
        ``model`` is not a Module.
    FloatingPointError
        If a merged weight would not be finite in its dtype: the message is
        :meth:`LoRALinear.merge`'s, after the layer's name. The original
        model is untouched either way.
    """
    if not isinstance(model, Module):
        raise TypeError(f"model must be a lowrank.nn.Module, got {type(model).__name__}")
    plain = copy.deepcopy(model)
    bases: dict[str, Module] = {}
    for name, lora in plain.named_modules():
        if not isinstance(lora, LORA_LAYERS):
            continue
        if not lora.merged:
            try:
                lora.merge()  # writes into lora.base's weight: they share the Parameter (deepcopy keeps that)
            except FloatingPointError as exc:
                raise FloatingPointError(f"merge_lora: layer {name or '<the model itself>'!r}: {exc}") from None
        bases[name] = lora.base.train(lora.training)  # the base is not in the tree: its own mode is stale
    plain = replace_modules(plain, bases)
    for p in plain.parameters():
        p.trainable = True
        p.grad = None
    plain.clear_cache()  # caches copied from the original have nothing to pair with
    return plain
