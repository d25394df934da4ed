"""Gradient verification for difflayers and for user code.

* :func:`check_grad` -- reverse mode against directional central finite differences.
* :func:`dot_product_test` -- forward mode against reverse mode, ``<u, J v> == <J^T u, v>``.
* :func:`taylor_test` -- Taylor remainder convergence rates of the gradient of a functional.
* :func:`adjoint_consistency` -- ``<J v, w> = <v, J^T w>`` for the Jacobian of a PDE residual.
* Cone programs with known outcomes (:func:`random_lp`, :func:`random_conic_qp`,
  :func:`random_socp`, :func:`degenerate_lp`, :func:`primal_infeasible_lp`,
  :func:`dual_infeasible_lp`, :func:`random_qp`) and a Clarabel :func:`reference_solve`.
* :func:`qp_kkt_gradients` -- exact dense gradients through a QP solution (active-set KKT).
* :func:`check_hypergrad` -- every applicable bilevel hypergradient estimator against
  central finite differences, as a table.

All of them work in float64. Nothing in the library imports this package; tests and benchmarks do.

Example:
    >>> import torch
    >>> from difflayers.testing import check_grad, dot_product_test, taylor_test
    >>> gen = torch.Generator().manual_seed(0)
    >>> x, dx = torch.randn(2, 4, dtype=torch.float64, generator=gen)
    >>> check_grad(torch.sin, x).passed and dot_product_test(torch.sin, x).passed
    True
    >>> taylor_test(lambda x: torch.sin(x).sum(), x, dx).passed()
    True
"""

from difflayers.testing._gradcheck import (
    DotProductResult,
    GradCheckResult,
    check_grad,
    dot_product_test,
)
from difflayers.testing._conic_problems import (
    ConicBatch,
    KnownSolution,
    QPData,
    ReferenceSolution,
    concat_problems,
    degenerate_lp,
    dual_infeasible_lp,
    primal_infeasible_lp,
    qp_to_conic,
    random_conic_qp,
    random_lp,
    random_qp,
    random_socp,
    reference_solve,
)
from difflayers.testing._kkt_oracle import QPGradients, qp_kkt_gradients
from difflayers.testing._taylor import TaylorResult, taylor_test
from difflayers.testing._hypergrad import HypergradCheck, HypergradRow, check_hypergrad
from difflayers.testing._pde_checks import AdjointConsistencyResult, adjoint_consistency

__all__ = [
    "check_grad",
    "dot_product_test",
    "taylor_test",
    "GradCheckResult",
    "DotProductResult",
    "TaylorResult",
    "ConicBatch",
    "KnownSolution",
    "QPData",
    "ReferenceSolution",
    "concat_problems",
    "degenerate_lp",
    "dual_infeasible_lp",
    "primal_infeasible_lp",
    "qp_to_conic",
    "random_conic_qp",
    "random_lp",
    "random_qp",
    "random_socp",
    "reference_solve",
    "QPGradients",
    "qp_kkt_gradients",
    "check_hypergrad",
    "HypergradCheck",
    "HypergradRow",
    "adjoint_consistency",
    "AdjointConsistencyResult",
]
