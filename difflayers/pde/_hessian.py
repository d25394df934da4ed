"""Hessian-vector products of a functional of a PDE solution (second-order adjoint)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import jvp, vjp

from ..solvers import CG, GMRES, JacobianOperator
from ._layer import PDELayer
from ._multigrid import Preconditioned

__all__ = ["hessian_vector_product"]


def hessian_vector_product(
    layer: PDELayer,
    loss: Callable[..., torch.Tensor],
    theta: tuple[torch.Tensor, ...],
    v: tuple[torch.Tensor, ...],
    *,
    u0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    r"""Gradient and Hessian-vector product of ``j(theta) = loss(u*(theta), *theta)``.

    ``u*(theta)`` solves ``R(u, theta) = 0`` (the layer's residual). With the
    Lagrangian ``L(u, theta) = loss(u, theta) - <lambda, R(u, theta)>`` and the adjoint
    ``J^T lambda = d loss / du`` (``J = dR/du``), the gradient is
    ``dj = d_theta L``. Differentiating the optimality system along ``v`` gives the
    second-order adjoint method:

    .. math::
        J\,\delta u = -R_\theta v                                   \quad\text{(tangent linear)}\\
        J^T \delta\lambda = L_{uu}\,\delta u + L_{u\theta} v        \quad\text{(second-order adjoint)}\\
        H v = L_{\theta u}\,\delta u + L_{\theta\theta} v - R_\theta^T \delta\lambda .

    The second derivatives of ``L`` are one ``torch.func.jvp`` of its gradient; the
    three linear solves use GMRES (CG for a symmetric Jacobian) with the layer's
    preconditioner, built at the solution. Double backward through ``PDELayer`` misses the terms with
    ``R_uu``, ``R_u theta`` (the implicit backward is first order); this function
    includes them.

    Args:
        layer: the ``PDELayer``.
        loss: ``loss(u, *theta)`` returning a scalar.
        theta: the layer's arguments.
        v: a direction, one tensor per ``theta`` (zeros for fixed arguments).
        u0: initial guess for the forward solve.

    Example:
        >>> layer = PDELayer(lambda u, c: u**3 + u - c, solver=Newton(linear_solver=LU()))
        >>> c = torch.tensor([[2.0]], dtype=torch.float64)      # u* = 1, u*' = 1/4, u*'' = -3/32
        >>> value, (hv,) = hessian_vector_product(layer, lambda u, c: u.sum(), (c,), (torch.ones_like(c),),
        ...                                       u0=torch.zeros(1, 1, dtype=torch.float64))
        >>> round(float(hv), 6)
        -0.09375

    Returns:
        ``(j, Hv)``: the value and the tuple of Hessian-vector products per argument.

    References:
        Wang, Navon, Le Dimet & Zou, The second order adjoint analysis (1992),
            DOI 10.1007/BF01581069.
        Hinze, Pinnau, Ulbrich & Ulbrich, Optimization with PDE Constraints (2009),
            section 1.6, DOI 10.1007/978-1-4020-8839-1.
    """
    theta = tuple(t.detach() for t in theta)
    v = tuple(torch.zeros_like(t) if d is None else d for t, d in zip(theta, v))
    with torch.no_grad():
        u = layer(*theta, u0=u0)
    shape = u.shape
    batch = shape[0]

    def R(u_flat, *th):
        return layer.residual(u_flat.reshape(shape), *th).reshape(batch, -1)

    symmetric = layer.symmetric
    solver = CG(atol=0.0) if symmetric else GMRES(atol=0.0, restart=40)
    if layer.preconditioner is not None:
        with torch.no_grad():
            solver = Preconditioned(solver=solver, preconditioner=layer.preconditioner(u, *theta))
    z = u.reshape(batch, -1)
    J = JacobianOperator(lambda z_: R(z_, *theta), z, symmetric=symmetric)

    # Adjoint: J^T lambda = d loss / du.
    loss_u, value = torch.func.grad_and_value(lambda z_: loss(z_.reshape(shape), *theta))(z)
    lam = solver.solve(J.T, loss_u).value

    # Tangent linear: J du = -R_theta v.
    rhs = jvp(lambda *th: R(z, *th), theta, v)[1]
    du = solver.solve(J, -rhs).value

    def lagrangian_grad(z_, *th):
        def lagrangian(z_, *th):
            return loss(z_.reshape(shape), *th) - (lam * R(z_, *th)).sum()

        return torch.func.grad(lagrangian, argnums=tuple(range(1 + len(th))))(z_, *th)

    second = jvp(lagrangian_grad, (z, *theta), (du, *v))[1]
    dlam = solver.solve(J.T, second[0]).value
    _, pullback = vjp(lambda *th: R(z, *th), *theta)
    correction = pullback(dlam)
    hv = tuple(s - c for s, c in zip(second[1:], correction))
    return value, hv
