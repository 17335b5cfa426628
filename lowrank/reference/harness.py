"""A harness that checks another Python implementation of a LoRA layer against this one.

::

    from lowrank.reference.harness import assert_lora_linear_matches
    assert_lora_linear_matches(my_forward, my_backward)

drives the candidate through generated cases (hypothesis: shapes with 0 to 2
leading batch dimensions, ranks 1 to 4, plain and rsLoRA scaling, with and
without bias, no dropout, a full dropout mask or one shared by the batch) and
compares every output and gradient with :func:`lowrank.nn.functional.lora_linear`
and its backward. On a mismatch hypothesis shrinks the case, and the
AssertionError describes the smallest failing case it found, with each
tensor's error. Needs the ``test`` extra (hypothesis): ``pip install 'lowrank[test]'``.

The candidate's convention is the reference's (``docs/lora.md``)::

    y, cache = forward_fn(x, weight, bias, A, B, scaling, dropout_mask=None)
    grads = backward_fn(dy, cache, base_trainable=True)

``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` or None, ``A (r, in)``,
``B (out, r)``, ``scaling`` a float, ``dropout_mask`` None or an array
broadcastable to ``x`` (0 or ``1/(1-p)``) applied to the LoRA path's input
only. ``grads`` has attributes (or mapping keys) ``x``, ``A``, ``B``,
``weight``, ``bias``. Anything array-like is accepted (``np.asarray`` is
applied), so a torch candidate can return tensors after ``.detach()``; wrap
a framework that needs conversions in two small functions (see
``docs/verifying.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lowrank.reference.vectors import error_stats
from lowrank.utils.validation import check_float_dtype, check_int, check_real

__all__ = ["assert_lora_linear_matches"]

_TEST_EXTRA = "pip install 'lowrank[test]'"

# |got - want| <= atol * max|want| + rtol * |want|: atol is relative to the tensor's scale,
# so cancellation inside a sum of large terms is not mistaken for an error.
_DEFAULT_TOLERANCE = {np.dtype(np.float32): (1e-4, 1e-5), np.dtype(np.float64): (1e-9, 1e-12)}


def _grad(grads: Any, name: str) -> Any:
    if isinstance(grads, Mapping):
        return grads.get(name)
    return getattr(grads, name, None)


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _errors(name: str, got: Any, want: np.ndarray, rtol: float, atol: float) -> tuple[bool, str]:
    """Whether ``got`` matches ``want``, and a line describing the comparison."""
    if got is None:
        return False, f"  {name:<7} missing (the candidate returned None)"
    got = _as_numpy(got)
    if got.shape != want.shape:
        return False, f"  {name:<7} shape {got.shape}, expected {want.shape}"
    diff, max_abs, max_rel = error_stats(got, want)
    w = np.abs(want.astype(np.float64))
    scale = float(w.max()) if w.size else 0.0
    ok = bool(np.isfinite(got).all()) and bool(np.all(diff <= atol * scale + rtol * w))
    worst = ""
    if not ok and diff.size:
        index = tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape))
        worst = f", worst at index {index}"
    return ok, (f"  {name:<7} max_abs {max_abs:.3g}  max_rel {max_rel:.3g}  "
                f"{'ok' if ok else 'MISMATCH'}{worst}")  # fmt: skip


def _describe(case: dict[str, Any]) -> str:
    mask = case["dropout_mask"]
    return (
        f"x {case['x'].shape}, weight {case['weight'].shape}, "
        f"bias {'None' if case['bias'] is None else case['bias'].shape}, A {case['A'].shape}, "
        f"B {case['B'].shape}, scaling {case['scaling']!r} ({case['how']}), "
        f"dropout_mask {'None' if mask is None else mask.shape}, dtype {case['x'].dtype}, seed {case['seed']}"
    )


def assert_lora_linear_matches(
    forward_fn: Callable[..., Any],
    backward_fn: Callable[..., Any],
    *,
    dtype: Any = np.float64,
    max_examples: int = 50,
    rtol: float | None = None,
    atol: float | None = None,
    check_base: bool = True,
) -> None:
    """Assert that a candidate LoRA layer agrees with :func:`lowrank.nn.functional.lora_linear`.

    Parameters
    ----------
    forward_fn : callable
        ``forward_fn(x, weight, bias, A, B, scaling, dropout_mask=None) -> (y, cache)``.
    backward_fn : callable
        ``backward_fn(dy, cache, base_trainable=check_base) -> grads`` with
        ``grads.x``, ``.A``, ``.B`` (and ``.weight``, ``.bias`` when
        ``check_base``), as attributes or mapping keys.
    dtype : float32 or float64, default float64
        The dtype of every generated array.
    max_examples : int, default 50
        How many cases hypothesis generates (before shrinking a failure).
    rtol, atol : float, optional
        Elementwise test ``|got - want| <= atol * max|want| + rtol * |want|``;
        defaults 1e-9 and 1e-12 for float64, 1e-4 and 1e-5 for float32.
    check_base : bool, default True
        Also compare the gradients of ``weight`` and ``bias``.

    Raises
    ------
    AssertionError
        On the smallest failing case hypothesis finds: the case (shapes,
        scaling, mask, seed) and every tensor's max abs and rel error. A
        candidate that raises is reported the same way.
    ImportError
        Without hypothesis (the ``test`` extra).

    Examples
    --------
    >>> from lowrank.nn import functional as F
    >>> assert_lora_linear_matches(F.lora_linear, F.lora_linear_backward, max_examples=5)
    """
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st
    except ImportError:
        raise ImportError(f"assert_lora_linear_matches needs hypothesis: {_TEST_EXTRA}") from None
    from lowrank.nn import functional as F

    dtype = check_float_dtype(dtype)
    max_examples = check_int(max_examples, "max_examples", low=1)
    default_rtol, default_atol = _DEFAULT_TOLERANCE[dtype]
    rtol = default_rtol if rtol is None else check_real(rtol, "rtol", 0.0)
    atol = default_atol if atol is None else check_real(atol, "atol", 0.0)
    if not isinstance(check_base, bool):
        raise TypeError(f"check_base must be True or False, got {type(check_base).__name__} {check_base!r}")

    @st.composite
    def cases(draw: Any) -> dict[str, Any]:
        batch = tuple(draw(st.lists(st.integers(1, 4), max_size=2)))
        n_in, n_out, r = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
        alpha = draw(st.sampled_from([1.0, 2.0, 0.5, 4.0]))
        rslora = draw(st.booleans())
        bias = draw(st.booleans())
        dropout = draw(st.sampled_from(["none", "full", "shared"]))
        seed = draw(st.integers(0, 2**16))
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((*batch, n_in)).astype(dtype)
        mask = None
        if dropout != "none":
            keep = rng.random(x.shape if dropout == "full" else (n_in,)) >= 0.5
            mask = (keep / 0.5).astype(dtype)
        return {
            "x": x,
            "weight": rng.standard_normal((n_out, n_in)).astype(dtype),
            "bias": rng.standard_normal(n_out).astype(dtype) if bias else None,
            "A": rng.standard_normal((r, n_in)).astype(dtype),
            "B": rng.standard_normal((n_out, r)).astype(dtype),
            "scaling": alpha / math.sqrt(r) if rslora else alpha / r,
            "how": f"alpha {alpha:g}, r {r}, {'rsLoRA alpha/sqrt(r)' if rslora else 'alpha/r'}",
            "dropout_mask": mask,
            "dy": rng.standard_normal((*batch, n_out)).astype(dtype),
            "seed": seed,
        }

    def copy(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a.copy()  # the candidate may write into its inputs

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)  # fmt: skip
    @given(cases())
    def check(case: dict[str, Any]) -> None:
        args = (case["x"], case["weight"], case["bias"], case["A"], case["B"], case["scaling"])
        y, cache = F.lora_linear(*args, dropout_mask=case["dropout_mask"])
        ref = F.lora_linear_backward(case["dy"], cache, base_trainable=check_base)
        try:
            got_y, got_cache = forward_fn(*(copy(a) if isinstance(a, np.ndarray) else a for a in args),
                                          dropout_mask=copy(case["dropout_mask"]))
            got = backward_fn(case["dy"].copy(), got_cache, base_trainable=check_base)
        except Exception as exc:
            raise AssertionError(
                f"the candidate raised {type(exc).__name__}: {exc}\non the case: {_describe(case)}"
            ) from exc
        names = ["y", "dx", "dA", "dB"] + (["dweight"] if check_base else [])
        pairs = [(got_y, y), (_grad(got, "x"), ref.x), (_grad(got, "A"), ref.A), (_grad(got, "B"), ref.B)]
        if check_base:
            pairs.append((_grad(got, "weight"), ref.weight))
            if case["bias"] is not None:
                names.append("dbias")
                pairs.append((_grad(got, "bias"), ref.bias))
        results = [_errors(n, g, w, rtol, atol) for n, (g, w) in zip(names, pairs, strict=True)]
        if not all(ok for ok, _ in results):
            bad = ", ".join(n for n, (ok, _) in zip(names, results, strict=True) if not ok)
            raise AssertionError(
                f"the candidate LoRA layer disagrees with lowrank on {bad} "
                f"(rtol {rtol:g}, atol {atol:g} x max|expected|)\n"
                f"smallest failing case found: {_describe(case)}\n" + "\n".join(line for _, line in results)
            )

    check()
