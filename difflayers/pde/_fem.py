"""Q4 bilinear finite elements for plane-stress linear elasticity on a structured mesh."""

from __future__ import annotations

import torch

from ..solvers import DenseOperator
from ._banded import BlockTridiagonalOperator

__all__ = ["ElasticityQ4", "q4_stiffness"]


def q4_stiffness(nu: float = 0.3, E: float = 1.0, dtype=torch.float64, device=None) -> torch.Tensor:
    r"""Stiffness matrix ``[8, 8]`` of a unit-square bilinear (Q4) plane-stress element.

    ``K_e = \int B^T D B`` with ``D = E / (1 - nu^2) [[1, nu, 0], [nu, 1, 0], [0, 0, (1 - nu) / 2]]``,
    integrated exactly; degrees of freedom ordered as in Andreassen et al. (2011):
    ``(x, y)`` of the lower-left, lower-right, upper-right, upper-left nodes.

    Example:
        >>> KE = q4_stiffness(0.3)
        >>> KE.shape, bool(torch.allclose(KE, KE.T))
        (torch.Size([8, 8]), True)

    References:
        Andreassen, Clausen, Schevenels, Lazarov & Sigmund, Efficient topology optimization
            in MATLAB using 88 lines of code (2011), DOI 10.1007/s00158-010-0594-7.
    """
    k = [1 / 2 - nu / 6, 1 / 8 + nu / 8, -1 / 4 - nu / 12, -1 / 8 + 3 * nu / 8,
         -1 / 4 + nu / 12, -1 / 8 - nu / 8, nu / 6, 1 / 8 - 3 * nu / 8]
    order = [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [1, 0, 7, 6, 5, 4, 3, 2],
        [2, 7, 0, 5, 6, 3, 4, 1],
        [3, 6, 5, 0, 7, 2, 1, 4],
        [4, 5, 6, 7, 0, 1, 2, 3],
        [5, 4, 3, 2, 1, 0, 7, 6],
        [6, 3, 4, 1, 2, 7, 0, 5],
        [7, 2, 1, 4, 3, 6, 5, 0],
    ]
    kv = torch.tensor(k, dtype=dtype, device=device)
    return E / (1 - nu**2) * kv[torch.tensor(order, device=device)]


class ElasticityQ4:
    r"""Plane-stress elasticity on an ``nely x nelx`` mesh of unit Q4 elements (SIMP moduli).

    Element ``e`` has Young's modulus ``E_e(x) = E_min + x_e^p (E_0 - E_min)`` for a
    density ``x_e`` in ``[0, 1]``; the global stiffness is
    ``K(x) = sum_e E_e(x) K_e`` (``K_e`` from ``q4_stiffness``). Nodes are numbered
    column by column from the top-left corner, ``node = (nely + 1) * col + row``, with
    degrees of freedom ``2 node`` (x) and ``2 node + 1`` (y), as in the 88-line code.
    Fixed degrees of freedom are eliminated; the unknowns are the free displacements
    ``[B, n_free]`` and densities are fields ``[B, nely, nelx]`` (or ``[nely, nelx]``).

    The residual of the equilibrium ``K(x) u = f`` is ``residual(u, x) = K(x) u - f``
    (matrix-free, batched); ``stiffness(x)`` assembles the dense ``K(x)`` on the free
    degrees of freedom for direct solves.

    Args:
        nelx, nely: elements along x and y.
        fixed: indices of fixed degrees of freedom (zero displacement).
        force: load vector over all ``2 (nelx + 1)(nely + 1)`` degrees of freedom.
        penal: SIMP exponent ``p``.
        E0, Emin: solid and void Young's moduli.
        nu: Poisson's ratio.

    Example:
        >>> fem = ElasticityQ4.mbb(60, 20)
        >>> x = torch.full((1, 20, 60), 0.5, dtype=torch.float64)
        >>> K = fem.stiffness(x)
        >>> u = torch.linalg.solve(K.matrix, fem.f_free.expand(1, -1))
        >>> round(float(fem.compliance(u)), 4)
        1007.0221

    References:
        Bendsoe & Sigmund, Topology Optimization (2003), DOI 10.1007/978-3-662-05086-6.
        Andreassen et al. (2011), DOI 10.1007/s00158-010-0594-7.
    """

    def __init__(self, nelx: int, nely: int, fixed: torch.Tensor, force: torch.Tensor, *, penal: float = 3.0,
                 E0: float = 1.0, Emin: float = 1e-9, nu: float = 0.3):
        if nelx < 1 or nely < 1:
            raise ValueError(f"ElasticityQ4: nelx and nely must be >= 1; got {nelx}, {nely}.")
        if not (penal > 0 and E0 > 0 and 0 <= Emin < E0 and -1 < nu <= 0.5):
            raise ValueError(
                f"ElasticityQ4: need penal > 0, E0 > 0, 0 <= Emin < E0 and -1 < nu <= 0.5 (a positive definite "
                f"stiffness); got penal={penal!r}, E0={E0!r}, Emin={Emin!r}, nu={nu!r}."
            )
        self.nelx, self.nely = nelx, nely
        self.penal, self.E0, self.Emin = float(penal), float(E0), float(Emin)
        self.ndof = 2 * (nelx + 1) * (nely + 1)
        if force.shape[-1] != self.ndof:
            raise ValueError(f"ElasticityQ4: force must have {self.ndof} entries; got shape {tuple(force.shape)}.")
        dtype, device = force.dtype, force.device
        self.KE = q4_stiffness(nu, 1.0, dtype, device)
        elx = torch.arange(nelx, device=device).repeat_interleave(nely)
        ely = torch.arange(nely, device=device).repeat(nelx)
        n1 = (nely + 1) * elx + ely
        n2 = (nely + 1) * (elx + 1) + ely
        # Element e = ely + nely * elx (column-major over the [nely, nelx] density field).
        self.edof = torch.stack([2 * n1 + 2, 2 * n1 + 3, 2 * n2 + 2, 2 * n2 + 3, 2 * n2, 2 * n2 + 1, 2 * n1, 2 * n1 + 1],
                                dim=1)
        mask = torch.ones(self.ndof, dtype=torch.bool, device=device)
        mask[fixed] = False
        self.free = mask.nonzero().flatten()
        # Scatter pattern of the element matrices into the free-dof stiffness.
        nf = self.free.numel()
        position = torch.full((self.ndof,), -1, dtype=torch.int64, device=device)
        position[self.free] = torch.arange(nf, device=device)
        rows = position[self.edof[:, :, None].expand(-1, 8, 8)].reshape(-1)
        cols = position[self.edof[:, None, :].expand(-1, 8, 8)].reshape(-1)
        self._keep = ((rows >= 0) & (cols >= 0)).nonzero().flatten()
        self._target = (rows * nf + cols)[self._keep]
        # The same pattern into block-tridiagonal storage: one block per column of nodes.
        size, m = 2 * (nely + 1), nelx + 1
        ga = self.edof[:, :, None].expand(-1, 8, 8).reshape(-1)
        gb = self.edof[:, None, :].expand(-1, 8, 8).reshape(-1)
        ja, la, jb, lb = ga // size, ga % size, gb // size, gb % size
        both_free = mask[ga] & mask[gb]
        in_diag = both_free & (ja == jb)
        in_lower = both_free & (ja == jb + 1)
        target = torch.where(in_diag, (ja * size + la) * size + lb, m * size * size + (jb * size + la) * size + lb)
        self._block_keep = (in_diag | in_lower).nonzero().flatten()
        self._block_target = target[self._block_keep]
        fixed_dofs = (~mask).nonzero().flatten()
        self._block_unit = ((fixed_dofs // size) * size + fixed_dofs % size) * size + fixed_dofs % size
        self._block_shape = (m, size)
        self.force = force
        self.f_free = force[..., self.free]

    @classmethod
    def mbb(cls, nelx: int, nely: int, *, dtype=torch.float64, device=None, **kwargs) -> ElasticityQ4:
        """Half MBB beam: unit downward load at the top-left node, symmetry (x fixed) on the left
        edge, roller (y fixed) at the bottom-right node."""
        ndof = 2 * (nelx + 1) * (nely + 1)
        force = torch.zeros(ndof, dtype=dtype, device=device)
        force[1] = -1.0
        fixed = torch.cat([torch.arange(0, 2 * (nely + 1), 2, device=device),
                           torch.tensor([ndof - 1], device=device)])
        return cls(nelx, nely, fixed, force, **kwargs)

    @classmethod
    def cantilever(cls, nelx: int, nely: int, *, dtype=torch.float64, device=None, **kwargs) -> ElasticityQ4:
        """Cantilever: left edge clamped, unit downward load at the middle of the right edge."""
        ndof = 2 * (nelx + 1) * (nely + 1)
        force = torch.zeros(ndof, dtype=dtype, device=device)
        force[2 * ((nely + 1) * nelx + nely // 2) + 1] = -1.0
        fixed = torch.arange(0, 2 * (nely + 1), device=device)
        return cls(nelx, nely, fixed, force, **kwargs)

    def moduli(self, x: torch.Tensor) -> torch.Tensor:
        """``E_e(x)`` per element ``[B, n_el]`` (column-major) from densities ``[B, nely, nelx]``."""
        if x.shape[-2:] != (self.nely, self.nelx):
            raise ValueError(
                f"ElasticityQ4: densities must be shaped [B, {self.nely}, {self.nelx}] (nely, nelx); "
                f"got {tuple(x.shape)}."
            )
        if x.dim() == 2:
            x = x.unsqueeze(0)
        xe = x.transpose(-1, -2).reshape(x.shape[0], self.nelx * self.nely)
        return self.Emin + xe.pow(self.penal) * (self.E0 - self.Emin)

    def full(self, u_free: torch.Tensor) -> torch.Tensor:
        """Free displacements ``[B, n_free]`` -> all displacements ``[B, ndof]`` (zeros where fixed)."""
        u = u_free.new_zeros(u_free.shape[0], self.ndof)
        return u.index_copy(1, self.free, u_free)

    def apply(self, u_free: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``K(x) u`` on the free degrees of freedom, matrix-free."""
        E = self.moduli(x)
        ue = self.full(u_free)[:, self.edof]  # [B, n_el, 8]
        fe = (ue @ self.KE) * E[..., None]  # K_e is symmetric
        out = u_free.new_zeros(u_free.shape[0], self.ndof)
        out = out.index_add(1, self.edof.flatten(), fe.reshape(u_free.shape[0], fe.shape[1:].numel()))
        return out[:, self.free]

    def residual(self, u_free: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``K(x) u - f`` on the free degrees of freedom."""
        return self.apply(u_free, x) - self.f_free

    def stiffness(self, x: torch.Tensor) -> DenseOperator:
        """Dense ``K(x)`` on the free degrees of freedom, ``[B, n_free, n_free]``."""
        E = self.moduli(x)
        batch = E.shape[0]
        values = (E[:, :, None, None] * self.KE).reshape(batch, E.shape[1] * 64)[:, self._keep]
        nf = self.free.numel()
        K = values.new_zeros(batch, nf * nf).index_add(1, self._target, values).reshape(batch, nf, nf)
        return DenseOperator(K, symmetric=True, positive_definite=True)

    def stiffness_blocks(self, x: torch.Tensor) -> BlockTridiagonalOperator:
        """``K(x)`` on the free degrees of freedom as a block-tridiagonal operator.

        Nodes are numbered column by column, so ``K`` couples only neighbouring node
        columns: ``nelx + 1`` diagonal blocks of size ``2 (nely + 1)``. Fixed degrees of
        freedom get a unit diagonal and zero coupling, so the free-free block is exact.
        """
        E = self.moduli(x)
        batch = E.shape[0]
        m, size = self._block_shape
        values = (E[:, :, None, None] * self.KE).reshape(batch, E.shape[1] * 64)[:, self._block_keep]
        flat = values.new_zeros(batch, (2 * m - 1) * size * size).index_add(1, self._block_target, values)
        flat = flat.index_add(1, self._block_unit, flat.new_ones(batch, self._block_unit.numel()))
        diag = flat[:, : m * size * size].reshape(batch, m, size, size)
        lower = flat[:, m * size * size :].reshape(batch, m - 1, size, size)
        return BlockTridiagonalOperator(diag, lower, self.free)

    def compliance(self, u_free: torch.Tensor) -> torch.Tensor:
        """``c = f^T u`` per sample ``[B]``."""
        return (u_free * self.f_free).sum(dim=-1)

    def element_energy(self, u_free: torch.Tensor) -> torch.Tensor:
        """``u_e^T K_e u_e`` per element ``[B, nely, nelx]`` (the SIMP sensitivity kernel)."""
        ue = self.full(u_free)[:, self.edof]
        ce = ((ue @ self.KE) * ue).sum(-1)
        return ce.reshape(-1, self.nelx, self.nely).transpose(-1, -2)
