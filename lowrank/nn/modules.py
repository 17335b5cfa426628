"""Layers with state: Parameter, Module, Linear, Conv1D, LayerNorm, Embedding, activations, Sequential.

A module owns its parameters and calls the pure kernels of
:mod:`lowrank.nn.functional`; every formula lives there. What lives here is
bookkeeping: names, train/eval mode, the forward cache, gradient accumulation.
A layer checks its input in ``forward`` and ``dy`` in ``_take_for_backward``,
once, and then calls the kernels' unchecked cores (``F.linear_core``, ...).

Gradients
    ``module.backward(dy)`` returns ``dx`` and *adds* each trainable
    parameter's gradient into ``Parameter.grad`` (None until the first
    backward pass), so two backward passes before ``zero_grad()`` sum their
    contributions. A frozen parameter's base-layer gradient is never computed:
    the kernels are told so and skip the work.

How backward pairs with forward
    Each module keeps the cache of its most recent forward pass, and
    ``backward(dy)`` consumes it: backward pairs with the latest forward, once.
    So a module used twice accumulates both gradients when each use's backward
    runs before the next forward (forward, backward, forward, backward, then
    one optimizer step: gradient accumulation over micro-batches). One
    instance used twice *inside one forward pass* (the same ReLU at two places
    of a Sequential, a tied layer applied twice) is not supported: the second
    forward replaces the first cache, and the backward pass then stops with a
    RuntimeError when it reaches the first use. Give each use its own instance.

dtypes
    A layer with parameters computes in their dtype. Integer and bool input is
    converted to it; a float array of the other precision is refused with a
    TypeError rather than silently rounded (build the layer with the dtype you
    mean, or cast the input). Activations keep their input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np

from lowrank.nn import functional as F
from lowrank.nn.functional.activations import GELU_FORMS
from lowrank.utils.validation import (
    RandomState,
    as_float_array,
    check_bool,
    check_choice,
    check_float_dtype,
    check_int,
    check_random_state,
    check_real,
)

__all__ = [
    "GELU",
    "Conv1D",
    "Embedding",
    "IncompatibleKeys",
    "LayerNorm",
    "Linear",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "accumulate_grad",
    "as_array_of",
    "base_is_trainable",
    "check_features",
]

# ---------------------------------------------------------------- Parameter


class Parameter:
    """An array a module learns (or holds frozen), and its gradient.

    Parameters
    ----------
    data : array_like
        Copied into a C-contiguous float32/float64 array (integer and bool
        input becomes float64).
    trainable : bool, default True
        A frozen parameter (False) gets no gradient: backward never computes
        it and optimizers never write it.

    Attributes
    ----------
    data : ndarray
    grad : ndarray of data's shape and dtype, or None
        None until a backward pass reaches the parameter; then the sum of
        every backward pass since the last ``zero_grad()``.
    trainable : bool
    """

    __slots__ = ("data", "grad", "trainable")

    def __init__(self, data: Any, trainable: bool = True) -> None:
        arr = as_float_array(data, "data")
        self.data = np.array(arr, order="C", copy=True)
        self.grad: np.ndarray | None = None
        self.trainable = check_bool(trainable, "trainable")

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``data``."""
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        """The dtype of ``data``, float32 or float64."""
        return self.data.dtype

    @property
    def ndim(self) -> int:
        """The number of dimensions of ``data``."""
        return self.data.ndim

    @property
    def size(self) -> int:
        """The number of entries of ``data``."""
        return self.data.size

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, trainable={self.trainable})"


def accumulate_grad(param: Parameter, grad: np.ndarray | None) -> None:
    """``param.grad += grad``, starting from None: a module used twice sums both.

    ``grad`` is a kernel's gradient for a trainable parameter, so never None
    here (the type admits None because the kernels' result fields do).
    """
    assert grad is not None and grad.shape == param.shape and grad.dtype == param.dtype, grad
    if param.grad is None:
        param.grad = grad  # the kernels return fresh arrays, so the Parameter may own this one
    else:
        param.grad += grad


def as_array_of(x: Any, name: str, dtype: np.dtype) -> np.ndarray:
    """``x`` as an array of a layer's ``dtype``, or a TypeError.

    Integers, bools and Python floats are converted; a float array of the
    other precision is refused rather than silently rounded.
    """
    arr = as_float_array(x, name)
    if arr.dtype == dtype:
        return arr
    if isinstance(x, (np.ndarray, np.generic)) and x.dtype.kind == "f":
        raise TypeError(
            f"{name} must have the layer's dtype {dtype}, got {x.dtype}: cast it with "
            f"{name}.astype(np.{dtype}) or build the layer with dtype=np.{x.dtype}"
        )
    return arr.astype(dtype)


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict(..., strict=False)`` did not match."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# ---------------------------------------------------------------- Module


class Module:
    """Base class: registers Parameters and sub-Modules, in assignment order.

    Assigning a :class:`Parameter` or a ``Module`` to an attribute registers
    it under that name (``self.weight = Parameter(...)``), as in PyTorch;
    names nest with dots (``"0.weight"``). Assigning None to a registered
    name unregisters it; assigning anything else to it is a TypeError.

    Subclasses write ``forward(x)`` and ``backward(dy)``. ``forward`` saves its
    kernel's cache with ``_save_for_backward``; ``backward`` takes it back with
    ``_take_for_backward`` (see the module docstring for the pairing rule).
    """

    training: bool
    _param_names: dict[str, None]
    _module_names: dict[str, None]
    _pending: tuple[Any, tuple[int, ...], np.dtype] | None

    def __init__(self) -> None:
        # names only: the objects themselves are ordinary attributes
        object.__setattr__(self, "_param_names", {})  # dict as an ordered set
        object.__setattr__(self, "_module_names", {})
        object.__setattr__(self, "_pending", None)  # (cache, out shape, out dtype) of the last forward
        self.training = True

    # -- registration

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)  # a property's setter, or its AttributeError
            return
        if "_param_names" not in self.__dict__:
            raise AttributeError(
                f"cannot assign {name!r} before Module.__init__() is called; "
                f"call super().__init__() first in {type(self).__name__}.__init__"
            )
        params, modules = self._param_names, self._module_names
        if isinstance(value, Parameter):
            modules.pop(name, None)
            params[name] = None
        elif isinstance(value, Module):
            params.pop(name, None)
            modules[name] = None
        elif name in params or name in modules:
            kind = "Parameter" if name in params else "Module"
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} to {name!r}, a registered {kind}: assign a {kind} or None"
                )
            params.pop(name, None)
            modules.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._param_names.pop(name, None)
        self._module_names.pop(name, None)
        object.__delattr__(self, name)

    def named_children(self) -> list[tuple[str, Module]]:
        """The direct sub-modules, as ``(name, Module)`` pairs in order."""
        return [(name, getattr(self, name)) for name in self._module_names]

    def children(self) -> list[Module]:
        """The direct sub-modules, in order."""
        return [m for _, m in self.named_children()]

    def named_modules(self, prefix: str = "") -> list[tuple[str, Module]]:
        """Every module of the tree, this one first, depth first, with dotted names.

        This module is named ``prefix`` (``""`` by default); a module reachable
        twice is listed once.
        """
        out: list[tuple[str, Module]] = []
        seen: set[int] = set()

        def visit(module: Module, name: str) -> None:
            if id(module) in seen:
                return
            seen.add(id(module))
            out.append((name, module))
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name)

        visit(self, prefix)
        return out

    def modules(self) -> list[Module]:
        """Every module of the tree, this one first, depth first, each once."""
        return [m for _, m in self.named_modules()]

    def named_parameters(self) -> list[tuple[str, Parameter]]:
        """Every Parameter, frozen ones included, with torch-style dotted names.

        A Sequential of Linear/ReLU/Linear gives ``"0.weight"``, ``"0.bias"``,
        ``"2.weight"``, ``"2.bias"``. A Parameter shared by two modules is
        listed once, under its first name.
        """
        out: list[tuple[str, Parameter]] = []
        seen: set[int] = set()
        for module_name, module in self.named_modules():
            for name in module._param_names:
                param = getattr(module, name)
                if id(param) not in seen:
                    seen.add(id(param))
                    out.append((f"{module_name}.{name}" if module_name else name, param))
        return out

    def parameters(self) -> list[Parameter]:
        """Every Parameter, frozen ones included (filter on ``.trainable``)."""
        return [p for _, p in self.named_parameters()]

    # -- state

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of every parameter's array, under the keys of ``named_parameters()``."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Copy arrays into the parameters, after checking all of them.

        Checks, in this order, each listing every offender: names (missing and
        unexpected keys, when ``strict``), shapes, dtypes (exactly the
        parameter's; no silent cast), finiteness. Any failure raises before a
        single parameter is written. Gradients are left as they are.

        Parameters
        ----------
        state_dict : mapping from str to array_like
        strict : bool, default True
            If False, missing and unexpected keys are allowed and returned.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``; both empty when ``strict``.

        Raises
        ------
        ValueError
            Missing or unexpected keys (strict), a shape mismatch, a
            non-finite value.
        TypeError
            ``state_dict`` is not a mapping, or a dtype mismatch.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping from names to arrays, got {type(state_dict).__name__}")
        strict = check_bool(strict, "strict")
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        where = f"load_state_dict for {type(self).__name__}"
        if strict and (missing or unexpected):
            raise ValueError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        values = {k: np.asarray(state_dict[k]) for k in own if k in state_dict}
        bad_shapes = [
            f"{k}: expected {own[k].shape}, got {v.shape}" for k, v in values.items() if v.shape != own[k].shape
        ]
        if bad_shapes:
            raise ValueError(f"{where}: shape mismatch: " + "; ".join(bad_shapes))
        bad_dtypes = [
            f"{k}: expected {own[k].dtype}, got {v.dtype}" for k, v in values.items() if v.dtype != own[k].dtype
        ]
        if bad_dtypes:
            raise TypeError(f"{where}: dtype mismatch: " + "; ".join(bad_dtypes))
        non_finite = [k for k, v in values.items() if not np.isfinite(v).all()]
        if non_finite:
            raise ValueError(f"{where}: non-finite values in {non_finite}")
        for k, v in values.items():
            own[k].data = np.array(v, order="C", copy=True)
        return IncompatibleKeys(missing, unexpected)

    # -- mode and gradients

    def train(self, mode: bool = True) -> Module:
        """Set training mode (dropout active) on this module and every sub-module."""
        mode = check_bool(mode, "mode")
        for module in self.modules():
            module.training = mode
        return self

    def eval(self) -> Module:
        """Evaluation mode: ``train(False)``."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Set every parameter's ``.grad`` to None."""
        for p in self.parameters():
            p.grad = None

    def clear_cache(self) -> None:
        """Drop the forward caches of this module and every sub-module.

        After it, a ``backward`` without a new ``forward`` is a RuntimeError.
        Use it when a model is copied or rebuilt and its caches would pair a
        later backward pass with a forward pass of another model.
        """
        for module in self.modules():
            object.__setattr__(module, "_pending", None)

    # -- randomness

    @property
    def generator(self) -> np.random.Generator | None:
        """The generator this module draws from in training (dropout masks), or None.

        A module that draws randomness resolves its ``random_state`` once into
        this Generator; a trainer saves and restores its state
        (:meth:`named_generators`) so that a resumed run gives the same bits.
        """
        return self.__dict__.get("_generator")

    def named_generators(self) -> list[tuple[str, np.random.Generator]]:
        """``(dotted module name, Generator)`` for every module in the tree that has one, in order."""
        return [(name, m.generator) for name, m in self.named_modules() if m.generator is not None]

    def _set_generator(self, random_state: RandomState) -> None:
        """Resolve ``random_state`` once and keep it as :attr:`generator` (for subclasses that draw)."""
        object.__setattr__(self, "_generator", check_random_state(random_state))

    # -- forward and backward

    def __call__(self, x: Any) -> np.ndarray:
        """``forward(x)``."""
        return self.forward(x)

    def forward(self, x: Any) -> np.ndarray:
        """The layer's output; saves what ``backward`` needs (subclasses define it)."""
        raise NotImplementedError(f"{type(self).__name__} defines no forward")

    def backward(self, dy: Any) -> np.ndarray:
        """``dx`` from ``dy``; adds into the trainable parameters' ``.grad`` (subclasses define it)."""
        raise NotImplementedError(f"{type(self).__name__} defines no backward")

    def _save_for_backward(self, cache: Any, y: np.ndarray) -> None:
        self._pending = (cache, y.shape, y.dtype)

    def _take_for_backward(self, dy: Any) -> tuple[Any, np.ndarray]:
        """The last forward's cache and ``dy`` checked against its output; consumes the cache."""
        if self._pending is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a forward to pair with: each "
                "backward consumes the cache of the most recent forward, once (an instance used "
                "twice in one forward pass needs one instance per use)"
            )
        cache, shape, dtype = self._pending
        dy = as_array_of(dy, "dy", dtype)
        if dy.shape != shape:
            raise ValueError(f"dy must have the forward output's shape {shape}, got {dy.shape}")
        self._pending = None
        return cache, dy

    # -- printing

    def extra_repr(self) -> str:
        """The arguments shown inside ``repr``'s parentheses."""
        return ""

    def __repr__(self) -> str:
        head = f"{type(self).__name__}({self.extra_repr()}"
        children = self.named_children()
        if not children:
            return head + ")"
        lines = [f"  ({name}): " + repr(child).replace("\n", "\n  ") for name, child in children]
        return head + "\n" + "\n".join(lines) + "\n)"


# ---------------------------------------------------------------- Linear


class LinearLayer(Protocol):
    """What :func:`base_is_trainable` reads: a ``weight`` Parameter and a ``bias`` Parameter or None."""

    weight: Parameter
    bias: Parameter | None


def base_is_trainable(layer: LinearLayer) -> bool:
    """Whether a linear layer's weight (and bias) gets a gradient.

    The kernels compute dW and db together or not at all, so a trainable
    weight needs a trainable bias; a trainable bias beside a frozen weight
    (PEFT's ``bias="lora_only"``/``"all"``) is allowed: the layer adds
    ``db = dy`` summed over the batch itself.
    """
    weight, bias = layer.weight, layer.bias
    if bias is not None and weight.trainable and not bias.trainable:
        raise RuntimeError(
            f"{type(layer).__name__}: a trainable weight needs a trainable bias "
            f"(the kernel computes their gradients together), got weight.trainable="
            f"{weight.trainable}, bias.trainable={bias.trainable}"
        )
    return weight.trainable


def check_features(x: np.ndarray, in_features: int) -> None:
    """Refuse (ValueError) an input whose last dimension is not ``in_features``."""
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., in_features) = (..., {in_features}), got {x.shape}")


class Linear(Module):
    """``y = x @ weight.T + bias`` (:func:`lowrank.nn.functional.linear`).

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    dtype : float32 or float64, default float32
    random_state : None, int or numpy.random.Generator
        For the initialization: PyTorch's default, weight and bias
        ``~ U(-1/sqrt(in_features), 1/sqrt(in_features))`` (drawn in float64,
        then cast, so both dtypes start from the same numbers).

    Attributes
    ----------
    weight : Parameter of shape (out_features, in_features)
    bias : Parameter of shape (out_features,), or None
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: Any = np.float32,
        random_state: RandomState = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features", low=1)
        self.out_features = check_int(out_features, "out_features", low=1)
        bias = check_bool(bias, "bias")
        dtype = check_float_dtype(dtype)
        rng = check_random_state(random_state)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) reduces to this
        shape = (self.out_features, self.in_features)
        self.weight = Parameter(rng.uniform(-bound, bound, shape).astype(dtype))
        self.bias = Parameter(rng.uniform(-bound, bound, self.out_features).astype(dtype)) if bias else None

    def forward(self, x: Any) -> np.ndarray:
        """Map ``x`` (..., in_features) to ``y`` (..., out_features); checks ``x`` once."""
        x = as_array_of(x, "x", self.weight.dtype)
        check_features(x, self.in_features)
        bias = None if self.bias is None else self.bias.data
        y, cache = F.linear_core(x, self.weight.data, bias)  # (..., out)
        self._save_for_backward(cache, y)
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Map ``dy`` (..., out_features) to ``dx`` (..., in_features); adds into weight.grad, bias.grad."""
        trainable = base_is_trainable(self)  # before taking the cache: an error leaves it in place
        cache, dy = self._take_for_backward(dy)
        g = F.linear_backward_core(dy, cache, trainable=trainable)
        if trainable:
            accumulate_grad(self.weight, g.weight)
            if self.bias is not None:
                accumulate_grad(self.bias, g.bias)
        elif self.bias is not None and self.bias.trainable:  # a trainable bias beside a frozen weight
            accumulate_grad(self.bias, dy.reshape(-1, self.out_features).sum(axis=0))  # (out,)
        return g.x

    def extra_repr(self) -> str:
        """``in_features=…, out_features=…, bias=…``, as torch prints it."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---------------------------------------------------------------- Conv1D, LayerNorm, Embedding


class Conv1D(Module):
    """``y = x @ weight + bias``, transformers' ``Conv1D`` (:func:`lowrank.nn.functional.conv1d`).

    GPT-2's projection layer: a linear layer whose weight is stored
    ``(in_features, out_features)``, the transpose of :class:`Linear`'s, so a
    transformers state dict loads without transposing. Note the argument
    order: ``Conv1D(in_features, out_features)`` here, ``Conv1D(nf=out, nx=in)``
    in transformers.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    dtype : float32 or float64, default float32
    random_state : None, int or numpy.random.Generator
        For the initialization, transformers': weight ``~ N(0, 0.02²)`` (drawn
        in float64, then cast), bias zeros.

    Attributes
    ----------
    weight : Parameter of shape (in_features, out_features)
    bias : Parameter of shape (out_features,), or None
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: Any = np.float32,
        random_state: RandomState = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features", low=1)
        self.out_features = check_int(out_features, "out_features", low=1)
        bias = check_bool(bias, "bias")
        dtype = check_float_dtype(dtype)
        rng = check_random_state(random_state)
        self.weight = Parameter(rng.normal(0.0, 0.02, (self.in_features, self.out_features)).astype(dtype))
        self.bias = Parameter(np.zeros(self.out_features, dtype=dtype)) if bias else None

    def forward(self, x: Any) -> np.ndarray:
        """Map ``x`` (..., in_features) to ``y`` (..., out_features); checks ``x`` once."""
        x = as_array_of(x, "x", self.weight.dtype)
        check_features(x, self.in_features)
        bias = None if self.bias is None else self.bias.data
        y, cache = F.conv1d_core(x, self.weight.data, bias)  # (..., out)
        self._save_for_backward(cache, y)
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """Map ``dy`` (..., out_features) to ``dx`` (..., in_features); adds into weight.grad, bias.grad."""
        trainable = base_is_trainable(self)  # before taking the cache: an error leaves it in place
        cache, dy = self._take_for_backward(dy)
        g = F.conv1d_backward_core(dy, cache, trainable=trainable)
        if trainable:
            accumulate_grad(self.weight, g.weight)
            if self.bias is not None:
                accumulate_grad(self.bias, g.bias)
        elif self.bias is not None and self.bias.trainable:  # a trainable bias beside a frozen weight
            accumulate_grad(self.bias, dy.reshape(-1, self.out_features).sum(axis=0))  # (out,)
        return g.x

    def extra_repr(self) -> str:
        """``in_features=…, out_features=…, bias=…``."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class LayerNorm(Module):
    """Layer normalization over the last axis (:func:`lowrank.nn.functional.layer_norm`).

    Parameters
    ----------
    normalized_shape : int
        ``D``, the length of the last axis (a single int: only the last axis
        is normalized).
    eps : float, default 1e-5
    elementwise_affine : bool, default True
        With False there is no weight and no bias (``y = xhat``).
    dtype : float32 or float64, default float32

    Attributes
    ----------
    weight : Parameter of shape (D,), ones, or None
    bias : Parameter of shape (D,), zeros, or None
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        self.normalized_shape = check_int(normalized_shape, "normalized_shape", low=1)
        self.eps = check_real(eps, "eps", 0.0, low_open=True)
        self.elementwise_affine = check_bool(elementwise_affine, "elementwise_affine")
        self.dtype = check_float_dtype(dtype)
        d = self.normalized_shape
        self.weight = Parameter(np.ones(d, dtype=self.dtype)) if self.elementwise_affine else None
        self.bias = Parameter(np.zeros(d, dtype=self.dtype)) if self.elementwise_affine else None

    def forward(self, x: Any) -> np.ndarray:
        """Normalize ``x`` (..., D) over its last axis; checks ``x`` once."""
        x = as_array_of(x, "x", self.dtype)
        if x.ndim == 0 or x.shape[-1] != self.normalized_shape:
            d = self.normalized_shape
            raise ValueError(f"x must have shape (..., normalized_shape) = (..., {d}), got {x.shape}")
        weight = None if self.weight is None else self.weight.data
        bias = None if self.bias is None else self.bias.data
        y, cache = F.layer_norm_core(x, weight, bias, self.eps)
        self._save_for_backward(cache, y)
        return y

    def backward(self, dy: Any) -> np.ndarray:
        """``dx`` (..., D) from ``dy``; adds into weight.grad and bias.grad when they are trainable."""
        cache, dy = self._take_for_backward(dy)
        weight_trainable = self.weight is not None and self.weight.trainable
        bias_trainable = self.bias is not None and self.bias.trainable
        g = F.layer_norm_backward_core(dy, cache, trainable=weight_trainable or bias_trainable)
        if weight_trainable:
            assert self.weight is not None
            accumulate_grad(self.weight, g.weight)
        if bias_trainable:
            assert self.bias is not None
            accumulate_grad(self.bias, g.bias)
        return g.x

    def extra_repr(self) -> str:
        """``(D,), eps=…, elementwise_affine=…``, as torch prints it."""
        return f"({self.normalized_shape},), eps={self.eps:g}, elementwise_affine={self.elementwise_affine}"


class Embedding(Module):
    """A lookup table: ``y = weight[indices]`` (:func:`lowrank.nn.functional.embedding`).

    Parameters
    ----------
    num_embeddings, embedding_dim : int
    dtype : float32 or float64, default float32
    random_state : None, int or numpy.random.Generator
        For the initialization, PyTorch's: weight ``~ N(0, 1)`` (drawn in
        float64, then cast).

    Attributes
    ----------
    weight : Parameter of shape (num_embeddings, embedding_dim)

    Notes
    -----
    ``forward`` takes integer indices of any shape ``(...)`` and returns
    ``(..., embedding_dim)``; a float or bool array is a TypeError, an index
    outside ``[0, num_embeddings)`` a ValueError naming it. The input is not
    differentiable, so ``backward(dy)`` adds the scattered ``dy`` into
    ``weight.grad`` (repeated indices summed) and returns None.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        dtype: Any = np.float32,
        random_state: RandomState = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = check_int(num_embeddings, "num_embeddings", low=1)
        self.embedding_dim = check_int(embedding_dim, "embedding_dim", low=1)
        dtype = check_float_dtype(dtype)
        rng = check_random_state(random_state)
        self.weight = Parameter(rng.standard_normal((self.num_embeddings, self.embedding_dim)).astype(dtype))

    def forward(self, x: Any) -> np.ndarray:
        """Look up the rows ``x`` (integers of any shape); returns (..., embedding_dim)."""
        indices = F.check_indices(x, self.num_embeddings, "indices")
        y, cache = F.embedding_core(indices, self.weight.data)
        self._save_for_backward(cache, y)
        return y

    def backward(self, dy: Any) -> None:  # type: ignore[override]  # integer input: no dx
        """Add the scattered ``dy`` (..., embedding_dim) into ``weight.grad``; returns None (no input gradient)."""
        cache, dy = self._take_for_backward(dy)
        if self.weight.trainable:
            accumulate_grad(self.weight, F.embedding_backward_core(dy, cache))

    def extra_repr(self) -> str:
        """``num_embeddings, embedding_dim``, as torch prints it."""
        return f"{self.num_embeddings}, {self.embedding_dim}"


# ---------------------------------------------------------------- activations


class _Activation(Module):
    """The bookkeeping shared by the elementwise activations; each names its kernel's cores.

    Input keeps its dtype (integer and bool become float64); it is converted
    here, ``dy`` is checked by ``_take_for_backward``, and the cores check nothing.
    """

    def forward(self, x: Any) -> np.ndarray:
        y, cache = self._core(as_float_array(x, "x"))
        self._save_for_backward(cache, y)
        return y

    def backward(self, dy: Any) -> np.ndarray:
        cache, dy = self._take_for_backward(dy)
        return self._backward_core(dy, cache)

    def _core(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def _backward_core(self, dy: np.ndarray, cache: Any) -> np.ndarray:
        raise NotImplementedError


class ReLU(_Activation):
    """``max(x, 0)``, elementwise (:func:`lowrank.nn.functional.relu`)."""

    def _core(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        return F.relu_core(x)

    def _backward_core(self, dy: np.ndarray, cache: Any) -> np.ndarray:
        return F.relu_backward_core(dy, cache)


class Tanh(_Activation):
    """``tanh(x)``, elementwise (:func:`lowrank.nn.functional.tanh`)."""

    def _core(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        return F.tanh_core(x)

    def _backward_core(self, dy: np.ndarray, cache: Any) -> np.ndarray:
        return F.tanh_backward_core(dy, cache)


class Sigmoid(_Activation):
    """``1 / (1 + exp(-x))``, elementwise (:func:`lowrank.nn.functional.sigmoid`)."""

    def _core(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        return F.sigmoid_core(x)

    def _backward_core(self, dy: np.ndarray, cache: Any) -> np.ndarray:
        return F.sigmoid_backward_core(dy, cache)


class GELU(_Activation):
    """``x * Φ(x)``, elementwise (:func:`lowrank.nn.functional.gelu`).

    Parameters
    ----------
    approximate : {"none", "tanh"}, default "none"
        ``"none"``: the exact erf form; ``"tanh"``: the tanh approximation,
        exactly as ``torch.nn.GELU``.
    """

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = check_choice(approximate, "approximate", GELU_FORMS)

    def _core(self, x: np.ndarray) -> tuple[np.ndarray, Any]:
        return F.gelu_core(x, self.approximate)

    def _backward_core(self, dy: np.ndarray, cache: Any) -> np.ndarray:
        return F.gelu_backward_core(dy, cache)

    def extra_repr(self) -> str:
        """``approximate='…'``."""
        return f"approximate={self.approximate!r}"


# ---------------------------------------------------------------- Sequential


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse.

    The sub-modules are named ``"0"``, ``"1"``, …, so parameters read
    ``"0.weight"``, as in ``torch.nn.Sequential``. Supports ``len``,
    iteration, ``seq[i]`` (negative too) and ``seq[a:b]`` (a new Sequential of
    the same module objects).
    """

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, module in enumerate(modules):
            if not isinstance(module, Module):
                raise TypeError(f"Sequential takes Modules, got {type(module).__name__} at position {i}")
            setattr(self, str(i), module)

    def __len__(self) -> int:
        return len(self._module_names)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.children())

    def __getitem__(self, index: int | slice) -> Module:
        children = self.children()
        if isinstance(index, slice):
            return Sequential(*children[index])
        i = check_int(index, "index")
        if not -len(children) <= i < len(children):
            raise IndexError(f"index {i} is out of range for a Sequential of length {len(children)}")
        return children[i]

    def __setitem__(self, index: int, module: Module) -> None:
        """Replace the module at ``index`` (it keeps its name, e.g. when wrapping in LoRA)."""
        if not isinstance(module, Module):
            raise TypeError(f"a Sequential holds Modules, got {type(module).__name__}")
        names = list(self._module_names)
        i = check_int(index, "index")
        if not -len(names) <= i < len(names):
            raise IndexError(f"index {i} is out of range for a Sequential of length {len(names)}")
        setattr(self, names[i], module)

    def forward(self, x: Any) -> np.ndarray:
        """Each module's forward, in order."""
        for module in self:
            x = module(x)
        return x

    def backward(self, dy: Any) -> np.ndarray:
        """Each module's backward, in reverse order."""
        for module in reversed(self.children()):
            dy = module.backward(dy)
        return dy
