"""``lowrank verify svd|als|implicit-als M FACTORS``: certify factors computed elsewhere (exit 0, 1, 2).

``M`` is a ``.npy`` file, an ``.npz`` file holding one array (or the member
``M``), or a scipy.sparse matrix written by ``scipy.sparse.save_npz``.
``FACTORS`` is an ``.npz`` file (``numpy.savez``) holding ``U``, ``s``, ``Vt``
(svd) or ``left``, ``right`` (als), or id→vector tables as Spark's
``ALSModel.userFactors`` and ``itemFactors`` export them: ``row_ids``,
``row_vectors``, ``col_ids``, ``col_vectors`` (or ``user_ids``,
``user_factors``, ``item_ids``, ``item_factors``).
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lowrank.cli.common import EXPECTED_ERRORS, CLIError, Parser

# The names an id table may go by: lowrank's, then Spark's (userFactors, itemFactors).
_ID_TABLES = (
    ("row_ids", "row_vectors", "col_ids", "col_vectors"),
    ("user_ids", "user_factors", "item_ids", "item_factors"),
)


def _check_file(path: str) -> Path:
    file = Path(path)
    if file.is_dir():
        raise CLIError(f"cannot read {path}: it is a folder, not a file")
    if not file.is_file():
        raise CLIError(f"cannot read {path}: no such file")
    return file


def load_matrix(path: str) -> Any:
    """The matrix in ``path``: a ``.npy`` array, a one-array ``.npz``, or a ``scipy.sparse.save_npz`` file."""
    from lowrank.io.files import load_npy, load_npz

    file = _check_file(path)
    with open(file, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        return load_npy(file)
    if not magic.startswith(b"PK"):
        raise CLIError(f"cannot read {path}: neither a .npy nor an .npz file")
    try:
        with zipfile.ZipFile(file) as archive:
            names = {name.removesuffix(".npy") for name in archive.namelist()}
    except zipfile.BadZipFile as exc:
        raise CLIError(f"cannot read {path} as an .npz file: {exc}") from None
    if {"format", "shape", "data"} <= names:  # scipy.sparse.save_npz, compressed by default
        try:
            import scipy.sparse
        except ImportError:
            raise ImportError(f"{path} holds a scipy.sparse matrix: reading it needs scipy (pip install scipy)") \
                from None
        try:
            return scipy.sparse.load_npz(file)  # numpy.load with allow_pickle=False
        except (ValueError, OSError, KeyError) as exc:
            raise CLIError(f"cannot read {path} as a scipy.sparse matrix: {exc}") from None
    arrays = load_npz(file)
    if "M" in arrays:
        return arrays["M"]
    if len(arrays) != 1:
        raise CLIError(f"cannot tell which array of {path} is the matrix: name it M (it holds {sorted(arrays)})")
    return next(iter(arrays.values()))


def load_factors(path: str, names: tuple[str, ...], shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The arrays ``names`` of the ``.npz`` file ``path``; for ``("left", "right")`` also from id tables.

    An id table (``row_ids``/``row_vectors`` and ``col_ids``/``col_vectors``, or
    Spark's ``user_ids``/``user_factors`` and ``item_ids``/``item_factors``)
    becomes ``left`` and ``right`` of the matrix's ``shape``; see
    :func:`lowrank.factor.factors_from_id_tables`.
    """
    from lowrank.factor.certificates import factors_from_id_tables
    from lowrank.io.files import load_npz

    arrays = load_npz(_check_file(path))
    if all(name in arrays for name in names):
        return {name: arrays[name] for name in names}
    if names == ("left", "right") and shape is not None:
        for keys in _ID_TABLES:
            if all(key in arrays for key in keys):
                row_ids, row_vectors, col_ids, col_vectors = (arrays[key] for key in keys)
                try:
                    left, right = factors_from_id_tables(row_ids, row_vectors, col_ids, col_vectors, shape)
                except (ValueError, TypeError) as exc:  # name the file's own keys, not the function's arguments
                    raise CLIError(f"{path} ({', '.join(keys)}): {exc}") from None
                return {"left": left, "right": right}
        wanted = "left and right, or id tables (" + "; ".join(", ".join(keys) for keys in _ID_TABLES) + ")"
    else:
        wanted = ", ".join(names)
    raise CLIError(f"{path} must hold {wanted}, got {sorted(arrays) or 'no arrays'}")


def _report(args: argparse.Namespace, certify: Any) -> int:
    # a checking command: 0 passed, 1 the certificate failed, 2 it could not run
    try:
        report = certify()
    except EXPECTED_ERRORS as exc:
        message = " ".join(str(exc).split())
        print(f"lowrank: error: verify {args.kind} could not run: {message}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), allow_nan=False) if args.json else report.format())
    return 0 if report.passed else 1


def _cmd_svd(args: argparse.Namespace) -> int:
    def certify() -> Any:
        from lowrank.factor.certificates import check_svd

        M = load_matrix(args.matrix)
        f = load_factors(args.factors, ("U", "s", "Vt"))
        exact = None if args.exact is None else args.exact == "yes"
        return check_svd(M, f["U"], f["s"], f["Vt"], tol=args.tol, exact=exact, random_state=args.seed)

    return _report(args, certify)


def _cmd_als(args: argparse.Namespace) -> int:
    def certify() -> Any:
        from lowrank.factor.certificates import check_als

        M = load_matrix(args.matrix)
        mask = None if args.mask is None else load_matrix(args.mask)
        f = load_factors(args.factors, ("left", "right"), tuple(M.shape))
        return check_als(M, f["left"], f["right"], mask=mask, reg=args.reg, weighted_reg=args.weighted_reg,
                         tol=args.tol)  # fmt: skip

    return _report(args, certify)


def _cmd_implicit_als(args: argparse.Namespace) -> int:
    def certify() -> Any:
        from lowrank.factor.certificates import check_implicit_als

        R = load_matrix(args.matrix)
        f = load_factors(args.factors, ("left", "right"), tuple(R.shape))
        return check_implicit_als(R, f["left"], f["right"], alpha=args.alpha, reg=args.reg,
                                  weighted_reg=args.weighted_reg, tol=args.tol)  # fmt: skip

    return _report(args, certify)


def _common(p: argparse.ArgumentParser, factors_help: str) -> None:
    p.add_argument("matrix", metavar="M", help="a .npy, a one-array .npz, or a scipy.sparse.save_npz file")
    p.add_argument("factors", metavar="FACTORS", help=factors_help)
    p.add_argument("--tol", type=float, default=1e-4, help="pass when every number checked is at most this "
                   "(default 1e-4)")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="print the report as one JSON object on stdout, and nothing else")  # fmt: skip


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``verify svd|als|implicit-als`` to the ``lowrank`` command line."""
    ver = sub.add_parser(
        "verify", help="certify an SVD or ALS factors computed elsewhere",
        description="Certify factors computed elsewhere (Spark, implicit, a GPU SVD) against the input. Exit codes: "
        "0 the certificate passed, 1 it failed, 2 it could not run (one line on stderr).",
    )  # fmt: skip
    kinds = ver.add_subparsers(dest="kind", required=True, parser_class=Parser, metavar="KIND")

    svd = kinds.add_parser("svd", help="residuals, orthogonality and the Eckart–Young gap of U, s, Vt")
    _common(svd, "an .npz file holding U (m, k), s (k,), Vt (k, n)")
    svd.add_argument("--exact", choices=("yes", "no"), default=None,
                     help="the optimum from M's full spectrum (yes) or a randomized bound (no); default: exact "
                     "for a dense M up to about 1600×1600")  # fmt: skip
    svd.add_argument("--seed", type=int, default=0, help="seed of the randomized bound (default 0)")
    svd.set_defaults(run=_cmd_svd)

    factors_help = ("an .npz file holding left (m, r) and right (r, n), or id tables: row_ids, row_vectors, "
                    "col_ids, col_vectors (or Spark's user_ids, user_factors, item_ids, item_factors)")
    als = kinds.add_parser("als", help="objective and stationarity of explicit ALS factors")
    _common(als, factors_help)
    als.add_argument("--mask", help="a .npy boolean array, True where M is observed (dense M only)")
    als.add_argument("--reg", type=float, default=0.0, help="the regularization (default 0)")
    als.add_argument("--weighted-reg", action="store_true",
                     help="scale reg by each row's and column's observation count (Spark's regParam)")  # fmt: skip
    als.set_defaults(run=_cmd_als)

    imp = kinds.add_parser("implicit-als", help="objective and stationarity of implicit-feedback ALS factors")
    _common(imp, factors_help)
    imp.add_argument("--alpha", type=float, default=1.0, help="confidence per unit of strength (default 1)")
    imp.add_argument("--reg", type=float, default=0.01, help="the regularization (default 0.01)")
    imp.add_argument("--weighted-reg", action="store_true",
                     help="scale reg by each row's and column's count of interactions (Spark's regParam)")  # fmt: skip
    imp.set_defaults(run=_cmd_implicit_als)
