"""The reference tooling: the gradient checker, test vectors and the candidate harness.

What other implementations are checked against. Above :mod:`lowrank.nn`,
:mod:`lowrank.factor` and :mod:`lowrank.io`; imported by nothing but the
command line and the tests.
"""
