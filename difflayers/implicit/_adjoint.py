"""Differentiation strategies: how gradients flow through a solve.

A strategy is passed at call time (``adjoint=Implicit(linear_solver=CG())``) and holds
only hyperparameters. The solve itself never changes with the strategy; only what
autograd records does.
"""

from __future__ import annotations

import dataclasses

from ..solvers import LinearSolver

__all__ = ["Adjoint", "Implicit", "Unroll", "CheckpointedUnroll", "Truncated", "OneStep"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Adjoint:
    """Base class of the differentiation strategies."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Implicit(Adjoint):
    """Implicit function theorem at the solution: one linear solve per backward.

    With ``F(z*, theta) = 0`` the solution's derivative is
    ``dz*/dtheta = -(dF/dz)^-1 dF/dtheta``; reverse mode solves the transposed system
    ``(dF/dz)^T w = g`` and returns ``-(dF/dtheta)^T w``. Memory does not grow with
    the number of forward iterations, and the gradient is exact up to the forward
    and backward tolerances. Forward mode (``torch.func.jvp``) solves
    ``(dF/dz) dz = -(dF/dtheta) dtheta``. The backward pass is first order: it is not
    itself recorded, so second derivatives through the solve (``create_graph=True``)
    miss this node's terms; use ``Unroll()`` where they are needed.

    Args:
        linear_solver: solver of the transposed system; ``None`` uses CG when the
            Jacobian is symmetric (``argmin``, ``least_squares``) and GMRES otherwise,
            with the dtype's default ``rtol`` and ``atol=0`` (the cotangent's scale
            follows the loss, so only a relative tolerance keeps accuracy scale-free).

    References:
        Blondel et al., Efficient and Modular Implicit Differentiation (2022),
        arXiv:2105.15183.
    """

    linear_solver: LinearSolver | None = None

    def __post_init__(self):
        if self.linear_solver is not None and not isinstance(self.linear_solver, LinearSolver):
            raise TypeError(
                f"Implicit: linear_solver must be a difflayers.solvers.LinearSolver such as CG() or GMRES(); "
                f"got {type(self.linear_solver).__name__}."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unroll(Adjoint):
    """Backpropagate through every iteration of the forward solve.

    Exact derivative of the computation actually performed (also of an unconverged
    one); memory grows linearly with the number of iterations.
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointedUnroll(Adjoint):
    """Unrolled differentiation that stores only one state per ``check_every`` block.

    Each block of iterations is recomputed during the backward pass
    (``torch.utils.checkpoint``): memory falls by about ``check_every`` times for
    about one extra forward solve of compute. Gradients equal those of ``Unroll``.
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class Truncated(Adjoint):
    """Solve without recording, then backpropagate through ``steps`` more iterations.

    The iterations restart from the (detached) solution, so the gradient is that of
    ``steps`` solver steps taken at the solution. For a Newton solver one step gives
    the implicit gradient exactly; for a contraction ``T`` the error decays like
    ``Lip(T)^steps``.

    Args:
        steps: number of differentiable steps (>= 1).

    References:
        Shaban et al., Truncated Back-propagation for Bilevel Optimization (2019),
        arXiv:1810.10667.
    """

    steps: int = 1

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Truncated: steps must be an int >= 1, got {self.steps!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OneStep(Adjoint):
    """One differentiable solver step at the solution (Jacobian-free backpropagation).

    The cheapest strategy: for a fixed-point map ``T`` it returns ``dT/dtheta`` at the
    fixed point, i.e. drops the ``(I - dT/dz)^-1`` factor, which is a descent
    direction for contractive ``T`` but not the exact gradient. Same as
    ``Truncated(steps=1)``.

    References:
        Fung et al., JFB: Jacobian-Free Backpropagation for Implicit Networks (2022),
        arXiv:2103.12803.
    """
