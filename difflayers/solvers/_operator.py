"""Batched linear operators: dense matrices, matvec callables and Jacobians.

Every operator acts on ``[B, n]`` tensors and is block diagonal over the batch:
sample ``b`` of ``A @ x`` depends only on sample ``b`` of ``x``. Each operator knows
its transpose (``op.T``) and carries declared structure (``symmetric``,
``positive_definite``) that ``linear_solve`` uses to pick a solver.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import jvp, vjp, vmap

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "MatvecOperator",
    "JacobianOperator",
    "IdentityOperator",
    "aslinearoperator",
    "jvp_by_reverse_mode",
]


class LinearOperator:
    """A batched square linear map on ``[B, n]`` tensors.

    Subclasses implement ``mv`` and ``transpose``. Structure flags are declarations:
    they are not checked numerically (a solver that relies on them, CG for instance,
    reports ``Status.BREAKDOWN`` when they turn out false).
    """

    symmetric: bool = False
    positive_definite: bool = False

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transpose(self) -> LinearOperator:
        raise NotImplementedError

    @property
    def T(self) -> LinearOperator:
        """The transposed operator (``self`` when declared symmetric)."""
        return self if self.symmetric else self.transpose()

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.mv(x)

    def as_matrix(self, like: torch.Tensor) -> torch.Tensor:
        """Materialize the ``[B, n, n]`` matrix, applying ``mv`` to the columns of I.

        Args:
            like: a ``[B, n]`` tensor giving batch size, dtype and device.
        """
        batch, n = like.shape
        eye = torch.eye(n, dtype=like.dtype, device=like.device).expand(batch, n, n)
        try:
            columns = vmap(self.mv, in_dims=2, out_dims=2)(eye)
        except Exception:  # a matvec that vmap cannot trace: one column at a time
            columns = torch.stack([self.mv(eye[:, :, i].contiguous()) for i in range(n)], dim=2)
        return columns


class DenseOperator(LinearOperator):
    """A matrix ``[B, n, n]``, or ``[n, n]`` shared by the whole batch.

    Args:
        matrix: the matrix.
        symmetric: declare ``A == A^T``.
        positive_definite: declare ``A`` positive definite (implies nothing about
            symmetry; CG and Cholesky need both).
    """

    def __init__(self, matrix: torch.Tensor, *, symmetric: bool = False, positive_definite: bool = False):
        if matrix.dim() not in (2, 3) or matrix.shape[-1] != matrix.shape[-2]:
            raise ValueError(
                f"DenseOperator expects a square matrix of shape [n, n] or [B, n, n]; got shape {tuple(matrix.shape)}."
            )
        self.matrix = matrix
        self.symmetric = symmetric
        self.positive_definite = positive_definite

    @property
    def size(self) -> int:
        return self.matrix.shape[-1]

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix.dim() == 2:
            return x @ self.matrix.transpose(-1, -2)
        return torch.bmm(self.matrix, x.unsqueeze(-1)).squeeze(-1)

    def transpose(self) -> DenseOperator:
        return DenseOperator(
            self.matrix.transpose(-1, -2), symmetric=self.symmetric, positive_definite=self.positive_definite
        )

    def as_matrix(self, like: torch.Tensor) -> torch.Tensor:
        return self.matrix.expand(like.shape[0], *self.matrix.shape[-2:])


class MatvecOperator(LinearOperator):
    """An operator given by a batched matvec ``x [B, n] -> A x [B, n]``.

    Args:
        matvec: the product with ``A``; must be linear in ``x``.
        rmatvec: the product with ``A^T``. When omitted it is derived by reverse-mode
            differentiation of ``matvec`` (exact, since ``matvec`` is linear).
        symmetric, positive_definite: declared structure.
    """

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        *,
        rmatvec: Callable[[torch.Tensor], torch.Tensor] | None = None,
        symmetric: bool = False,
        positive_definite: bool = False,
    ):
        if not callable(matvec):
            raise TypeError(f"MatvecOperator expects a callable matvec, got {type(matvec).__name__}.")
        self.matvec = matvec
        self.rmatvec = rmatvec
        self.symmetric = symmetric
        self.positive_definite = positive_definite

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x)

    def transpose(self) -> MatvecOperator:
        if self.rmatvec is not None:
            rmatvec = self.rmatvec
        else:
            matvec = self.matvec

            def rmatvec(u):
                # A is linear, so its vjp at any point (zero here) is u -> A^T u.
                return vjp(matvec, torch.zeros_like(u))[1](u)[0]

        return MatvecOperator(
            rmatvec, rmatvec=self.matvec, symmetric=self.symmetric, positive_definite=self.positive_definite
        )


class JacobianOperator(LinearOperator):
    """The Jacobian ``dF/dz`` of a batched map ``F: [B, n] -> [B, n]`` at ``z``.

    Products with ``J`` use forward mode (``torch.func.jvp``), or with
    ``forward_ad=False`` two reverse passes (``J v`` is the vjp of the linear map
    ``u -> J^T u``), for contexts where forward mode cannot nest. Products with ``J^T``
    use a reverse-mode pullback computed once and reused.

    Args:
        fn: the map; sample ``b`` of ``fn(z)`` may depend only on sample ``b`` of ``z``.
        z: the linearization point ``[B, n]``.
        symmetric: declare ``J`` symmetric (true for the Hessian of an objective).
        positive_definite: declare ``J`` positive definite.
        forward_ad: compute ``J v`` by forward mode or by double reverse mode; ``None``
            (default) uses forward mode unless a ``torch.autograd.forward_ad`` dual level
            is active, inside which forward mode cannot nest.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        z: torch.Tensor,
        *,
        symmetric: bool = False,
        positive_definite: bool = False,
        forward_ad: bool | None = None,
    ):
        self.fn = fn
        self.z = z
        self.symmetric = symmetric
        self.positive_definite = positive_definite
        self.forward_ad = forward_ad
        self._pullback = None

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric and self.forward_ad is None:
            # J = J^T: replaying the cached pullback is cheaper than a forward-mode pass,
            # which re-evaluates fn on every product.
            return self._rmv(x)
        forward = self.forward_ad if self.forward_ad is not None else not _inside_dual_level()
        if forward:
            return jvp(self.fn, (self.z,), (x,))[1]
        return jvp_by_reverse_mode(self.fn, (self.z,), (x,))

    def _rmv(self, u: torch.Tensor) -> torch.Tensor:
        if self._pullback is None:
            self._pullback = vjp(self.fn, self.z)[1]
        return self._pullback(u)[0]

    def transpose(self) -> LinearOperator:
        return MatvecOperator(
            self._rmv, rmatvec=self.mv, symmetric=self.symmetric, positive_definite=self.positive_definite
        )


class IdentityOperator(LinearOperator):
    """The identity, used as the default (absent) preconditioner."""

    symmetric = True
    positive_definite = True

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def transpose(self) -> IdentityOperator:
        return self

    def as_matrix(self, like: torch.Tensor) -> torch.Tensor:
        batch, n = like.shape
        return torch.eye(n, dtype=like.dtype, device=like.device).expand(batch, n, n)


def _inside_dual_level() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (forward mode then
    cannot nest)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def jvp_by_reverse_mode(fn: Callable[..., torch.Tensor], primals: tuple, tangents: tuple) -> torch.Tensor:
    """``J v`` of ``fn`` at ``primals`` without forward mode.

    The pullback ``u -> J^T u`` is linear in ``u``; its own pullback applied to ``v``
    is ``J v``. Costs two reverse passes; used where forward-mode AD cannot nest
    (inside the ``jvp`` of a custom autograd Function).
    """
    out, pullback = vjp(fn, *primals)
    _, pullback_of_pullback = vjp(pullback, torch.zeros_like(out))
    return pullback_of_pullback(tuple(tangents))[0]


def aslinearoperator(
    A: LinearOperator | torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    *,
    symmetric: bool = False,
    positive_definite: bool = False,
) -> LinearOperator:
    """Wrap a tensor or a matvec callable as a ``LinearOperator``.

    An existing ``LinearOperator`` is returned unchanged (its own structure flags win
    unless the keyword flags add structure, in which case it is an error to pass both).
    """
    if isinstance(A, LinearOperator):
        if (symmetric and not A.symmetric) or (positive_definite and not A.positive_definite):
            raise ValueError(
                "Structure flags were passed for an existing LinearOperator that does not declare them; "
                "set symmetric/positive_definite when constructing the operator instead."
            )
        return A
    if isinstance(A, torch.Tensor):
        return DenseOperator(A, symmetric=symmetric, positive_definite=positive_definite)
    if callable(A):
        return MatvecOperator(A, symmetric=symmetric, positive_definite=positive_definite)
    raise TypeError(
        f"Expected a LinearOperator, a tensor of shape [B, n, n] or [n, n], or a callable matvec; "
        f"got {type(A).__name__}."
    )
