"""Batched solvers: linear (Krylov and dense), fixed point, Newton, least squares.

Everything here is batched over the leading dimension, runs on any device, and
returns a ``Solution`` with a per-sample ``Status``. No domain knowledge and no
autograd tricks live here (see ``difflayers.implicit`` for differentiation).
"""

from ._bicgstab import BiCGStab
from ._cg import CG
from ._dense import LSTSQ, LU, Cholesky, CholeskyFactorization, LUFactorization
from ._driver import IterativeSolver, batch_dot, batch_norm, default_tolerances, iterate
from ._gmres import GMRES
from ._linear import KrylovSolver, LinearSolver
from ._linear_solve import Auto, linear_solve
from ._minres import MINRES
from ._neumann import Neumann
from ._nonlinear import NonlinearSolver
from ._operator import (
    DenseOperator,
    IdentityOperator,
    JacobianOperator,
    LinearOperator,
    MatvecOperator,
    aslinearoperator,
)
from ._precision import compute_dtype
from ._problem import FixedPointProblem, LeastSquaresProblem, MinimizeProblem, Problem, RootProblem
from ._solution import ConvergenceError, Solution, Status

__all__ = [
    # outcome
    "Status",
    "Solution",
    "ConvergenceError",
    # driver
    "IterativeSolver",
    "iterate",
    "default_tolerances",
    "batch_norm",
    "batch_dot",
    # precision
    "compute_dtype",
    # linear operators
    "LinearOperator",
    "DenseOperator",
    "MatvecOperator",
    "JacobianOperator",
    "IdentityOperator",
    "aslinearoperator",
    # linear solvers
    "linear_solve",
    "LinearSolver",
    "KrylovSolver",
    "Auto",
    "CG",
    "MINRES",
    "GMRES",
    "BiCGStab",
    "Neumann",
    "LU",
    "Cholesky",
    "LSTSQ",
    "LUFactorization",
    "CholeskyFactorization",
    # nonlinear problems and solvers
    "Problem",
    "FixedPointProblem",
    "RootProblem",
    "MinimizeProblem",
    "LeastSquaresProblem",
    "NonlinearSolver",
]

from ._fixed_point import Anderson, Broyden, Picard
from ._least_squares import GaussNewton, LevenbergMarquardt
from ._newton import Newton

__all__ += ["Picard", "Anderson", "Broyden", "Newton", "GaussNewton", "LevenbergMarquardt"]
