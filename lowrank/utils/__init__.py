"""The bottom layer: argument validation and the BLAS thread limit (NumPy only).

:mod:`lowrank.utils.validation` holds one helper per rule (``check_matrix``,
``check_rank``, ``check_random_state``, ...), each raising the error the
project's vocabulary gives that fault (``docs/architecture.md``).
"""
