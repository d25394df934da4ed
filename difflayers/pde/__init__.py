"""PDE-constrained layers: grids, matrix-free operators, preconditioners and ``PDELayer``.

``PDELayer(residual)`` turns a discrete residual ``R(u, *theta)`` written in torch into
a batched, differentiable solve ``u*(theta)``: Newton or Newton-Krylov forward, one
adjoint solve with ``J^T`` backward, tangent-linear forward mode. The operators
(``diffusion`` on a ``Grid`` with ``Dirichlet``/``Neumann``/``Robin`` sides, the Q4
plane-stress ``ElasticityQ4``), preconditioners (``Jacobi``, ``Multigrid``), time
stepping (``integrate`` with ``ImplicitEuler``/``CrankNicolson``) and SIMP topology optimization build on it.
"""

from ._banded import BlockCholesky, BlockCholeskyFactorization, BlockTridiagonalOperator
from ._fem import ElasticityQ4, q4_stiffness
from ._grid import Boundary, Dirichlet, Grid, Neumann, Robin, diffusion, diffusion_diagonal
from ._hessian import hessian_vector_product
from ._layer import PDELayer
from ._multigrid import Jacobi, Multigrid, Preconditioned
from ._time import CrankNicolson, ImplicitEuler, ThetaMethod, integrate
from ._topopt import (
    DensityFilter,
    TopologyResult,
    compliance,
    compliance_layer,
    optimality_criteria,
    topology_optimization,
)

__all__ = [
    "Grid",
    "Robin",
    "Dirichlet",
    "Neumann",
    "Boundary",
    "diffusion",
    "diffusion_diagonal",
    "Jacobi",
    "Multigrid",
    "Preconditioned",
    "PDELayer",
    "hessian_vector_product",
    "ThetaMethod",
    "ImplicitEuler",
    "CrankNicolson",
    "integrate",
    "ElasticityQ4",
    "BlockTridiagonalOperator",
    "BlockCholesky",
    "BlockCholeskyFactorization",
    "q4_stiffness",
    "DensityFilter",
    "compliance_layer",
    "compliance",
    "optimality_criteria",
    "TopologyResult",
    "topology_optimization",
]
