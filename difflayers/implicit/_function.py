"""The one autograd Function of the implicit function theorem.

The solve happens before ``apply`` (without recording); this Function only attaches
the derivative of the solution ``z*(theta)`` defined by ``F(z*, theta) = 0``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch
from torch.func import vjp

from ..solvers import CG, GMRES, JacobianOperator, LinearSolver, Solution
from ..solvers._operator import jvp_by_reverse_mode

__all__ = ["ImplicitSpec", "implicit_solution"]


@dataclasses.dataclass(frozen=True)
class ImplicitSpec:
    """What the backward pass needs besides tensors.

    Attributes:
        root: ``F(z, *params)`` on flat ``[B, n]`` iterates, zero at the solution.
        symmetric: whether ``dF/dz`` is symmetric (selects CG by default).
        linear_solver: solver of the linearized systems, ``None`` for the default.
        name: the entry point, for messages.
    """

    root: Callable[..., torch.Tensor]
    symmetric: bool
    linear_solver: LinearSolver | None
    name: str

    def solver(self) -> LinearSolver:
        if self.linear_solver is not None:
            return self.linear_solver
        # Purely relative: the cotangent's scale is arbitrary (it follows the loss), so an
        # absolute floor would make the gradient's accuracy depend on it.
        return CG(atol=0.0) if self.symmetric else GMRES(atol=0.0)


def _warn_if_failed(sol: Solution, what: str) -> None:
    if not bool(sol.converged.all()):
        bad = (~sol.converged).nonzero().flatten().tolist()
        worst = float(sol.stats["residual"].detach().max())
        warnings.warn(
            f"{what}: the linear solve did not converge for samples {bad[:8]}"
            f"{' ...' if len(bad) > 8 else ''} (max residual {worst:.3e}); the gradient is inaccurate there. "
            "Pass Implicit(linear_solver=...) with a larger max_steps, another method or a looser rtol.",
            RuntimeWarning,
            stacklevel=3,
        )


def _root_of_params(spec: ImplicitSpec, z: torch.Tensor, params, indices: list[int]):
    """``F(z, ...)`` as a function of the parameters at ``indices`` alone."""

    def root(*chosen):
        full = list(params)
        for i, p in zip(indices, chosen):
            full[i] = p
        return spec.root(z, *full)

    return root


class _ImplicitSolve(torch.autograd.Function):
    @staticmethod
    def forward(spec: ImplicitSpec, z: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        # A view, not z itself: autograd refuses to save an input returned as-is.
        return z.view_as(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, z, *params = inputs
        ctx.spec = spec
        ctx.save_for_backward(z, *params)
        ctx.save_for_forward(z, *params)

    # Reverse mode. Differentiating F(z*(theta), theta) = 0 gives
    #     J dz* = -(dF/dtheta) dtheta,        J = dF/dz at z*,  block diagonal over B.
    # The cotangent g = dL/dz* [B, n] therefore pulls back through
    #     J^T w = g                            (one batched linear solve, w [B, n])
    #     dL/dtheta = -(dF/dtheta)^T w         (one vjp of F w.r.t. the parameters)
    # Parameters broadcast over the batch get their gradient summed by that vjp.
    @staticmethod
    def backward(ctx, grad_z):
        spec = ctx.spec
        # First order only: the backward is not recorded, so second derivatives through
        # this node are zero (documented on Implicit).
        with torch.no_grad():
            return _ImplicitSolve._backward(spec, ctx, grad_z)

    @staticmethod
    def _backward(spec, ctx, grad_z):
        z, *params = ctx.saved_tensors
        wanted = [i for i, p in enumerate(params) if ctx.needs_input_grad[2 + i]]
        grads: list[torch.Tensor | None] = [None] * len(params)
        if not wanted:
            return (None, None, *grads)
        # torch.func transforms differentiate under the surrounding no_grad, which keeps
        # the Krylov iterations and the returned gradients out of any autograd graph
        # (recording them would hold every iteration in memory for nothing).
        J = JacobianOperator(lambda z_: spec.root(z_, *params), z, symmetric=spec.symmetric)
        sol = spec.solver().solve(J.T, grad_z.contiguous())
        _warn_if_failed(sol, f"{spec.name} backward")
        pullback = vjp(_root_of_params(spec, z, params, wanted), *[params[i] for i in wanted])[1]
        for i, g in zip(wanted, pullback(-sol.value)):
            grads[i] = g
        return (None, None, *grads)

    # Forward mode: J dz* = -(dF/dtheta) dtheta, one Jacobian product and one batched
    # linear solve. Forward-mode AD cannot nest inside this method, so the products
    # with J and dF/dtheta go through two reverse passes instead.
    @staticmethod
    def jvp(ctx, _spec_tangent, _z_tangent, *param_tangents):
        spec = ctx.spec
        z, *params = ctx.saved_tensors
        tangents = [torch.zeros_like(p) if t is None else t for p, t in zip(params, param_tangents)]
        floating = [i for i, p in enumerate(params) if p.is_floating_point()]
        with torch.enable_grad():
            rhs = jvp_by_reverse_mode(
                _root_of_params(spec, z, params, floating),
                tuple(params[i] for i in floating),
                tuple(tangents[i] for i in floating),
            )
        J = JacobianOperator(lambda z_: spec.root(z_, *params), z, symmetric=spec.symmetric, forward_ad=False)
        sol = spec.solver().solve(J, -rhs)
        _warn_if_failed(sol, f"{spec.name} forward-mode derivative")
        return sol.value


def implicit_solution(spec: ImplicitSpec, z: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Attach the implicit derivative to a solution ``z`` ``[B, n]`` of ``spec.root``."""
    return _ImplicitSolve.apply(spec, z, *params)
