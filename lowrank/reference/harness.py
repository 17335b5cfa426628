"""A harness that checks another Python implementation of a LoRA layer against this one.

::

    from lowrank.reference.harness import assert_lora_linear_matches
    assert_lora_linear_matches(my_forward, my_backward)

drives the candidate through generated cases (hypothesis, drawn by
:func:`lowrank.reference.cases.lora_case_strategy`: shapes with 0 to 2
leading batch dimensions, ranks 1 to 4, plain and rsLoRA scaling, with and
without bias, no dropout, a full dropout mask or one shared by the batch),
then through every case of the reference catalogue
(:data:`lowrank.reference.cases.LORA_CASES`, the cases ``lowrank vectors
write`` emits), and compares every output and gradient with
:func:`lowrank.nn.functional.lora_linear` and its backward under the rule of
:mod:`lowrank.reference.compare`. The reference values are computed in
float64 from the case's inputs and rounded once to its dtype, as in the
reference vectors, so a float32 candidate is measured against the correctly
rounded result, not against another float32 evaluation order. The rule is
strict: every output must have the case's shape and dtype (a float64 result
in a float32 run fails, and so do complex, string and object arrays and
anything NumPy cannot turn into an array), and the message says which rule
each tensor broke. On a mismatch hypothesis shrinks the case,
and the AssertionError describes the smallest failing case it found, with
each tensor's error. Needs the ``test`` extra (hypothesis): ``pip install 'lowrank[test]'``.

The candidate's convention is the reference's (``docs/lora.md``)::

    y, cache = forward_fn(x, weight, bias, A, B, scaling, dropout_mask=None)
    grads = backward_fn(dy, cache, base_trainable=True)

``x (..., in)``, ``weight (out, in)``, ``bias (out,)`` or None, ``A (r, in)``,
``B (out, r)``, ``scaling`` a float, ``dropout_mask`` None or an array
broadcastable to ``x`` (0 or ``1/(1-p)``) applied to the LoRA path's input
only. ``grads`` has attributes (or mapping keys) ``x``, ``A``, ``B``,
``weight``, ``bias``. Anything array-like of the case's dtype is accepted
(``np.asarray`` is applied; torch tensors are detached first); wrap
a framework that needs conversions in two small functions (see
``docs/verifying.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lowrank.reference.cases import LORA_CASES, LoRACase, lora_case_strategy
from lowrank.reference.compare import compare, tolerance_for
from lowrank.utils.validation import check_float_dtype, check_int, check_real

__all__ = ["assert_lora_linear_matches"]

_TEST_EXTRA = "pip install 'lowrank[test]'"


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
    try:
        array = _as_numpy(got)
    except Exception as exc:  # a ragged list, an object refusing conversion: the candidate's failure
        return False, f"  {name:<7} not an array ({type(got).__name__}: {type(exc).__name__}: {exc})"
    c = compare(array, want, rtol=rtol, atol=atol)
    if np.isnan(c.max_abs) and c.note:
        return False, f"  {name:<7} {c.note}"
    worst = "" if c.worst_index is None else f", worst at index {c.worst_index}"
    note = f" ({c.note})" if c.note else ""
    return c.ok, (f"  {name:<7} max_abs {c.max_abs:.3g}  max_rel {c.max_rel:.3g}  "
                  f"{'ok' if c.ok else 'MISMATCH'}{worst}{note}")  # fmt: skip


def _reference(
    t: dict[str, np.ndarray], scaling: float, check_base: bool, dtype: np.dtype
) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
    """``y`` and the gradients, computed in float64 from the case's tensors and rounded once to ``dtype``."""
    from lowrank.nn import functional as F
    from lowrank.reference.vectors import widen

    w = widen(t)
    y, cache = F.lora_linear(w["x"], w["weight"], w.get("bias"), w["A"], w["B"], scaling,
                             dropout_mask=w.get("dropout_mask"))  # fmt: skip
    g = F.lora_linear_backward(w["dy"], cache, base_trainable=check_base)
    grads = {"x": g.x, "A": g.A, "B": g.B, "weight": g.weight, "bias": g.bias}
    return y.astype(dtype), {k: None if v is None else v.astype(dtype) for k, v in grads.items()}


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
        The dtype of every generated array, and the dtype every output must
        have. The expected values are computed in float64 and rounded once
        to it.
    max_examples : int, default 50
        How many cases hypothesis generates (before shrinking a failure).
    rtol, atol : float, optional
        Elementwise test ``|got - want| <= atol * max|want| + rtol * |want|``
        (:func:`lowrank.reference.compare.compare`); defaults from
        :data:`lowrank.reference.compare.TOLERANCES`: 1e-9 and 1e-12 for
        float64, 1e-4 and 1e-5 for float32.
    check_base : bool, default True
        Also compare the gradients of ``weight`` and ``bias``.

    Raises
    ------
    AssertionError
        On the smallest failing case hypothesis finds (or the first failing
        catalogue case): the case (shapes, scaling, mask, seed) and every
        tensor's max abs and rel error, or the rule it broke (shape, dtype,
        complex or non-numeric values, not an array). A candidate that raises
        is reported the same way.
    ImportError
        Without hypothesis (the ``test`` extra).

    Examples
    --------
    >>> from lowrank.nn import functional as F
    >>> assert_lora_linear_matches(F.lora_linear, F.lora_linear_backward, max_examples=5)
    """
    try:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import strategies as st
    except ImportError:
        raise ImportError(f"assert_lora_linear_matches needs hypothesis: {_TEST_EXTRA}") from None

    dtype = check_float_dtype(dtype)
    max_examples = check_int(max_examples, "max_examples", low=1)
    default_rtol, default_atol = tolerance_for(dtype)
    rtol = default_rtol if rtol is None else check_real(rtol, "rtol", 0.0)
    atol = default_atol if atol is None else check_real(atol, "atol", 0.0)
    if not isinstance(check_base, bool):
        raise TypeError(f"check_base must be True or False, got {type(check_base).__name__} {check_base!r}")

    def copy(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a.copy()  # the candidate may write into its inputs

    def check_case(spec: LoRACase, seed: int) -> None:
        t = spec.tensors(np.random.default_rng(seed), dtype)
        where = f"{spec.describe()}, dtype {dtype}, seed {seed}"
        found = "smallest failing case found" if spec.name == "drawn" else f"failing catalogue case {spec.name!r}"
        args = (t["x"], t["weight"], t.get("bias"), t["A"], t["B"], spec.scaling)
        mask = t.get("dropout_mask")
        y, ref = _reference(t, spec.scaling, check_base, dtype)
        try:
            got_y, got_cache = forward_fn(
                *(copy(a) if isinstance(a, np.ndarray) else a for a in args), dropout_mask=copy(mask)
            )
            got = backward_fn(t["dy"].copy(), got_cache, base_trainable=check_base)
        except Exception as exc:
            raise AssertionError(f"the candidate raised {type(exc).__name__}: {exc}\non the case: {where}") from exc
        names = ["y", "dx", "dA", "dB"] + (["dweight"] if check_base else [])
        pairs: list[tuple[Any, Any]] = [(got_y, y), (_grad(got, "x"), ref["x"])]
        pairs += [(_grad(got, "A"), ref["A"]), (_grad(got, "B"), ref["B"])]
        if check_base:
            pairs.append((_grad(got, "weight"), ref["weight"]))
            if spec.bias:
                names.append("dbias")
                pairs.append((_grad(got, "bias"), ref["bias"]))
        results = [_errors(n, g, w, rtol, atol) for n, (g, w) in zip(names, pairs, strict=True)]
        if not all(ok for ok, _ in results):
            bad = ", ".join(n for n, (ok, _) in zip(names, results, strict=True) if not ok)
            raise AssertionError(
                f"the candidate LoRA layer disagrees with lowrank on {bad} "
                f"(rtol {rtol:g}, atol {atol:g} x max|expected|)\n"
                f"{found}: {where}\n" + "\n".join(line for _, line in results)
            )

    # Phase.explain is left out: it traces every line of a failing case, 3.3 s of a 5.2 s
    # failing run (profiled on a candidate that forgets the bias), for a note naming no tensor.
    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    # Shapes are drawn and shrink; the values come from a seeded Generator, standard normal.
    # Drawn floats would let hypothesis hunt for inputs (huge, tiny, cancelling) on which any
    # float tolerance fails a correct candidate, and the report would blame the candidate.
    @given(st.tuples(lora_case_strategy(), st.integers(0, 2**16)))
    def check(drawn: tuple[LoRACase, int]) -> None:
        check_case(*drawn)

    check()
    for spec in LORA_CASES:  # after the drawn cases, so a failure there is reported shrunk
        check_case(spec, 0)
