"""Hardening tests: every public entry point against bad input (the transport family is in
``tests/ot/test_hardening.py``).

Contract checked everywhere: each case ends in a clear exception whose message starts with
the entry point and names the argument, or in a documented per-sample ``Status``; no loop
runs past its ``max_steps``; no NaN/Inf comes back with ``SUCCESS``; one bad sample never
spoils the others (values and gradients). Hypothesis draws batch sizes (0 included),
poisoned entries and budgets; plain parametrized tests cover the fixed cases.

Cases per entry point (``-`` not applicable):

====================================  ====  =====  ===  =====  =====  ======  =========  ======  ====  =======
entry point                           NaN   empty  B=1  shape  dtype  device  sign/PSD   infeas  tol0  steps=0
====================================  ====  =====  ===  =====  =====  ======  =========  ======  ====  =======
``linear_solve`` (+ every solver)     x     x      x    x      x      x       x (sing.)  -       x     x
solver objects (constructors, solve)  x     x      -    -      -      -       x          -       x     x
``fixed_point``/``root_find``         x     x      x    x      x      x       -          x       x     x
``argmin``/``least_squares``          x     x      x    x      x      x       -          x       x     x
``custom_root``                       x     x      x    x      x      x       -          -       -     -
``QPLayer``                           x     x      x    x      x      x       x (P PSD)  x       x     x
``solve_conic``                       x     x      -    x      x      x       x (P PSD)  x       x     -
``ConicLayer``                        x     x      x    x      x      x       -          x       x     x
``spo_plus_loss``                     x     x      x    x      x      x       -          x       -     -
``PDELayer``                          x     x      x    x      x      x       x (k > 0)  x       x     x
grids / ``Robin`` / ``diffusion``     x     x      -    x      -      -       x          -       -     -
``integrate``                         x     x      x    -      x      -       x (dt > 0) -       -     x
``compliance``/``topology_opt.``      x     x      x    x      x      -       x (x >= 0) -       x     x
``hypergradient`` (every estimator)   x     x      x    x      x      x       x (lam)    x       x     x
estimators / inner optimizers         x     -      -    -      -      -       x          -       -     x
``learn_hyperparameters``             x     x      x    -      -      -       -          -       -     x
====================================  ====  =====  ===  =====  =====  ======  =========  ======  ====  =======

(``infeas``: infeasible, unbounded or solution-free problems give their status --
``PRIMAL_INFEASIBLE``/``DUAL_INFEASIBLE``, ``BREAKDOWN``, ``NONFINITE``; ``throw=True`` or
``on_failure="raise"`` turn non-convergence into ``ConvergenceError``. Device mismatches
are checked with ``meta`` tensors, which every entry point rejects before computing.)
"""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Many small problems: one intra-op thread (``one_thread`` in tests/conftest.py)."""
