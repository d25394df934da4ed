"""difflayers: batched differentiable optimization layers for PyTorch.

Entry points::

    import difflayers as dl
    z = dl.fixed_point(T, z0, *params)          # z = T(z, *params)
    z = dl.root_find(F, z0, *params)            # F(z, *params) = 0
    z = dl.argmin(f, z0, *params)               # argmin_z f(z, *params)
    z = dl.least_squares(r, z0, *params)        # argmin_z 1/2 ||r(z, *params)||^2
    solve = dl.custom_root(F)(my_solver)        # any solver made differentiable
    sol = dl.solvers.linear_solve(A, b)         # batched dense or matrix-free
    x = dl.QPLayer()(P, q, G, h, A, b)          # batched QP, None for absent parts
    xs = dl.ConicLayer(problem, parameters, variables)(*tensors)   # cvxpy front end
    r = dl.ot.sinkhorn(x=x, y=y, epsilon=0.05)  # entropic OT; dl.SinkhornLayer for the plan
    xs = dl.shard_batch(layer, q)               # the batch split across torch.distributed ranks

Every solve is batched over the leading dimension and differentiable with respect
to the explicit ``*params`` through the strategy passed as ``adjoint=``.
"""

from . import bilevel, conic, implicit, ot, pde, solvers
from .conic import ConicLayer, QPLayer
from .ot import SinkhornLayer
from .implicit import (
    CheckpointedUnroll,
    Implicit,
    OneStep,
    Truncated,
    Unroll,
    argmin,
    custom_root,
    fixed_point,
    least_squares,
    root_find,
    shard_batch,
)
from .solvers import ConvergenceError, Solution, Status, linear_solve

__version__ = "0.1.0"

__all__ = [
    "solvers",
    "implicit",
    "conic",
    "ot",
    "bilevel",
    "pde",
    "QPLayer",
    "ConicLayer",
    "SinkhornLayer",
    "fixed_point",
    "root_find",
    "argmin",
    "least_squares",
    "custom_root",
    "shard_batch",
    "linear_solve",
    "Implicit",
    "Unroll",
    "CheckpointedUnroll",
    "Truncated",
    "OneStep",
    "Solution",
    "Status",
    "ConvergenceError",
    "__version__",
]
