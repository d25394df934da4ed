"""Exact, dense gradients through the solution of a convex QP (an oracle for tests).

For ``x* = argmin 1/2 x'Px + q'x  s.t.  G x <= h,  A x = b`` with multipliers
``lam >= 0`` (inequalities) and ``nu`` (equalities), the KKT conditions are::

    P x + q + G'lam + A'nu = 0,    lam * (G x - h) = 0,    A x = b.

Near a solution with strict complementarity the active set
``a = {i : lam_i > h_i - G_i x}`` (the larger of the complementary pair is the nonzero
one) does not change, inactive multipliers stay zero, and the solution is the smooth
solution of the equality system ``P x + q + G_a'lam_a + A'nu = 0``, ``G_a x = h_a``,
``A x = b``. Differentiating it gives the symmetric KKT matrix::

        [ P    G_a'  A' ]
    K = [ G_a  0     0  ]        K [dx; dlam_a; dnu] = -[dP x + dq + dG_a'lam_a + dA'nu;
        [ A    0     0  ]                                dG_a x - dh_a;  dA x - db].

For a loss ``L(x*)`` with ``g = dL/dx*``, one solve ``K [d_x; d_lam; d_nu] = [-g; 0; 0]``
(``K`` is symmetric, so it is its own transpose) gives every gradient::

    dL/dq = d_x            dL/dh_a = -d_lam          dL/db = -d_nu
    dL/dG_a = lam_a d_x' + d_lam x'                  dL/dA = nu d_x' + d_nu x'
    dL/dP = 1/2 (d_x x' + x d_x')

and zero for the rows of ``G`` and ``h`` outside the active set.

Convention for ``P``: each of the ``n^2`` entries of ``P`` is an independent input of
the problem as written, ``1/2 x'Px = 1/2 sum_ij P_ij x_i x_j``. Only the symmetric
part of ``P`` enters the objective, so ``dL/dP_ij = dL/dP_ji`` and the gradient is the
symmetric matrix above (for a symmetric ``P``, ``<dL/dP, dP>`` is the directional
derivative for any, even non-symmetric, perturbation ``dP``). This is also what
autograd gives through any solver that reads ``P`` only through ``1/2 (P + P')``.

Inactive inequalities with a zero slack (weak activity, degenerate problems) are
dropped with the rest of the inactive set: there the solution is not differentiable
and this is one (the right-hand) choice of generalized gradient.

Example:
    >>> import torch
    >>> P = torch.eye(2, dtype=torch.float64); q = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    >>> x = -q  # unconstrained minimizer
    >>> grads = qp_kkt_gradients(P, q, None, None, None, None, x, None, None, torch.ones(2, dtype=torch.float64))
    >>> grads.q
    tensor([-1., -1.], dtype=torch.float64)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["QPGradients", "qp_kkt_gradients"]


class QPGradients(NamedTuple):
    """Gradients of a loss with respect to each QP input; ``None`` for absent inputs.

    Batched inputs give ``[B, ...]`` gradients; unbatched inputs give unbatched ones.
    ``active`` is the boolean ``[B, m_ineq]`` (or ``[m_ineq]``) active set that was used.
    """

    P: torch.Tensor
    q: torch.Tensor
    G: torch.Tensor | None
    h: torch.Tensor | None
    A: torch.Tensor | None
    b: torch.Tensor | None
    active: torch.Tensor | None


def qp_kkt_gradients(P: torch.Tensor, q: torch.Tensor, G: torch.Tensor | None, h: torch.Tensor | None,
                     A: torch.Tensor | None, b: torch.Tensor | None, x: torch.Tensor, lam: torch.Tensor | None,
                     nu: torch.Tensor | None, grad_x: torch.Tensor, *,
                     active_tol: float = 1e-9) -> QPGradients:
    """Gradients of ``L(x*)`` w.r.t. ``P, q, G, h, A, b`` by the active-set KKT system, in float64.

    See the module docstring for the system and the convention for ``P`` (symmetric
    gradient, entries treated as independent). ``x``, ``lam`` and ``nu`` must be an
    accurate primal-dual solution (e.g. from ``reference_solve`` on ``qp_to_conic``,
    where ``z = [nu; lam]``); the result is exact for that solution and active set.

    Args:
        P: ``[B, n, n]`` or ``[n, n]`` symmetric positive semidefinite, positive
            definite on the null space of the active constraints.
        q: ``[B, n]`` or ``[n]``.
        G, h: ``[B, m, n]``, ``[B, m]`` (or unbatched) inequality data, or both None.
        A, b: ``[B, p, n]``, ``[B, p]`` (or unbatched) equality data, or both None.
        x: the solution, ``[B, n]`` or ``[n]``.
        lam: inequality multipliers ``>= 0`` (None when ``G`` is None).
        nu: equality multipliers (None when ``A`` is None).
        grad_x: ``dL/dx*``, shaped like ``x``.
        active_tol: an inequality is active when ``lam_i > h_i - G_i x`` (the multiplier
            exceeds the slack) and ``lam_i > active_tol * max(1, max_j lam_j)``.

    Returns:
        ``QPGradients`` in float64, batched like ``q``/``x``.

    Raises:
        ValueError: if shapes are inconsistent or an argument pair is half given.
        torch.linalg.LinAlgError: if the active-set KKT matrix is singular (active
            constraints linearly dependent, or ``P`` singular on their null space).
    """
    if (G is None) != (h is None) or (G is None) != (lam is None):
        raise ValueError("qp_kkt_gradients: give G, h and lam together, or none of them.")
    if (A is None) != (b is None) or (A is None) != (nu is None):
        raise ValueError("qp_kkt_gradients: give A, b and nu together, or none of them.")
    batched = x.dim() == 2
    if not batched:
        x, grad_x, q = x.unsqueeze(0), grad_x.unsqueeze(0), q.unsqueeze(0)
    Bsz, n = x.shape

    def batch(t, dims):
        if t is None:
            return None
        t = t.detach().to(torch.float64)
        return t.expand(Bsz, *t.shape) if t.dim() == dims else t

    P, q, x, g = batch(P, 2), batch(q, 1), batch(x, 1), batch(grad_x, 1)
    G, h, lam = batch(G, 2), batch(h, 1), batch(lam, 1)
    A, b, nu = batch(A, 2), batch(b, 1), batch(nu, 1)
    if P.shape != (Bsz, n, n) or q.shape != (Bsz, n) or g.shape != (Bsz, n):
        raise ValueError(f"qp_kkt_gradients: P {tuple(P.shape)}, q {tuple(q.shape)}, grad_x {tuple(g.shape)} "
                         f"do not match x {tuple(x.shape)}.")
    has_G, has_A = G is not None, A is not None
    G = x.new_zeros(Bsz, 0, n) if G is None else G
    h = x.new_zeros(Bsz, 0) if h is None else h
    lam = x.new_zeros(Bsz, 0) if lam is None else lam
    A = x.new_zeros(Bsz, 0, n) if A is None else A
    b = x.new_zeros(Bsz, 0) if b is None else b
    nu = x.new_zeros(Bsz, 0) if nu is None else nu
    m, p = G.shape[1], A.shape[1]
    shapes = {"G": (G, (Bsz, m, n)), "h": (h, (Bsz, m)), "lam": (lam, (Bsz, m)),
              "A": (A, (Bsz, p, n)), "b": (b, (Bsz, p)), "nu": (nu, (Bsz, p))}
    for name, (t, want) in shapes.items():
        if tuple(t.shape) != want:
            raise ValueError(f"qp_kkt_gradients: {name} has shape {tuple(t.shape)}, expected {want} "
                             f"for x of shape {tuple(x.shape)} and {m} inequality / {p} equality rows.")

    # Complementarity says one of lam_i, slack_i is zero; which one is decided by the
    # larger of the two, a rule that does not depend on the scale of the problem and
    # tolerates solutions accurate only to 1e-6 (a fixed threshold on lam does not).
    slack = h - (G @ x.unsqueeze(-1)).squeeze(-1)
    scale = lam.abs().amax(dim=-1, keepdim=True).clamp_min(1.0) if m else x.new_ones(Bsz, 1)
    active = (lam > slack) & (lam > active_tol * scale)
    mask = active.to(torch.float64)
    # Inactive rows become the identity equation d_lam_i = 0, which keeps K symmetric
    # and one size for the whole batch: [[P, G'M, A'], [M G, I - M, 0], [A, 0, 0]].
    K = x.new_zeros(Bsz, n + m + p, n + m + p)
    K[:, :n, :n] = 0.5 * (P + P.mT)
    K[:, n:n + m, :n] = mask.unsqueeze(-1) * G
    K[:, :n, n:n + m] = (mask.unsqueeze(-1) * G).mT
    K[:, n:n + m, n:n + m] = torch.diag_embed(1.0 - mask)
    K[:, n + m:, :n] = A
    K[:, :n, n + m:] = A.mT
    rhs = torch.cat([-g, x.new_zeros(Bsz, m + p)], dim=1)
    d = torch.linalg.solve(K, rhs)
    dx, dlam, dnu = d[:, :n], d[:, n:n + m] * mask, d[:, n + m:]

    outer = dx.unsqueeze(-1) * x.unsqueeze(-2)
    gP = 0.5 * (outer + outer.mT)
    gq = dx
    gG = (lam * mask).unsqueeze(-1) * dx.unsqueeze(-2) + dlam.unsqueeze(-1) * x.unsqueeze(-2)
    gh = -dlam
    gA = nu.unsqueeze(-1) * dx.unsqueeze(-2) + dnu.unsqueeze(-1) * x.unsqueeze(-2)
    gb = -dnu
    out = [gP, gq, gG if has_G else None, gh if has_G else None, gA if has_A else None, gb if has_A else None,
           active if has_G else None]
    if not batched:
        out = [None if t is None else t.squeeze(0) for t in out]
    return QPGradients(*out)
