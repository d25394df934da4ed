"""Adjoint-consistency check of a discrete PDE residual's Jacobian."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["AdjointConsistencyResult", "adjoint_consistency"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdjointConsistencyResult:
    """Outcome of :func:`adjoint_consistency`.

    Attributes:
        errors: per direction pair, ``|<J v, w> - <v, J^T w>| / max(||J v|| ||w||, ||v|| ||J^T w||)``.
        asymmetry: per pair, ``|<J v, w> - <J w, v>| / (||J v|| ||w|| + ||J w|| ||v||)``: zero
            for a symmetric Jacobian, of order one for a genuinely non-symmetric one.
        rtol: the tolerance ``errors`` were held to.
    """

    errors: tuple[float, ...]
    asymmetry: tuple[float, ...]
    rtol: float

    @property
    def passed(self) -> bool:
        return all(e <= self.rtol for e in self.errors)


def adjoint_consistency(
    residual: Callable[..., Tensor],
    u: Tensor,
    *theta: Tensor,
    directions: int = 3,
    seed: int = 0,
    rtol: float = 1e-12,
) -> AdjointConsistencyResult:
    r"""Check ``<J v, w> = <v, J^T w>`` for the Jacobian ``J = dR/du`` of a residual at ``u``.

    ``J v`` comes from forward mode (``torch.func.jvp``), ``J^T w`` from reverse mode
    (``torch.func.vjp``), the two products an adjoint PDE solve relies on; ``v`` and
    ``w`` are random and independent. The result also reports how far ``J`` is from
    symmetric (``<J v, w>`` against ``<J w, v>``), so a test can make sure it exercises a
    non-symmetric Jacobian, where using ``J`` in place of ``J^T`` would go unnoticed on a
    symmetric one.

    Args:
        residual: ``R(u, *theta)`` returning a tensor shaped like ``u``.
        u: the linearization point (float64).
        *theta: the other arguments of the residual (held fixed).
        directions: number of random pairs ``(v, w)``.
        seed: seed of the directions.
        rtol: tolerance on the relative error (roundoff level by default).

    Returns:
        :class:`AdjointConsistencyResult`.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> r = adjoint_consistency(lambda u: u @ A.T + u**3, torch.ones(1, 2, dtype=torch.float64))
        >>> r.passed, r.asymmetry[0] > 1e-3
        (True, True)
    """
    if not isinstance(u, Tensor) or u.dtype != torch.float64:
        raise TypeError("adjoint_consistency: u must be a float64 tensor.")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fn = lambda z: residual(z, *theta)  # noqa: E731
    out, pullback = torch.func.vjp(fn, u)
    if out.shape != u.shape:
        raise ValueError(f"adjoint_consistency: the residual returned shape {tuple(out.shape)}; expected "
                         f"{tuple(u.shape)}, the shape of u.")
    errors, asymmetry = [], []
    for _ in range(directions):
        v = torch.randn(u.shape, dtype=u.dtype, generator=gen).to(u.device)
        w = torch.randn(u.shape, dtype=u.dtype, generator=gen).to(u.device)
        Jv = torch.func.jvp(fn, (u,), (v,))[1]
        Jw = torch.func.jvp(fn, (u,), (w,))[1]
        JTw = pullback(w)[0]
        lhs, rhs = float((Jv * w).sum()), float((v * JTw).sum())
        scale = max(float(Jv.norm() * w.norm()), float(v.norm() * JTw.norm()), torch.finfo(u.dtype).tiny)
        errors.append(abs(lhs - rhs) / scale)
        sym = float((Jw * v).sum())
        asymmetry.append(abs(lhs - sym) / (float(Jv.norm() * w.norm() + Jw.norm() * v.norm()) or 1.0))
    return AdjointConsistencyResult(errors=tuple(errors), asymmetry=tuple(asymmetry), rtol=rtol)
