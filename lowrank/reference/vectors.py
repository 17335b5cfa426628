"""Reference test vectors: deterministic cases another implementation is checked against.

:func:`write_vectors` writes a folder::

    manifest.json              the conventions in words, and every case: its inputs,
                               its outputs, its parameters, its tolerances
    <case>.safetensors         one file per case: the input tensors and the
                               expected output tensors, under the names of the manifest

An implementation under test (PyTorch, JAX, C++, ...) reads each case's inputs,
computes the outputs, and writes them to ``<case>.safetensors`` in a folder of
its own under the same tensor names (the inputs may be copied along or left
out). :func:`check_vectors` then compares that folder with the reference, per
case and tensor. ``docs/verifying.md`` walks through it for PyTorch.

Every expected output here is computed by this package's own kernels and
modules, always in float64: a float32 case draws its inputs in float32 (so
they are exactly representable there), widens them exactly to float64,
computes, and rounds each output once to float32 (:func:`widen`). The
float32 expectation is then the float32 number nearest the exact result (up
to float64's own error, ~1e-16 relative against float32's half ulp of
6e-8), whatever the shape or the evaluation path; a float32 kernel would
round at every step, and differently for a batch large enough to fold the
update into the weight. ``tests/test_vectors.py`` recomputes every output by
hand in float64 NumPy, and the torch crosschecks the linear, LoRA,
Conv1D, Embedding, MergedLinear and attention-family cases with autograd. The
linear and LoRA cases are those of :mod:`lowrank.reference.cases`; tensors
are compared under the rule of :mod:`lowrank.reference.compare`. The files
are read and written with NumPy alone (:mod:`lowrank.io.files`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lowrank.io.adapter import lora_scaling
from lowrank.io.files import (
    PathLike,
    atomic_write_folder,
    check_writable,
    load_json,
    load_safetensors,
    save_json,
    save_safetensors,
)
from lowrank.precision.bounds import dora_linear_bound, lora_linear_bound, lora_merge_bound
from lowrank.precision.rounding import round_to
from lowrank.reference.cases import CONV1D_CASES, DORA_CASES, LINEAR_CASES, LORA_CASES
from lowrank.reference.compare import TOLERANCES, compare, compare_within, error_stats, tolerance_for
from lowrank.utils.validation import RandomState, check_random_state

__all__ = [
    "HALF_DTYPES",
    "MANIFEST_NAME",
    "TOLERANCES",
    "CheckReport",
    "CheckRow",
    "check_vectors",
    "error_stats",
    "read_manifest",
    "select_cases",
    "widen",
    "write_vectors",
]

MANIFEST_NAME = "manifest.json"
HALF_DTYPES = ("bfloat16", "float16")
"""The 16-bit formats ``write_vectors(..., dtypes=...)`` adds cases in."""
_FORMAT = "lowrank-vectors"
_VERSION = 1

# TOLERANCES and the comparison rule live in lowrank.reference.compare (re-exported here).

CONVENTIONS = {
    "files": (
        "Each case is one safetensors file holding its input tensors and its expected output tensors, "
        "under the names listed in this manifest. Your implementation reads the inputs, computes the "
        "outputs and writes them, under the same names, to a file of the same name in a folder of its own; "
        "then `lowrank vectors check REFERENCE_DIR YOUR_DIR` compares them (add `--kinds linear,lora_linear` or "
        "`--cases 'GLOB'` to check only the cases you implement). Scalars are 0-d tensors."
    ),
    "shapes": (
        "Matrices are row-major. A layer input x has shape (..., in_features): any number of leading batch "
        "dimensions, all treated alike (flatten them to N rows). Gradients have the shape of what they are "
        "the gradient of: dx the shape of x, dweight (out, in), dA (r, in), dB (out, r)."
    ),
    "linear": "y = x @ weight^T + bias, with weight of shape (out_features, in_features) and bias (out_features,).",
    "lora": (
        "A LoRA layer adds a low-rank update to a frozen linear layer: "
        "y = x @ weight^T + bias + scaling * ((x * dropout_mask) @ A^T) @ B^T, "
        "with A of shape (r, in_features) and B of shape (out_features, r). The merged weight is "
        "weight + scaling * B @ A."
    ),
    "scaling": "scaling = alpha / r; with rsLoRA (use_rslora true), scaling = alpha / sqrt(r).",
    "dora": (
        "DoRA (PEFT's use_dora) adds a magnitude vector m of shape (out_features,) to a LoRA layer. "
        "V = weight + scaling * B @ A; n = the Euclidean norm of each row of V (over in_features, one per "
        "output feature); c = m / n. Forward, as PEFT computes it: y = x @ weight^T + bias + (c - 1) * "
        "(xm @ weight^T) + c * scaling * (xm @ A^T) @ B^T with xm = x * dropout_mask (xm = x without "
        "dropout), c multiplying each output feature; without dropout this is y = x @ (c[:, None] * V)^T + "
        "bias. The merged weight is c[:, None] * V. The two gradient modes differ only in whether n counts "
        "as a function of the weights: kind 'dora_linear' treats n as a constant (detach_norm true: the DoRA "
        "paper's section 4.3 and PEFT, whose autograd sees n detached), kind 'dora_linear_exact' "
        "differentiates n too (detach_norm false: the true gradient of the forward); their dx, dmagnitude "
        "and dbias agree (n depends on none of x, m, bias), and each row of their dA, dB, dweight differs by "
        "the projection of the gradient with respect to V onto that row's direction V_i / n_i. Both kinds "
        "of a case share their inputs."
    ),
    "dropout": (
        "Inverted dropout with an explicit mask: dropout_mask holds 0 or 1/(1-p) and multiplies the input of "
        "the LoRA path only (the base path sees x unchanged). The mask either has x's shape or broadcasts to it "
        "(NumPy broadcasting rules). A case without a dropout_mask tensor has no dropout."
    ),
    "gradients": (
        "Backward cases give an upstream gradient dy (the gradient of some scalar with respect to the output y) "
        "and expect the gradients of that scalar with respect to each input: for the linear and LoRA layers "
        "dx, dA, dB, and also dweight and dbias as if the base layer were trainable (summed over every batch "
        "dimension)."
    ),
    "reduction": (
        "Every loss is the mean over all elements (for cross-entropy: over all positions, i.e. all dimensions "
        "but the last, which holds the classes). The loss is a 0-d float64 tensor (accumulated in float64 even "
        "for float32 inputs); its gradient with respect to the prediction has the prediction's dtype."
    ),
    "adam": (
        "PyTorch's Adam: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; "
        "param -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), with t = 1 for the first step and "
        "m = v = 0 before it. Only trainable parameters are updated."
    ),
    "svd": (
        "Truncated SVD M ~ U @ diag(s) @ Vt of rank r with s descending. Singular vectors are only defined up "
        "to sign, so the cases compare s and the reconstruction U @ diag(s) @ Vt, which do not depend on it."
    ),
    "als": (
        "Alternating least squares on the observed entries (mask true) of M, minimizing "
        "sum over observed (i, j) of (M_ij - (left @ right)_ij)^2 + reg * (||left||_F^2 + ||right||_F^2). "
        "Start from right = right_init (r, n); each sweep first solves exactly for left with right fixed (one "
        "regularized least-squares problem per row of M, over that row's observed columns), then for right "
        "with left fixed (per column). losses[k] is the objective after sweep k + 1, in float64. "
        "right_init is diag(sqrt(s)) @ Vt from the rank-r truncated SVD of M with unobserved entries set to 0 "
        "and scaled by m * n / (number of observed entries); given here so you need not reproduce it. "
        "Compare the product left @ right, which does not depend on sign choices."
    ),
    "lora_conv1d": (
        "Kind 'lora_conv1d' is LoRA on transformers' Conv1D (PEFT's fan_in_fan_out): weight is stored (in_features, "
        "out_features) and y = x @ weight + bias + scaling * ((x * dropout_mask) @ A^T) @ B^T with A (r, in) and "
        "B (out, r) as in 'lora'; outputs y, dx, dA, dB, and dweight in weight's own (in, out) layout and dbias "
        "as if the base were trainable."
    ),
    "lora_embedding": (
        "Kind 'lora_embedding' is PEFT's LoRA on an Embedding: idx holds int64 token ids (repeats included), "
        "weight (num_embeddings, embedding_dim), A = lora_embedding_A (r, num_embeddings), B = "
        "lora_embedding_B (embedding_dim, r), y = weight[idx] + scaling * A^T[idx] @ B^T of shape (*idx.shape, "
        "embedding_dim), no dropout; outputs y, dA, dB and dweight (as if the table were trainable), where a row "
        "looked up several times receives the sum of its gradients."
    ),
    "lora_merged_linear": (
        "Kind 'lora_merged_linear' is loralib's MergedLinear: out_features is len(enable_lora) equal blocks of "
        "d rows (q, k, v), A stacks k = sum(enable_lora) factors A_j (r, in) into (k * r, in), B stacks k "
        "factors B_j (d, r) into (k * d, r), and y = x @ weight^T + bias + scaling * (x * dropout_mask) @ "
        "dW^T where the rows of the j-th enabled block of dW (out, in) are B_j @ A_j and a disabled block's "
        "rows are 0; outputs y, dx, dA, dB, dweight, dbias (the base as if trainable)."
    ),
    "layer_norm": (
        "Kind 'layer_norm' normalizes over the last axis as torch.nn.functional.layer_norm: y = (x - mean) / "
        "sqrt(var + eps) * weight + bias with the biased variance (divided by D) and eps in params; outputs y, "
        "dx, dweight and dbias (summed over every leading dimension), weight and bias of shape (D,)."
    ),
    "softmax": (
        "Kind 'softmax' is y = exp(x) / sum(exp(x)) over the last axis (params axis -1); outputs y and dx = "
        "y * (dy - sum(dy * y)) over that axis."
    ),
    "scaled_dot_product_attention": (
        "Kind 'scaled_dot_product_attention' is torch's F.scaled_dot_product_attention with q (..., T, d), k "
        "(..., S, d), v (..., S, dv): y = (softmax(scale * q @ k^T with masked scores set to -inf) * "
        "dropout_mask) @ v, scale = 1/sqrt(d) (params), is_causal letting query i see keys j <= i only, "
        "attn_mask (when present) a bool (T, S) tensor that is true where attention is allowed, "
        "dropout_mask (when present) the explicit inverted-dropout mask (0 or 1/(1-p)) on the attention "
        "weights (..., T, S); outputs y, dq, dk, dv."
    ),
    "cross_entropy_ignore_index": (
        "A 'cross_entropy' case with params ignore_index (PyTorch's default -100) skips the positions whose "
        "int64 target equals it: they add no loss and get a zero gradient, and the mean divides by the number "
        "of positions kept."
    ),
    "expected_values": (
        "Every expected output is computed in float64 from the inputs as stored and rounded once to the "
        "output's dtype. The inputs of a float32 case are float32 numbers, so they convert to float64 "
        "exactly; a float32 expected value is therefore the float32 number nearest to the exact result (up "
        "to float64's own rounding, about 1e-16 relative, far below float32's half unit in the last place, "
        "6e-8), whatever the shape, batch size or order of evaluation. Your float32 implementation rounds "
        "at every step; the tolerances allow for that."
    ),
    "half_precision": (
        "Cases in bfloat16 or float16 (written on request: `lowrank vectors write DIR --dtypes bfloat16,float16`; "
        "names ending _bf16 or _f16, 'dtype' bfloat16 or float16) store every tensor in that format (BF16 or F16 "
        "in the file). Their inputs are values of the format; each expected output is computed in float64 from "
        "them and rounded once to the format. They check forward outputs only: y (the adapted layer, unmerged, "
        "as PEFT evaluates it; for DoRA PEFT's DoraLinearLayer in eval mode), y_base (the base layer alone: the "
        "adapter disabled) and merged_weight. Each such "
        "output has its own per-element tolerance, the tensor '<output>.tolerance' (float64) in the case's file "
        "(named under 'elementwise_tolerance'): the a priori bound on |computed - exact| of an implementation "
        "that rounds its inputs and each product's result to the format and accumulates every sum in float32, "
        "in any order (lowrank.precision.bounds: lora_linear_bound, with zero factors for y_base, "
        "dora_linear_bound and lora_merge_bound; derived in docs/precision.md), plus the distance from the exact "
        "result to the stored "
        "expected value, plus 1e-12 of the output's largest magnitude for the float64 computation itself. An "
        "output passes when it has the expected shape and dtype, holds values of the format only, and every "
        "element is within its tolerance. An implementation that accumulates in the 16-bit format, or whose "
        "base weight drifted through a merge and unmerge in the format, falls outside."
    ),
    "comparison": (
        "An output passes when it has the expected shape and dtype (a float32 tensor where float64 is "
        "expected fails, whatever its values; so do complex, string and object tensors) and every element "
        "satisfies |candidate - expected| <= atol * max|expected| + rtol * |expected|, where max|expected| is "
        "the largest magnitude in the whole expected tensor (so the absolute floor follows the tensor's "
        "scale), with the case's rtol and atol: the row of 'tolerances' for the case's dtype, the same for "
        "every case of that dtype. Integer outputs must match exactly; a NaN or infinite candidate value "
        "fails. max_abs is max |candidate - expected|; max_rel is max |candidate - expected| / |expected| "
        "over the elements where expected is not 0."
    ),
}


# ---------------------------------------------------------------- building cases


class _Case:
    """One case while it is built: tensors, the words describing them, and its parameters."""

    def __init__(self, name: str, kind: str, dtype: Any, description: str, **params: Any) -> None:
        self.name, self.kind, self.description = name, kind, description
        self.dtype = np.dtype(dtype).name
        self.params = params
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        self.docs: dict[str, str] = {}
        rtol, atol = tolerance_for(self.dtype)
        self.tolerance = {"rtol": rtol, "atol": atol}
        self.extra: dict[str, np.ndarray] = {}  # other tensors of the file: per-element tolerances
        self.file_dtypes: dict[str, str] = {}  # tensors stored in a 16-bit format

    def input(self, name: str, value: np.ndarray, doc: str) -> np.ndarray:
        self.inputs[name] = np.asarray(value, order="C")  # ascontiguousarray would make 0-d 1-d
        self.docs[name] = doc
        return self.inputs[name]

    def output(self, name: str, value: Any, doc: str, dtype: Any = None) -> None:
        """Record an expected output computed in float64, rounded once to ``dtype`` (default: the case's)."""
        value = np.asarray(value)
        assert value.dtype == np.float64, (name, value.dtype)  # computed wide, see widen()
        out = value.astype(self.dtype if dtype is None else dtype)  # the one rounding (to nearest, ties even)
        self.outputs[name] = np.asarray(out, order="C")  # ascontiguousarray would make 0-d 1-d
        self.docs[name] = doc

    def manifest_entry(self, sha256: str) -> dict[str, Any]:
        def describe(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
            return {k: {"shape": list(v.shape), "dtype": self.file_dtypes.get(k, v.dtype.name),
                        "description": self.docs[k]} for k, v in tensors.items()}

        return {
            "name": self.name,
            "file": f"{self.name}.safetensors",
            "sha256": sha256,
            "kind": self.kind,
            "dtype": self.dtype,
            "description": self.description,
            "params": self.params,
            "inputs": describe(self.inputs),
            "outputs": describe(self.outputs),
            **self.tolerance,
        }


class _HalfCase(_Case):
    """A case in bfloat16 or float16: inputs of the format, outputs rounded once, per-element tolerances."""

    def __init__(self, name: str, kind: str, fmt: str, description: str, **params: Any) -> None:
        super().__init__(name, kind, np.float64, description, **params)
        self.dtype = fmt
        self.tolerance = {"rtol": 0.0, "atol": 0.0}  # unused: see elementwise
        self.elementwise: dict[str, str] = {}
        self._stored = np.float32 if fmt == "bfloat16" else np.float16  # how load_safetensors returns it

    def half_input(self, name: str, value: np.ndarray, doc: str) -> np.ndarray:
        """Round ``value`` to the format, record it, and return it exactly as float64."""
        exact = round_to(np.asarray(value, np.float64), self.dtype)  # float64 holding values of the format
        self.input(name, exact.astype(self._stored), doc)
        self.file_dtypes[name] = self.dtype
        return exact

    def half_output(self, name: str, value: np.ndarray, bound: np.ndarray, doc: str) -> None:
        """Record ``value`` (float64) rounded once, and its tolerance: the bound, the rounding, and a float64 slack."""
        assert value.dtype == np.float64 and bound.shape == value.shape, (name, value.dtype, bound.shape)
        rounded = round_to(value, self.dtype)  # (..), float64 holding values of the format
        slack = 1e-12 * float(np.abs(value).max(initial=0.0))  # the float64 computation's own error
        self.outputs[name] = np.asarray(rounded.astype(self._stored), order="C")
        self.docs[name] = doc
        self.file_dtypes[name] = self.dtype
        self.extra[f"{name}.tolerance"] = np.asarray(bound + np.abs(rounded - value) + slack, order="C")
        self.elementwise[name] = f"{name}.tolerance"

    def manifest_entry(self, sha256: str) -> dict[str, Any]:
        return {**super().manifest_entry(sha256), "elementwise_tolerance": dict(self.elementwise)}


_SUFFIX = {"float32": "f32", "float64": "f64"}
_DTYPES = (np.float32, np.float64)


def widen(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float64 copies of the floating-point tensors, the others (integer targets, bool masks) as they are.

    Every reference output is computed from these and rounded once to its
    case's dtype: a float32 or float64 input converts to float64 exactly, so
    the only rounding of the result beyond float64's own is that last one.

    Parameters
    ----------
    tensors : dict of str to ndarray

    Returns
    -------
    dict of str to ndarray
        Same keys.
    """
    return {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in tensors.items()}


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


_LINEAR_DOCS = {
    "x": "input, shape (..., in_features)",
    "weight": "weight, shape (out_features, in_features)",
    "bias": "bias, shape (out_features,)",
    "dy": "upstream gradient, y's shape",
}


def _linear_cases(rng: np.random.Generator) -> list[_Case]:
    from lowrank.nn import functional as F

    cases = []
    for dtype in _DTYPES:
        for spec in LINEAR_CASES:
            bias = spec.bias
            case = _Case(f"linear_{spec.name}_{_SUFFIX[np.dtype(dtype).name]}", "linear", dtype,
                         "A linear layer's forward and backward pass.",
                         in_features=spec.in_features, out_features=spec.out_features)  # fmt: skip
            t = widen({k: case.input(k, v, _LINEAR_DOCS[k]) for k, v in spec.tensors(rng, dtype).items()})
            x, w, b, dy = t["x"], t["weight"], t.get("bias"), t["dy"]
            y, cache = F.linear(x, w, b)
            g = F.linear_backward(dy, cache)
            case.output("y", y, "output, shape (..., out_features)")
            case.output("dx", g.x, "gradient with respect to x")
            case.output("dweight", g.weight, "gradient with respect to weight, summed over the batch")
            if bias:
                case.output("dbias", g.bias, "gradient with respect to bias, summed over the batch")
            cases.append(case)
    return cases


_LORA_DOCS = {
    "x": "input, shape (..., in_features)",
    "weight": "frozen base weight (out, in)",
    "bias": "frozen base bias (out,)",
    "A": "LoRA down-projection, shape (r, in)",
    "B": "LoRA up-projection, shape (out, r)",
    "dy": "upstream gradient, y's shape",
}
_MASK_DOCS = {
    "full": "inverted-dropout mask (0 or 1/(1-p) = 2), x's shape",
    "shared": "inverted-dropout mask (0 or 1/(1-p) = 2), shape (in,), broadcast over the batch",
}


def _lora_cases(rng: np.random.Generator) -> list[_Case]:
    from lowrank.nn import functional as F

    cases = []
    for dtype in _DTYPES:
        for spec in LORA_CASES:
            bias, scaling = spec.bias, spec.scaling
            case = _Case(
                f"lora_linear_{spec.name}_{_SUFFIX[np.dtype(dtype).name]}", "lora_linear", dtype,
                "A LoRA layer's forward and backward pass (B is non-zero, so every gradient is exercised).",
                in_features=spec.in_features, out_features=spec.out_features, r=spec.r, alpha=spec.alpha,
                use_rslora=spec.use_rslora, scaling=scaling, dropout_p=spec.dropout_p,
            )  # fmt: skip
            docs = {**_LORA_DOCS, "dropout_mask": _MASK_DOCS.get(spec.dropout, "")}
            t = widen({k: case.input(k, v, docs[k]) for k, v in spec.tensors(rng, dtype).items()})
            x, w, b, A, B, mask, dy = (t.get(k) for k in ("x", "weight", "bias", "A", "B", "dropout_mask", "dy"))
            y, cache = F.lora_linear(x, w, b, A, B, scaling, dropout_mask=mask)
            g = F.lora_linear_backward(dy, cache, base_trainable=True)
            case.output("y", y, "output, shape (..., out_features)")
            case.output("dx", g.x, "gradient with respect to x (through both paths)")
            case.output("dA", g.A, "gradient with respect to A")
            case.output("dB", g.B, "gradient with respect to B")
            case.output("dweight", g.weight, "gradient with respect to weight, as if it were trainable")
            if bias:
                case.output("dbias", g.bias, "gradient with respect to bias, as if it were trainable")
            cases.append(case)
    return cases


_DORA_MODES = {  # kind: (detach_norm, the sentence that names the mode)
    "dora_linear": (True, "the norm n treated as a constant in backward (PEFT's and the DoRA paper's gradient)"),
    "dora_linear_exact": (False, "the exact gradient of the forward, through the norm n"),
}


def _dora_cases(rng: np.random.Generator) -> list[_Case]:
    from lowrank.nn import functional as F

    cases = []
    for dtype in _DTYPES:
        for spec in DORA_CASES:
            docs = {**_LORA_DOCS, "magnitude": "DoRA magnitude m, shape (out,)",
                    "dropout_mask": _MASK_DOCS.get(spec.dropout, "")}  # fmt: skip
            drawn = spec.tensors(rng, dtype)  # one draw: both modes of the case share their inputs
            for kind, (detach_norm, mode) in _DORA_MODES.items():
                case = _Case(
                    f"{kind}_{spec.name}_{_SUFFIX[np.dtype(dtype).name]}", kind, dtype,
                    f"A DoRA layer's forward and backward pass, with {mode}; see the 'dora' convention.",
                    in_features=spec.in_features, out_features=spec.out_features, r=spec.r, alpha=spec.alpha,
                    use_rslora=spec.use_rslora, scaling=spec.scaling, dropout_p=spec.dropout_p,
                    detach_norm=detach_norm,
                )  # fmt: skip
                t = widen({k: case.input(k, v, docs[k]) for k, v in drawn.items()})
                x, w, b, A, B, m, mask, dy = (
                    t.get(k) for k in ("x", "weight", "bias", "A", "B", "magnitude", "dropout_mask", "dy")
                )
                y, cache = F.dora_linear(x, w, b, A, B, m, spec.scaling, dropout_mask=mask, detach_norm=detach_norm)
                g = F.dora_linear_backward(dy, cache, base_trainable=True)
                case.output("y", y, "output, shape (..., out_features)")
                case.output("dx", g.x, "gradient with respect to x (the same in both modes)")
                case.output("dA", g.A, f"gradient with respect to A, {mode}")
                case.output("dB", g.B, f"gradient with respect to B, {mode}")
                case.output("dmagnitude", g.magnitude, "gradient with respect to m (the same in both modes)")
                case.output("dweight", g.weight, f"gradient with respect to weight as if it were trainable, {mode}")
                if spec.bias:
                    case.output("dbias", g.bias, "gradient with respect to bias, as if it were trainable")
                cases.append(case)
    return cases


def _dora_merge_cases(rng: np.random.Generator) -> list[_Case]:
    from lowrank import nn

    cases = []
    for dtype in _DTYPES:
        r, alpha, n_in, n_out = 3, 6.0, 6, 5
        case = _Case(f"dora_merge_{_SUFFIX[np.dtype(dtype).name]}", "dora_merge", dtype,
                     "Merging a DoRA update into its base weight: (m / n)[:, None] * V with V = weight + "
                     "scaling * B @ A and n its row norms (accumulated in float64, rounded once).",
                     r=r, alpha=alpha, use_rslora=False, scaling=alpha / r)  # fmt: skip
        w = case.input("weight", _normal(rng, (n_out, n_in), dtype), "base weight (out, in)")
        A = case.input("A", _normal(rng, (r, n_in), dtype), "shape (r, in)")
        B = case.input("B", _normal(rng, (n_out, r), dtype), "shape (out, r)")
        m = case.input("magnitude", (np.sqrt(n_in) * rng.uniform(0.5, 2.0, n_out)).astype(dtype), "shape (out,)")
        layer = nn.LoRALinear(nn.Linear(n_in, n_out, bias=False, dtype=np.float64, random_state=0), r=r,
                              alpha=alpha, use_dora=True)  # fmt: skip
        layer.weight.data, layer.A.data, layer.B.data = (v.astype(np.float64) for v in (w, A, B))
        layer.magnitude.data = m.astype(np.float64)
        layer.merge()
        case.output("merged_weight", layer.weight.data, "(m / n)[:, None] * (weight + scaling * B @ A), (out, in)")
        cases.append(case)
    return cases


def _merge_cases(rng: np.random.Generator) -> list[_Case]:
    from lowrank import nn

    cases = []
    for dtype in _DTYPES:
        r, alpha, n_in, n_out = 3, 6.0, 6, 5
        case = _Case(f"lora_merge_{_SUFFIX[np.dtype(dtype).name]}", "lora_merge", dtype,
                     "Merging a LoRA update into its base weight (accumulated in float64, rounded once).",
                     r=r, alpha=alpha, use_rslora=False, scaling=alpha / r)
        w = case.input("weight", _normal(rng, (n_out, n_in), dtype), "base weight (out, in)")
        A = case.input("A", _normal(rng, (r, n_in), dtype), "shape (r, in)")
        B = case.input("B", _normal(rng, (n_out, r), dtype), "shape (out, r)")
        layer = nn.LoRALinear(nn.Linear(n_in, n_out, bias=False, dtype=np.float64, random_state=0), r=r,
                              alpha=alpha)  # fmt: skip
        layer.weight.data, layer.A.data, layer.B.data = (v.astype(np.float64) for v in (w, A, B))
        layer.merge()
        case.output("merged_weight", layer.weight.data, "weight + scaling * B @ A, shape (out, in)")
        cases.append(case)
    return cases


def _activation_cases(rng: np.random.Generator) -> list[_Case]:
    from lowrank.nn import functional as F

    # name: (formula, forward or None, backward); dropout's forward takes the mask as well
    kernels: dict[str, tuple[str, Callable[..., Any] | None, Callable[..., Any]]] = {
        "relu": ("max(x, 0); its derivative at 0 is 0 (no input is exactly 0 here)", F.relu, F.relu_backward),
        "tanh": ("tanh(x)", F.tanh, F.tanh_backward),
        "sigmoid": ("1 / (1 + exp(-x))", F.sigmoid, F.sigmoid_backward),
        "gelu": ("x * Phi(x), Phi the standard normal CDF (the exact erf form)",
                 F.gelu, F.gelu_backward),
        "gelu_tanh": ("x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) / 2 (the tanh approximation)",
                      lambda x: F.gelu(x, approximate="tanh"), F.gelu_backward),
        "dropout": ("x * mask, with the given inverted-dropout mask (0 or 2 here)", None, F.dropout_backward),
    }  # fmt: skip
    cases = []
    for dtype in _DTYPES:
        for name, (formula, forward, backward) in kernels.items():
            case = _Case(f"{name}_{_SUFFIX[np.dtype(dtype).name]}", name, dtype,
                         f"Elementwise {name}: y = {formula}; dx = dy * dy/dx.")
            x = rng.uniform(-4, 4, (3, 4))
            x = np.sign(x) * (0.05 + np.abs(x))  # away from relu's kink
            x = case.input("x", x.astype(dtype), "input, any shape (3, 4 here)").astype(np.float64)
            if forward is None:  # dropout: the mask is an input of its own
                mask = case.input("mask", F.dropout_mask(x.shape, 0.5, random_state=rng, dtype=dtype),
                                  "mask, x's shape")
                y, cache = F.dropout(x, mask.astype(np.float64))
            else:
                y, cache = forward(x)
            dy = case.input("dy", _normal(rng, x.shape, dtype), "upstream gradient, x's shape")
            dy = dy.astype(np.float64)
            case.output("y", y, "output, x's shape")
            case.output("dx", backward(dy, cache), "gradient with respect to x")
            cases.append(case)
    return cases


def _loss_cases(rng: np.random.Generator) -> list[_Case]:
    from lowrank.nn import functional as F

    cases = []
    for dtype in _DTYPES:
        sfx = _SUFFIX[np.dtype(dtype).name]
        case = _Case(f"mse_loss_{sfx}", "mse_loss", dtype,
                     "loss = mean((pred - target)^2); dpred = 2 (pred - target) / n.")
        pred = case.input("pred", _normal(rng, (3, 4), dtype), "prediction, any shape")
        target = case.input("target", _normal(rng, (3, 4), dtype), "target, pred's shape")
        loss, grad = F.mse_loss(pred.astype(np.float64), target.astype(np.float64))
        case.output("loss", np.float64(loss), "0-d float64", dtype=np.float64)
        case.output("dpred", grad, "gradient of the loss with respect to pred")
        cases.append(case)

        case = _Case(f"cross_entropy_{sfx}", "cross_entropy", dtype,
                     "Softmax cross-entropy with integer class targets: "
                     "loss = mean over positions of (logsumexp(logits) - logits[target]); "
                     "dlogits = (softmax(logits) - onehot(target)) / number of positions.")
        logits = case.input("logits", (3 * _normal(rng, (2, 3, 5), dtype)).astype(dtype), "shape (..., C), C = 5")
        target = case.input("target", rng.integers(0, 5, (2, 3)).astype(np.int64), "int64 class indices, shape (...)")
        loss, grad = F.cross_entropy(logits.astype(np.float64), target)
        case.output("loss", np.float64(loss), "0-d float64", dtype=np.float64)
        case.output("dlogits", grad, "gradient with respect to logits")
        cases.append(case)

        case = _Case(f"bce_with_logits_{sfx}", "binary_cross_entropy_with_logits", dtype,
                     "Binary cross-entropy on logits z with targets t in [0, 1]: "
                     "loss = mean(max(z, 0) - z t + log(1 + exp(-|z|))); dlogits = (sigmoid(z) - t) / n.")
        logits = case.input("logits", (3 * _normal(rng, (4, 3), dtype)).astype(dtype), "logits, any shape")
        target = case.input("target", rng.random((4, 3)).astype(dtype), "targets in [0, 1], logits' shape")
        loss, grad = F.binary_cross_entropy_with_logits(logits.astype(np.float64), target.astype(np.float64))
        case.output("loss", np.float64(loss), "0-d float64", dtype=np.float64)
        case.output("dlogits", grad, "gradient with respect to logits")
        cases.append(case)
    return cases


def _training_cases(rng: np.random.Generator) -> list[_Case]:
    from lowrank import nn
    from lowrank.nn import functional as F
    from lowrank.nn.optim import Adam

    def lora_mlp(dtype: Any, rng: np.random.Generator) -> tuple[nn.Sequential, list[nn.LoRALinear]]:
        first = nn.Linear(4, 8, dtype=dtype, random_state=rng)
        second = nn.Linear(8, 3, dtype=dtype, random_state=rng)
        layers = [nn.LoRALinear(lin, r=r, alpha=alpha, random_state=rng) for lin in (first, second)]
        return nn.Sequential(layers[0], nn.ReLU(), layers[1]), layers

    cases = []
    lr, betas, eps, r, alpha = 0.01, (0.9, 0.999), 1e-8, 2, 4.0
    for dtype in _DTYPES:
        case = _Case(
            f"mlp_lora_adam_step_{_SUFFIX[np.dtype(dtype).name]}", "mlp_lora_adam_step", dtype,
            "One training step of a LoRA-adapted MLP: layers 0 = LoRA(Linear(4, 8)), 1 = ReLU, "
            "2 = LoRA(Linear(8, 3)), no dropout; pred = model(x); loss = mse_loss(pred, target) (mean); "
            "backward; one Adam step on the LoRA factors only (the base weights and biases are frozen). "
            "Parameter tensors are named 'param.<name>' (before the step), 'grad.<name>' and "
            "'updated.<name>' (after the step), with PyTorch/PEFT names such as '0.lora_A.weight'.",
            r=r, alpha=alpha, use_rslora=False, scaling=alpha / r, lr=lr, betas=list(betas), eps=eps,
            weight_decay=0.0,
        )  # fmt: skip
        drawn, lora_layers = lora_mlp(dtype, rng)  # the parameters, drawn in the case's dtype
        for layer in lora_layers:
            layer.B.data = (0.5 * _normal(rng, layer.B.shape, dtype)).astype(dtype)  # non-zero: dA flows
        for key, p in drawn.named_parameters():
            role = "trainable (LoRA factor)" if p.trainable else "frozen"
            case.input(f"param.{key}", p.data.copy(), f"parameter {key!r}, {role}")
        x = case.input("x", _normal(rng, (6, 4), dtype), "input batch, shape (6, 4)")
        target = case.input("target", _normal(rng, (6, 3), dtype), "regression target, shape (6, 3)")
        model, _ = lora_mlp(np.float64, np.random.default_rng(0))  # the step itself runs in float64
        model.load_state_dict({k: p.data.astype(np.float64) for k, p in drawn.named_parameters()})
        pred = model(x.astype(np.float64))
        loss, dpred = F.mse_loss(pred, target.astype(np.float64))
        model.backward(dpred)
        trainable = [(k, p) for k, p in model.named_parameters() if p.trainable]
        Adam(trainable, lr=lr, betas=betas, eps=eps).step()
        case.output("pred", pred, "model output before the step, shape (6, 3)")
        case.output("loss", np.float64(loss), "0-d float64, before the step", dtype=np.float64)
        for key, p in trainable:
            case.output(f"grad.{key}", p.grad, f"gradient of the loss with respect to {key!r}")
            case.output(f"updated.{key}", p.data, f"{key!r} after one Adam step")
        cases.append(case)
    return cases


def _factorization_cases(rng: np.random.Generator) -> list[_Case]:
    from lowrank.factor.als import als
    from lowrank.factor.svd import truncated_svd

    cases = []
    for dtype in _DTYPES:
        rank = 3
        case = _Case(f"truncated_svd_{_SUFFIX[np.dtype(dtype).name]}", "truncated_svd", dtype,
                     "Rank-3 truncated SVD of a 7 x 5 matrix with well-separated singular values.", rank=rank)
        # planted spectrum 5, 4, 3, 2, 1: gaps keep the rank-3 subspace well conditioned
        U, _ = np.linalg.qr(rng.standard_normal((7, 5)))
        V, _ = np.linalg.qr(rng.standard_normal((5, 5)))
        M = case.input("M", ((U * np.arange(5.0, 0.0, -1.0)) @ V.T).astype(dtype), "the matrix, shape (7, 5)")
        svd = truncated_svd(M.astype(np.float64), rank)
        case.output("s", svd.s, "the 3 largest singular values, descending")
        case.output("reconstruction", svd.to_dense(), "U @ diag(s) @ Vt, shape (7, 5)")
        cases.append(case)

    m, n, rank, reg, sweeps = 8, 6, 2, 0.1, 5
    case = _Case("als_f64", "als", np.float64,
                 f"{sweeps} ALS sweeps on a rank-2 plus noise 8 x 6 matrix with about 70 % of entries observed.",
                 rank=rank, reg=reg, sweeps=sweeps, weighted_reg=False)
    M = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) + 0.05 * rng.standard_normal((m, n))
    mask = rng.random((m, n)) < 0.7
    mask[np.arange(m), np.arange(m) % n] = True  # every row and column observed at least once
    M = np.where(mask, M, 0.0)
    case.input("M", M, "the matrix, shape (8, 6); unobserved entries hold 0 and must not be used")
    case.input("mask", mask, "bool, shape (8, 6): true where M is observed")
    svd = truncated_svd(M * (m * n / mask.sum()), rank)  # the start that als(init="svd") takes
    case.input("right_init", np.sqrt(svd.s)[:, None] * svd.Vt, "the starting right factor, shape (r, n)")
    fit = als(M, rank, mask=mask, reg=reg, max_iter=sweeps, tol=0.0, init="svd")
    assert fit.n_iter == sweeps, fit.n_iter  # reg > 0 keeps the loss above als's noise floor
    case.output("product", fit.left @ fit.right, "left @ right after the last sweep, shape (8, 6)")
    case.output("losses", fit.losses, "the objective after each sweep, shape (sweeps,)")
    cases.append(case)
    return cases


def _variant_cases(rng: np.random.Generator) -> list[_Case]:
    """LoRA on transformers' Conv1D, on an Embedding, and loralib's MergedLinear (enable_lora True, False, True)."""
    from lowrank.nn import functional as F

    cases = []
    for dtype in _DTYPES:
        sfx = _SUFFIX[np.dtype(dtype).name]
        for spec in CONV1D_CASES:
            case = _Case(f"lora_conv1d_{spec.name}_{sfx}", "lora_conv1d", dtype,
                         "LoRA on a Conv1D (weight stored (in, out)): forward and backward; see 'lora_conv1d'.",
                         in_features=spec.in_features, out_features=spec.out_features, r=spec.r, alpha=spec.alpha,
                         use_rslora=spec.use_rslora, scaling=spec.scaling, dropout_p=spec.dropout_p,
                         fan_in_fan_out=True)  # fmt: skip
            drawn = spec.tensors(rng, dtype)
            drawn["weight"] = drawn["weight"].T.copy()  # (in, out): transformers' Conv1D layout
            docs = {**_LORA_DOCS, "weight": "frozen Conv1D weight (in, out)", "bias": "frozen bias (out,)",
                    "dropout_mask": _MASK_DOCS.get(spec.dropout, "")}  # fmt: skip
            t = widen({k: case.input(k, v, docs[k]) for k, v in drawn.items()})
            scaling, bias = spec.scaling, spec.bias
            y, cache = F.lora_linear(t["x"], t["weight"].T, t.get("bias"), t["A"], t["B"], scaling,
                                     dropout_mask=t.get("dropout_mask"))  # fmt: skip
            g = F.lora_linear_backward(t["dy"], cache, base_trainable=True)
            case.output("y", y, "output, shape (..., out_features)")
            case.output("dx", g.x, "gradient with respect to x (through both paths)")
            case.output("dA", g.A, "gradient with respect to A")
            case.output("dB", g.B, "gradient with respect to B")
            assert g.weight is not None  # base_trainable
            case.output("dweight", g.weight.T, "gradient with respect to weight, (in, out), as if trainable")
            if bias:
                case.output("dbias", g.bias, "gradient with respect to bias, as if it were trainable")
            cases.append(case)

        num, dim, r, alpha = 6, 4, 2, 4.0
        case = _Case(f"lora_embedding_r2_alpha4_{sfx}", "lora_embedding", dtype,
                     "LoRA on an Embedding (PEFT's layout), with repeated ids; see 'lora_embedding'.",
                     num_embeddings=num, embedding_dim=dim, r=r, alpha=alpha, use_rslora=False,
                     scaling=lora_scaling(alpha, r, False))  # fmt: skip
        ids = rng.integers(0, num - 1, (2, 5)).astype(np.int64)  # id num - 1 never looked up: its gradients are 0
        ids[1, 4] = ids[0, 0]  # at least one repeat, whatever the draw
        idx = case.input("idx", ids, "int64 token ids in [0, num_embeddings), shape (2, 5), with repeats")
        w = case.input("weight", _normal(rng, (num, dim), dtype), "frozen table (num_embeddings, embedding_dim)")
        A = case.input("A", _normal(rng, (r, num), dtype), "lora_embedding_A, shape (r, num_embeddings)")
        B = case.input("B", _normal(rng, (dim, r), dtype), "lora_embedding_B, shape (embedding_dim, r)")
        dy = case.input("dy", _normal(rng, (2, 5, dim), dtype), "upstream gradient, y's shape")
        t = widen({"weight": w, "A": A, "B": B, "dy": dy})
        y, ecache = F.lora_embedding(idx, t["weight"], t["A"], t["B"], case.params["scaling"])
        ge = F.lora_embedding_backward(t["dy"], ecache, base_trainable=True)
        case.output("y", y, "output, shape (*idx.shape, embedding_dim)")
        case.output("dA", ge.A, "gradient with respect to A (r, num_embeddings), repeated ids summed")
        case.output("dB", ge.B, "gradient with respect to B (embedding_dim, r)")
        case.output("dweight", ge.weight, "gradient with respect to weight, repeated ids summed, as if trainable")
        cases.append(case)

        enable, n_in, d, r, alpha = [True, False, True], 5, 2, 2, 4.0
        n_out, k = d * len(enable), sum(enable)
        for dropout in ("none", "full"):
            case = _Case(f"lora_merged_linear_qv_{'dropout' if dropout == 'full' else 'nodropout'}_{sfx}",
                         "lora_merged_linear", dtype,
                         "loralib's MergedLinear with enable_lora [True, False, True]; see 'lora_merged_linear'.",
                         in_features=n_in, out_features=n_out, r=r, alpha=alpha, use_rslora=False,
                         scaling=lora_scaling(alpha, r, False), enable_lora=enable,
                         dropout_p=0.0 if dropout == "none" else 0.5)  # fmt: skip
            x = case.input("x", _normal(rng, (2, 3, n_in), dtype), "input, shape (..., in_features)")
            w = case.input("weight", _normal(rng, (n_out, n_in), dtype), "frozen fused weight (out, in)")
            b = case.input("bias", _normal(rng, (n_out,), dtype), "frozen bias (out,)")
            A = case.input("A", _normal(rng, (k * r, n_in), dtype), "stacked A_j, shape (k * r, in), k = 2")
            B = case.input("B", _normal(rng, (k * d, r), dtype), "stacked B_j, shape (k * d, r), d = out / 3")
            mask = None
            if dropout != "none":
                mask = case.input("dropout_mask", F.dropout_mask(x.shape, 0.5, random_state=rng, dtype=dtype),
                                  _MASK_DOCS["full"])  # fmt: skip
            dy = case.input("dy", _normal(rng, (2, 3, n_out), dtype), "upstream gradient, y's shape")
            t = widen({"x": x, "w": w, "b": b, "A": A, "B": B, "dy": dy, **({} if mask is None else {"m": mask})})
            y, mcache = F.lora_merged_linear(t["x"], t["w"], t["b"], t["A"], t["B"], case.params["scaling"], enable,
                                            dropout_mask=t.get("m"))  # fmt: skip
            g = F.lora_merged_linear_backward(t["dy"], mcache, base_trainable=True)
            case.output("y", y, "output, shape (..., out_features)")
            case.output("dx", g.x, "gradient with respect to x")
            case.output("dA", g.A, "gradient with respect to A (k * r, in)")
            case.output("dB", g.B, "gradient with respect to B (k * d, r)")
            case.output("dweight", g.weight, "gradient with respect to weight (out, in), as if trainable")
            case.output("dbias", g.bias, "gradient with respect to bias, as if trainable")
            cases.append(case)
    return cases


def _attention_cases(rng: np.random.Generator) -> list[_Case]:
    """Layer norm, softmax, attention (causal, bool mask, dropout), cross-entropy with ignore_index."""
    from lowrank.nn import functional as F

    cases = []
    for dtype in _DTYPES:
        sfx = _SUFFIX[np.dtype(dtype).name]
        eps = 1e-5
        case = _Case(f"layer_norm_{sfx}", "layer_norm", dtype, "Layer norm over the last axis; see 'layer_norm'.",
                     eps=eps)  # fmt: skip
        x = case.input("x", (1.0 + 2.0 * _normal(rng, (2, 3, 6), dtype)).astype(dtype), "input, shape (..., D)")
        w = case.input("weight", (1.0 + 0.5 * _normal(rng, (6,), dtype)).astype(dtype), "scale, shape (D,)")
        b = case.input("bias", _normal(rng, (6,), dtype), "shift, shape (D,)")
        dy = case.input("dy", _normal(rng, (2, 3, 6), dtype), "upstream gradient, x's shape")
        t = widen({"x": x, "w": w, "b": b, "dy": dy})
        y, cache = F.layer_norm(t["x"], t["w"], t["b"], eps)
        g = F.layer_norm_backward(t["dy"], cache)
        case.output("y", y, "output, x's shape")
        case.output("dx", g.x, "gradient with respect to x")
        case.output("dweight", g.weight, "gradient with respect to weight, summed over the leading dimensions")
        case.output("dbias", g.bias, "gradient with respect to bias, summed over the leading dimensions")
        cases.append(case)

        case = _Case(f"softmax_{sfx}", "softmax", dtype, "Softmax over the last axis; see 'softmax'.", axis=-1)
        x = case.input("x", (2.0 * _normal(rng, (2, 3, 5), dtype)).astype(dtype), "input, shape (..., C)")
        dy = case.input("dy", _normal(rng, (2, 3, 5), dtype), "upstream gradient, x's shape")
        y, scache = F.softmax(x.astype(np.float64))
        case.output("y", y, "output, x's shape")
        case.output("dx", F.softmax_backward(dy.astype(np.float64), scache), "gradient with respect to x")
        cases.append(case)

        batch, T, d = (2,), 4, 3
        for variant in ("causal", "bool_mask", "dropout_causal"):
            causal = variant != "bool_mask"
            case = _Case(f"scaled_dot_product_attention_{variant}_{sfx}", "scaled_dot_product_attention", dtype,
                         f"Attention ({variant.replace('_', ', ')}); see 'scaled_dot_product_attention'.",
                         is_causal=causal, scale=1.0 / math.sqrt(d),
                         dropout_p=0.5 if variant.startswith("dropout") else 0.0)  # fmt: skip
            q = case.input("q", _normal(rng, (*batch, T, d), dtype), "queries, shape (batch, T, d)")
            k = case.input("k", _normal(rng, (*batch, T, d), dtype), "keys, shape (batch, S, d), S = T")
            v = case.input("v", _normal(rng, (*batch, T, d), dtype), "values, shape (batch, S, dv)")
            attn = dmask = None
            if variant == "bool_mask":
                allowed = rng.random((T, T)) < 0.6
                allowed[np.arange(T), rng.integers(0, T, T)] = True  # every query sees at least one key
                attn = case.input("attn_mask", allowed, "bool (T, S): true where query i may attend to key j")
            if variant.startswith("dropout"):
                dmask = case.input("dropout_mask", F.dropout_mask((*batch, T, T), 0.5, random_state=rng, dtype=dtype),
                                   "inverted-dropout mask on the weights (0 or 2), (batch, T, S)")  # fmt: skip
            dy = case.input("dy", _normal(rng, (*batch, T, d), dtype), "upstream gradient, y's shape")
            t = widen({"q": q, "k": k, "v": v, "dy": dy, **({} if dmask is None else {"m": dmask})})
            y, acache = F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=attn, is_causal=causal,
                                                       dropout_mask=t.get("m"), scale=case.params["scale"])  # fmt: skip
            ga = F.scaled_dot_product_attention_backward(t["dy"], acache)
            case.output("y", y, "output, shape (batch, T, dv)")
            case.output("dq", ga.q, "gradient with respect to q")
            case.output("dk", ga.k, "gradient with respect to k")
            case.output("dv", ga.v, "gradient with respect to v")
            cases.append(case)

        ignore = -100
        case = _Case(f"cross_entropy_ignore_index_{sfx}", "cross_entropy", dtype,
                     "Softmax cross-entropy whose targets equal to ignore_index are skipped; see "
                     "'cross_entropy_ignore_index'.", ignore_index=ignore)  # fmt: skip
        logits = case.input("logits", (3 * _normal(rng, (2, 4, 5), dtype)).astype(dtype), "shape (..., C), C = 5")
        target = rng.integers(0, 5, (2, 4)).astype(np.int64)
        target[0, 1] = target[1, 3] = ignore
        target = case.input("target", target, "int64 class indices or -100 (ignored), shape (...)")
        loss, grad = F.cross_entropy(logits.astype(np.float64), target, ignore_index=ignore)
        case.output("loss", np.float64(loss), "0-d float64, the mean over the kept positions", dtype=np.float64)
        case.output("dlogits", grad, "gradient with respect to logits, 0 at ignored positions")
        cases.append(case)
    return cases


_HALF_SUFFIX = {"bfloat16": "bf16", "float16": "f16"}


def _half_cases(rng: np.random.Generator, fmt: str) -> list[_Case]:
    """The linear, LoRA, DoRA and merge cases in a 16-bit format (forward only: the bounds cover the forward pass)."""
    from lowrank.nn import functional as F

    sfx = _HALF_SUFFIX[fmt]
    cases: list[_Case] = []

    def linear_case(name: str, x: np.ndarray, w: np.ndarray, b: np.ndarray | None, what: str) -> None:
        case = _HalfCase(f"linear_{name}_{sfx}", "linear", fmt, f"A linear layer's forward pass in {fmt}{what}.",
                         in_features=w.shape[1], out_features=w.shape[0])  # fmt: skip
        x = case.half_input("x", x, "input, shape (..., in_features)")
        w = case.half_input("weight", w, "weight, shape (out_features, in_features)")
        b = None if b is None else case.half_input("bias", b, "bias, shape (out_features,)")
        bound = lora_linear_bound(x, w, b, np.zeros((1, w.shape[1])), np.zeros((w.shape[0], 1)), 0.0, fmt)
        case.half_output("y", F.linear(x, w, b)[0], bound, "output, shape (..., out_features)")
        cases.append(case)

    for lin in LINEAR_CASES:
        t = lin.tensors(rng, np.float64)
        linear_case(lin.name, t["x"], t["weight"], t.get("bias"), "")
    n_in = 512  # a long positive dot product: a 16-bit running sum stalls where a float32 one does not
    linear_case("positive_k512", rng.uniform(0.5, 1.0, (4, n_in)), rng.uniform(0.5, 1.0, (3, n_in)),
                rng.uniform(0.5, 1.0, 3), ", a long dot product of positive terms")  # fmt: skip

    specs = [(spec.name, spec.tensors(rng, np.float64), spec) for spec in LORA_CASES if spec.dropout == "none"]
    drift = LORA_CASES[1]  # the update 32 * B @ A dwarfs the weight: a merge and unmerge in the format loses W
    t = drift.tensors(rng, np.float64)
    t["weight"] = 0.05 * t["weight"]
    specs.append(("r2_alpha64_large_update", t, drift))
    for name, t, spec in specs:
        scaling = 32.0 if name.endswith("large_update") else spec.scaling
        case = _HalfCase(
            f"lora_linear_{name}_{sfx}", "lora_linear", fmt,
            f"A LoRA layer's forward pass in {fmt}: y the adapted layer (unmerged), y_base the base layer alone.",
            in_features=spec.in_features, out_features=spec.out_features, r=spec.r,
            alpha=scaling * spec.r if name.endswith("large_update") else spec.alpha, use_rslora=spec.use_rslora,
            scaling=scaling, dropout_p=0.0,
        )  # fmt: skip
        x = case.half_input("x", t["x"], "input, shape (..., in_features)")
        w = case.half_input("weight", t["weight"], "frozen base weight (out, in)")
        b = None if "bias" not in t else case.half_input("bias", t["bias"], "frozen base bias (out,)")
        A = case.half_input("A", t["A"], "LoRA down-projection, shape (r, in)")
        B = case.half_input("B", t["B"], "LoRA up-projection, shape (out, r)")
        y, _ = F.lora_linear(x, w, b, A, B, scaling)
        case.half_output("y", y, lora_linear_bound(x, w, b, A, B, scaling, fmt), "output of the adapted layer")
        zeros_A, zeros_B = np.zeros((1, w.shape[1])), np.zeros((w.shape[0], 1))
        case.half_output("y_base", F.linear(x, w, b)[0], lora_linear_bound(x, w, b, zeros_A, zeros_B, 0.0, fmt),
                         "output of the base layer alone (the adapter disabled)")  # fmt: skip
        cases.append(case)

    for spec in DORA_CASES:
        if spec.dropout != "none":
            continue
        t = spec.tensors(rng, np.float64)
        case = _HalfCase(
            f"dora_linear_{spec.name}_{sfx}", "dora_linear", fmt,
            f"A DoRA layer's forward pass in {fmt} (eval, no dropout), as PEFT computes it; see the 'dora' convention.",
            in_features=spec.in_features, out_features=spec.out_features, r=spec.r, alpha=spec.alpha,
            use_rslora=spec.use_rslora, scaling=spec.scaling, dropout_p=0.0,
        )  # fmt: skip
        x = case.half_input("x", t["x"], "input, shape (..., in_features)")
        w = case.half_input("weight", t["weight"], "frozen base weight (out, in)")
        b = None if "bias" not in t else case.half_input("bias", t["bias"], "frozen base bias (out,)")
        A = case.half_input("A", t["A"], "LoRA down-projection, shape (r, in)")
        B = case.half_input("B", t["B"], "LoRA up-projection, shape (out, r)")
        m = case.half_input("magnitude", t["magnitude"], "DoRA magnitude m, shape (out,)")
        y, _ = F.dora_linear(x, w, b, A, B, m, spec.scaling)
        case.half_output("y", y, dora_linear_bound(x, w, b, A, B, m, spec.scaling, fmt), "output, (..., out)")
        cases.append(case)

    r, alpha, n_in, n_out = 3, 6.0, 6, 5
    case = _HalfCase(f"lora_merge_{sfx}", "lora_merge", fmt,
                     f"Merging a LoRA update into its base weight in {fmt}.",
                     r=r, alpha=alpha, use_rslora=False, scaling=alpha / r)  # fmt: skip
    w = case.half_input("weight", rng.standard_normal((n_out, n_in)), "base weight (out, in)")
    A = case.half_input("A", rng.standard_normal((r, n_in)), "shape (r, in)")
    B = case.half_input("B", rng.standard_normal((n_out, r)), "shape (out, r)")
    merged = w + (alpha / r) * (B @ A)  # (out, in), float64
    case.half_output("merged_weight", merged, lora_merge_bound(w, A, B, alpha / r, fmt),
                     "weight + scaling * B @ A, shape (out, in)")  # fmt: skip
    cases.append(case)
    return cases


def _build_cases(random_state: RandomState, dtypes: tuple[str, ...] = ()) -> list[_Case]:
    rng = check_random_state(random_state)
    cases: list[_Case] = []
    for build in (_linear_cases, _lora_cases, _merge_cases, _activation_cases, _loss_cases,
                  _training_cases, _factorization_cases, _dora_cases, _dora_merge_cases,
                  _variant_cases, _attention_cases):  # fmt: skip
        cases.extend(build(rng))
    for fmt in dtypes:  # after every float case: the float cases' bytes do not depend on dtypes
        cases.extend(_half_cases(rng, fmt))
    return cases


def _check_dtypes(dtypes: str | Iterable[str] | None) -> tuple[str, ...]:
    """``dtypes`` as a tuple of 16-bit format names (a string is comma-separated, as on the command line)."""
    if dtypes is None:
        return ()
    names = dtypes.split(",") if isinstance(dtypes, str) else list(dtypes)
    if not all(isinstance(d, str) for d in names):
        raise TypeError(f"dtypes must be a comma-separated string or strings, got {names!r}")
    names = [d.strip() for d in names if d.strip()]
    bad = [d for d in names if d not in HALF_DTYPES]
    if bad:
        raise ValueError(f"dtypes must name formats among {', '.join(HALF_DTYPES)}, got {', '.join(map(repr, bad))}")
    return tuple(dict.fromkeys(names))


def write_vectors(
    directory: PathLike, *, random_state: RandomState = 0, dtypes: str | Iterable[str] | None = None
) -> list[str]:
    """Write the reference cases and their manifest into ``directory``, as one unit.

    The same ``random_state`` (default 0) gives byte-identical files. The
    folder is written with :func:`lowrank.io.files.atomic_write_folder`: a
    crash or an error leaves the previous folder (or none), never case files
    of one run beside the manifest of another.

    Parameters
    ----------
    directory : str or os.PathLike
        Created if missing; its parent must exist. Existing case files of the
        same names are replaced; other files in it are kept.
    random_state : None, int or numpy.random.Generator, default 0
    dtypes : str or iterable of str, optional
        Also write the linear, LoRA and merge cases in these 16-bit formats
        (``"bfloat16,float16"``; see the manifest's ``half_precision``
        convention). The float32/float64 cases are the same bytes either way.

    Returns
    -------
    list of str
        The case names, in manifest order.
    """
    formats = _check_dtypes(dtypes)
    check_writable(directory, "directory", folder=True)
    cases = _build_cases(random_state, formats)  # all the maths before anything touches the disk
    entries: list[dict[str, Any]] = []

    def write(folder: Path) -> None:
        for case in cases:
            path = save_safetensors(folder / f"{case.name}.safetensors", {**case.inputs, **case.outputs, **case.extra},
                                    metadata={_FORMAT: case.name},  # one key: the header's order is then fixed
                                    dtypes=case.file_dtypes or None)  # fmt: skip
            entries.append(case.manifest_entry(hashlib.sha256(path.read_bytes()).hexdigest()))
        save_json(folder / MANIFEST_NAME, {
            "format": _FORMAT,
            "version": _VERSION,
            "conventions": CONVENTIONS,
            "tolerances": TOLERANCES,
            "cases": entries,
        })  # fmt: skip

    atomic_write_folder(directory, write)
    return [e["name"] for e in entries]


# ---------------------------------------------------------------- checking


class CheckRow(NamedTuple):
    """One compared tensor: ``max_abs``/``max_rel`` are NaN when nothing could be compared."""

    case: str
    tensor: str
    max_abs: float
    max_rel: float
    ok: bool
    note: str


class CheckReport(NamedTuple):
    """The result of :func:`check_vectors`: one row per selected case and output tensor.

    Attributes
    ----------
    rows : list of CheckRow
    selected : tuple of str
        The names of the cases compared, in manifest order.
    skipped : tuple of str
        The names of the reference's cases left out by ``kinds`` or ``cases``.
    kinds : tuple of str or None
        The selection asked for (None: every kind).
    cases : str or None
        The glob pattern asked for (None: every case).
    """

    rows: list[CheckRow]
    selected: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    kinds: tuple[str, ...] | None = None
    cases: str | None = None

    @property
    def passed(self) -> bool:
        """True when every row passed (and there is at least one)."""
        return bool(self.rows) and all(row.ok for row in self.rows)

    @property
    def failures(self) -> list[CheckRow]:
        """The rows that did not pass."""
        return [row for row in self.rows if not row.ok]

    def summary(self) -> str:
        """One line: the verdict, the tensors that match, the cases selected and skipped."""
        n_rows, n_fail = len(self.rows), len(self.failures)
        verdict = "PASSED" if self.passed else "FAILED"
        line = f"{verdict}: {n_rows - n_fail} of {n_rows} tensors match"
        return line + f" in {len(self.selected)} selected cases ({len(self.skipped)} skipped)"

    def format(self) -> str:
        """A plain-text table, one line per row, and the :meth:`summary` line."""
        header = ("case", "tensor", "max_abs", "max_rel", "result")
        lines = [header]
        for row in self.rows:
            result = "ok" if row.ok else "FAIL" + (f" ({row.note})" if row.note else "")
            if row.ok and row.note:
                result += f" ({row.note})"
            lines.append((row.case, row.tensor, f"{row.max_abs:.3g}", f"{row.max_rel:.3g}", result))
        widths = [max(len(line[i]) for line in lines) for i in range(4)]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line[:4], widths, strict=True)) + "  " + line[4]
                for line in lines]
        text.append(self.summary())
        return "\n".join(text)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (NaN errors become None), for ``lowrank vectors check --json``.

        Returns
        -------
        dict
            ``passed``, ``summary``, ``selection`` (``kinds``, ``cases``),
            ``selected`` and ``skipped`` (case names), ``n_tensors``,
            ``n_failed`` and ``rows``: one object per tensor with ``case``,
            ``tensor``, ``max_abs``, ``max_rel``, ``ok`` and ``note``.
        """

        def number(v: float) -> float | None:
            return None if np.isnan(v) else float(v)

        return {
            "passed": self.passed,
            "summary": self.summary(),
            "selection": {"kinds": None if self.kinds is None else list(self.kinds), "cases": self.cases},
            "selected": list(self.selected),
            "skipped": list(self.skipped),
            "n_tensors": len(self.rows),
            "n_failed": len(self.failures),
            "rows": [{"case": r.case, "tensor": r.tensor, "max_abs": number(r.max_abs),
                      "max_rel": number(r.max_rel), "ok": r.ok, "note": r.note} for r in self.rows],
        }  # fmt: skip


def _manifest_error(path: Path, rule: str) -> ValueError:
    return ValueError(f"{path} is not a lowrank vectors manifest: {rule}")


def _is_tolerance(value: Any) -> bool:
    """A JSON number (not a bool, which Python counts as an int), finite and >= 0."""
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def read_manifest(directory: PathLike) -> dict[str, Any]:
    """Read and validate ``directory/manifest.json``.

    Every case must have a name, a plain file name, a kind, outputs, and
    ``rtol`` and ``atol`` that are real numbers, finite and >= 0 (JSON
    ``true`` is not a number here); so must every entry of the top-level
    ``tolerances`` table.

    Raises
    ------
    ValueError
        A missing, corrupt or truncated manifest, one of another format, or
        one breaking a rule above, in one line naming the case and the field.
    """
    folder = Path(directory)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ValueError(f"no such vectors folder: {folder}")
    try:
        manifest = load_json(path)
    except FileNotFoundError:
        raise ValueError(f"{folder} holds no {MANIFEST_NAME}: write one with `lowrank vectors write`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise _manifest_error(path, f"its 'format' must be {_FORMAT!r}")
    if manifest.get("version") != _VERSION:
        raise _manifest_error(path, f"version {manifest.get('version')!r} is not the supported {_VERSION}")
    cases = manifest.get("cases")
    if not isinstance(cases, list) or not cases:
        raise _manifest_error(path, "'cases' must be a non-empty list")
    for i, case in enumerate(cases):
        ok = (isinstance(case, dict) and isinstance(case.get("name"), str) and isinstance(case.get("file"), str)
              and isinstance(case.get("kind"), str) and isinstance(case.get("outputs"), dict) and case["outputs"]
              and all(k in case for k in ("rtol", "atol"))
              and Path(case["file"]).name == case["file"])  # fmt: skip
        if not ok:
            raise _manifest_error(path, f"case {i} lacks a name, a plain file name, a kind, outputs, rtol or atol")
        for field in ("rtol", "atol"):
            if not _is_tolerance(case[field]):
                raise _manifest_error(path, f"case {i} ({case['name']!r}): {field!r} must be a real number, "
                                            f"finite and >= 0, got {case[field]!r}")  # fmt: skip
        elementwise = case.get("elementwise_tolerance", {})
        ok = (isinstance(elementwise, dict) and all(isinstance(v, str) and k in case["outputs"]
                                                     for k, v in elementwise.items())
              and (not elementwise or case.get("dtype") in HALF_DTYPES))  # fmt: skip
        if not ok:
            raise _manifest_error(path, f"case {i} ({case['name']!r}): 'elementwise_tolerance' must map outputs "
                                        f"to tensor names, in a case of dtype {' or '.join(HALF_DTYPES)}")  # fmt: skip
    table = manifest.get("tolerances", {})
    if not isinstance(table, dict):
        raise _manifest_error(path, f"'tolerances' must be an object, got {table!r}")
    for dtype, row in table.items():
        for field, value in (row.items() if isinstance(row, dict) else [("row", row)]):
            if not _is_tolerance(value):
                raise _manifest_error(path, f"'tolerances' {dtype!r} {field!r} must be a real number, "
                                            f"finite and >= 0, got {value!r}")  # fmt: skip
    return manifest


def _kinds_list(kinds: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """``kinds`` as a tuple of names: a string is a comma-separated list, as on the command line."""
    if kinds is None:
        return None
    if isinstance(kinds, str):
        kinds = kinds.split(",")
    names = tuple(kinds)
    if not all(isinstance(k, str) for k in names):
        raise TypeError(f"kinds must be a comma-separated string or strings, got {names!r}")
    names = tuple(k.strip() for k in names)
    if not names or not all(names):
        raise ValueError(f"kinds must name at least one kind and no empty one, got {','.join(names)!r}")
    return names


def select_cases(
    manifest: dict[str, Any], *, kinds: str | Iterable[str] | None = None, cases: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a manifest's cases into those selected by ``kinds`` and ``cases`` and the others.

    Parameters
    ----------
    manifest : dict
        As :func:`read_manifest` returns it.
    kinds : str or iterable of str, optional
        Keep the cases of these kinds (``"linear,lora_linear"`` or
        ``["linear", "lora_linear"]``); every kind named must occur in the manifest.
    cases : str, optional
        Keep the cases whose name matches this shell-style glob
        (:func:`fnmatch.fnmatchcase`: ``*``, ``?``, ``[seq]``; case-sensitive),
        e.g. ``"lora_linear_*_f32"``.

    Returns
    -------
    selected, skipped : list of dict
        Manifest entries, in manifest order.

    Raises
    ------
    ValueError
        A kind the manifest does not hold (the message lists those it
        holds), or a selection that leaves no case.
    TypeError
        ``cases`` not a string, or ``kinds`` holding something other than strings.
    """
    wanted = _kinds_list(kinds)
    if cases is not None and not isinstance(cases, str):
        raise TypeError(f"cases must be a glob pattern string, got {type(cases).__name__} {cases!r}")
    present = list(dict.fromkeys(c["kind"] for c in manifest["cases"]))
    if wanted is not None:
        unknown = [k for k in wanted if k not in present]
        if unknown:
            raise ValueError(f"kinds: no case of kind {', '.join(map(repr, unknown))} in the reference; "
                             f"its kinds are {', '.join(present)}")  # fmt: skip
    selected: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for case in manifest["cases"]:
        keep = (wanted is None or case["kind"] in wanted) and (cases is None or fnmatchcase(case["name"], cases))
        (selected if keep else skipped).append(case)
    if not selected:
        raise ValueError(f"no case of the reference matches the selection (kinds {','.join(wanted or ['*'])}, "
                         f"cases {cases or '*'!r})")  # fmt: skip
    return selected, skipped


def _compare(case: str, tensor: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> CheckRow:
    c = compare(got, want, rtol=rtol, atol=atol)
    return CheckRow(case, tensor, c.max_abs, c.max_rel, c.ok, c.note)


def check_vectors(
    ref_dir: PathLike,
    candidate_dir: PathLike,
    *,
    kinds: str | Iterable[str] | None = None,
    cases: str | None = None,
) -> CheckReport:
    """Compare a candidate's outputs with the reference, per selected case and output tensor.

    For each selected case of ``ref_dir/manifest.json`` the candidate file
    ``candidate_dir/<case>.safetensors`` must hold every output tensor of
    the case under its name, of the expected shape and dtype, within the
    case's ``rtol``/``atol`` under :func:`lowrank.reference.compare.compare`'s
    rule (``|got - want| <= atol * max|want| + rtol * |want|`` elementwise).
    A missing file or tensor, another dtype, a complex or non-numeric
    tensor, a wrong shape or a NaN is a failed row with the reason in its
    note; extra tensors are ignored. Cases left out by ``kinds`` and
    ``cases`` are not read at all (their files need not exist on either
    side) and are listed in the report's ``skipped``.

    Parameters
    ----------
    ref_dir : str or os.PathLike
        A folder written by :func:`write_vectors`.
    candidate_dir : str or os.PathLike
    kinds : str or iterable of str, optional
        Check only the cases of these kinds, for a candidate that implements
        only some: ``"linear,lora_linear"``. See :func:`select_cases`.
    cases : str, optional
        Check only the cases whose name matches this shell-style glob
        (``fnmatch``, case-sensitive), e.g. ``"*_f32"``.

    Returns
    -------
    CheckReport
        ``.passed``, ``.rows`` of ``(case, tensor, max_abs, max_rel, ok, note)``,
        ``.selected``, ``.skipped``, ``.format()``, ``.to_dict()``.

    Raises
    ------
    ValueError
        In one line: a missing folder, a missing, corrupt or truncated
        manifest (or one whose tolerances are not real numbers) or reference
        file (each selected reference file's sha256 is checked against the
        manifest), a corrupt or truncated candidate file, a kind the
        reference does not hold, or a selection that leaves no case.
    TypeError
        ``kinds`` or ``cases`` of the wrong type.
    """
    ref, cand = Path(ref_dir), Path(candidate_dir)
    manifest = read_manifest(ref)
    selected, skipped = select_cases(manifest, kinds=kinds, cases=cases)
    if not cand.is_dir():
        raise ValueError(f"no such candidate folder: {cand}")
    rows: list[CheckRow] = []
    nan = float("nan")
    for case in selected:
        name, file = case["name"], case["file"]
        ref_path = ref / file
        if not ref_path.is_file():
            raise ValueError(f"reference file {ref_path} is missing (named in {ref / MANIFEST_NAME})")
        blob = ref_path.read_bytes()
        if "sha256" in case and hashlib.sha256(blob).hexdigest() != case["sha256"]:
            raise ValueError(f"reference file {ref_path} does not match its sha256 in {MANIFEST_NAME}: "
                             f"it is corrupt, truncated or edited; write the vectors again")
        want_all = load_safetensors(ref_path)
        cand_path = cand / file
        if not cand_path.is_file():
            rows.append(CheckRow(name, "*", nan, nan, False, f"missing file {file}"))
            continue
        got_all = load_safetensors(cand_path)
        elementwise = case.get("elementwise_tolerance", {})
        for tensor in case["outputs"]:
            if tensor not in want_all or elementwise.get(tensor, tensor) not in want_all:
                raise ValueError(f"reference file {ref_path} lacks its output {tensor!r} or its tolerance")
            if tensor not in got_all:
                rows.append(CheckRow(name, tensor, nan, nan, False, "missing tensor"))
                continue
            if tensor in elementwise:  # a 16-bit case: each element against its own bound
                c = compare_within(got_all[tensor], want_all[tensor], want_all[elementwise[tensor]], case["dtype"])
                rows.append(CheckRow(name, tensor, c.max_abs, c.max_rel, c.ok, c.note))
                continue
            rows.append(_compare(name, tensor, got_all[tensor], want_all[tensor], case["rtol"], case["atol"]))
    return CheckReport(
        rows,
        selected=tuple(c["name"] for c in selected),
        skipped=tuple(c["name"] for c in skipped),
        kinds=_kinds_list(kinds),
        cases=cases,
    )
