"""Damped Newton on the (negated, convex) dual of a transport problem, batched.

Shared by quadratically regularized OT and the Newton stage of entropic OT. Both duals
have the same structure in ``z = (f, g)``: a gradient that is a marginal error and a
Hessian

    H = [[diag(r), W], [W', diag(s)]]        (r, s: [B, n], [B, m];  W: [B, n, m])

with ``diag(r) >= W 1`` and ``diag(s) >= W' 1`` entrywise (diagonally dominant, hence
positive semi-definite), singular along the gauge ``(1, -1)`` when both marginals are
hard. Each step solves ``(H + delta I) d = -grad`` and backtracks per problem.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..solvers import CG, LinearSolver, MatvecOperator, batch_dot, iterate
from ._geometry import matvec, rmatvec

__all__ = ["masked_products", "newton_loop"]

# Below this fraction of nonzero entries the off-diagonal block is stored as CSR.
_SPARSE_BELOW = 0.25
# Newton systems are factorized densely while B (n + m)^2 stays below this (measured on
# CPU: beyond it, batched CG with sparse or batched products is faster).
_DENSE_UP_TO = 2**17


def _csr(mask, w):
    """The block-diagonal CSR matrix ``[B n, B m]`` of the entries of ``w`` under ``mask``
    (``nonzero`` lists them in row-major order, so no sort is needed)."""
    batch, n, m = w.shape
    b, i, j = mask.nonzero(as_tuple=True)
    crow = torch.zeros(batch * n + 1, dtype=torch.int64, device=w.device)
    crow[1:] = torch.cumsum(mask.sum(2).reshape(-1), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, b * m + j, w[b, i, j], (batch * n, batch * m), check_invariants=False)


def _listed(mask, w):
    """``W v`` and ``W' u`` from the list of kept entries, summed by ``index_add``: the
    sums run in a fixed order (serially on CPU; sorted under deterministic algorithms on
    CUDA), unlike a sparse BLAS product, which promises no bitwise reproducibility."""
    batch, n, m = w.shape
    b, i, j = mask.nonzero(as_tuple=True)
    rows, cols, values = b * n + i, b * m + j, w[b, i, j]

    def forward(v):
        return v.new_zeros(batch * n).index_add_(0, rows, values * v.reshape(-1)[cols]).view(batch, n)

    def backward(u):
        return u.new_zeros(batch * m).index_add_(0, cols, values * u.reshape(-1)[rows]).view(batch, m)

    return forward, backward


def masked_products(mask: torch.Tensor, w: torch.Tensor):
    """``(v -> W v, u -> W' u)`` for ``W = w`` restricted to ``mask`` (``[B, n, m]``):
    sparse (CSR) when few entries are kept, batched dense products otherwise. Under
    ``torch.use_deterministic_algorithms(True)`` the sparse products are sums over the
    list of kept entries in a fixed order (bitwise reproducible)."""
    batch, n, m = w.shape
    if float(mask.sum()) > _SPARSE_BELOW * mask.numel():
        w = torch.where(mask, w, 0.0)
        return (lambda v: matvec(w, v)), (lambda u: rmatvec(u, w))
    if torch.are_deterministic_algorithms_enabled():
        return _listed(mask, w)
    forward = _csr(mask, w)
    backward = _csr(mask.transpose(1, 2), w.transpose(1, 2))
    return (lambda v: (forward @ v.reshape(-1, 1)).view(batch, n)), (lambda u: (backward @ u.reshape(-1, 1)).view(batch, m))


def newton_loop(
    evaluate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    hessian: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    z0: torch.Tensor,
    n: int,
    mass: torch.Tensor,
    full_diagonal: torch.Tensor,
    *,
    rtol: float,
    atol: float,
    max_steps: int,
    check_every: int,
    linear_solver: LinearSolver | None,
    shift: float,
    armijo: float,
):
    """Run the damped Newton iterations from ``z0 = (f, g)`` ``[B, n + m]``.

    Args:
        evaluate: ``z -> (objective [B], grad [B, n + m])`` of the negated dual.
        hessian: ``z -> (r [B, n], s [B, m], mask, W)``: the diagonal blocks and the
            off-diagonal block ``W`` restricted to ``mask`` (``[B, n, m]``).
        mass: ``sum(a)`` per problem (the scale of the marginal error).
        full_diagonal: ``[B]`` scale of the Hessian's diagonal for a fully active plan;
            the shift is ``delta = shift * max(mean(diag H), full_diagonal) * min(1,
            |grad|_1 / mass)``.
        linear_solver: ``None`` for a dense Cholesky factorization on small batches and
            ``CG(rtol=1e-2)`` otherwise; any ``LinearSolver`` (used matrix-free with a
            Jacobi preconditioner).

    Returns:
        ``(z, status, num_steps, residual)``, residual the marginal error ``|grad|_1``.
    """
    batch, size = z0.shape
    dense = linear_solver is None and batch * size**2 <= _DENSE_UP_TO
    linear_solver = CG(rtol=1e-2, atol=0.0) if linear_solver is None else linear_solver
    objective, grad = evaluate(z0)
    state = {"z": z0, "objective": objective, "grad": grad, "alpha": torch.ones_like(objective)}

    def step(st):
        z, grad = st["z"], st["grad"]
        rows, cols, mask, w = hessian(z)
        diag = torch.cat([rows, cols], 1)
        relative = (grad.abs().sum(1) / mass).clamp_max(1.0)
        delta = (shift * torch.maximum(diag.mean(1), full_diagonal) * relative)[:, None]
        if dense:
            w = torch.where(mask, w, 0.0)
            h = torch.cat([torch.cat([torch.diag_embed(rows), w], 2),
                           torch.cat([w.transpose(1, 2), torch.diag_embed(cols)], 2)], 1)
            eye = torch.eye(size, dtype=h.dtype, device=h.device)
            factor, info = torch.linalg.cholesky_ex(h + delta[:, :, None] * eye)
            # rounding can leave the gauge direction barely indefinite: a larger shift there
            for _ in range(3):
                failed = info != 0
                if not bool(failed.any()):
                    break
                delta = torch.where(failed[:, None], 1e3 * delta + 1e-8 * diag.amax(1, keepdim=True), delta)
                retry, info_retry = torch.linalg.cholesky_ex(h + delta[:, :, None] * eye)
                factor = torch.where(failed[:, None, None], retry, factor)
                info = torch.where(failed, info_retry, info)
            d = torch.cholesky_solve(-grad[:, :, None], factor)[:, :, 0]
        else:
            w_mv, w_rmv = masked_products(mask, w)

            def matvec(v):
                u, t = v[:, :n], v[:, n:]
                return torch.cat([rows * u + w_mv(t), cols * t + w_rmv(u)], 1) + delta * v

            inverse_diag = 1.0 / (diag + delta)
            operator = MatvecOperator(matvec, symmetric=True, positive_definite=True)
            preconditioner = MatvecOperator(lambda v: inverse_diag * v, symmetric=True, positive_definite=True)
            d = linear_solver.solve(operator, -grad, preconditioner=preconditioner).value
        alpha = st["alpha"]
        trial = z + alpha[:, None] * d
        obj_t, grad_t = evaluate(trial)
        # Armijo on the dual; near the optimum its decrease drowns in rounding, so a step
        # that halves the marginal error is accepted as well
        accept = torch.isfinite(obj_t) & torch.isfinite(grad_t).all(1) & (
            (obj_t <= st["objective"] + armijo * alpha * batch_dot(grad, d))
            | (grad_t.abs().sum(1) <= 0.5 * grad.abs().sum(1))
        )
        acc = accept[:, None]
        return {
            "z": torch.where(acc, trial, z),
            "objective": torch.where(accept, obj_t, st["objective"]),
            "grad": torch.where(acc, grad_t, grad),
            "alpha": torch.where(accept, torch.ones_like(alpha), 0.5 * alpha),
        }

    def residual(st):
        return st["grad"].abs().sum(1), mass

    state, status, num_steps, err = iterate(
        step, residual, state, rtol=rtol, atol=atol, max_steps=max_steps, check_every=check_every
    )
    return state["z"], status, num_steps, err
