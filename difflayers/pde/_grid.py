"""Structured grids, boundary conditions and the matrix-free diffusion operator.

Unknowns live at the centres of the cells of a uniform box grid in 1, 2 or 3
dimensions (cell-centred finite volumes). Every operator takes fields shaped
``[B, *grid.shape]``; coefficients may also be unbatched (``grid.shape``) or scalars,
and broadcast over the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import torch

__all__ = ["Grid", "Dirichlet", "Neumann", "Robin", "Boundary", "diffusion", "diffusion_diagonal"]

Value = Union[float, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Robin:
    """Robin condition ``alpha u + beta k du/dn = value`` on one side (``n`` outward).

    ``value`` is a float or a tensor broadcastable to the side's face field
    ``[B, *face_shape]`` (``face_shape`` is ``grid.shape`` without the side's axis).
    To differentiate with respect to boundary data, build the condition inside the
    residual from one of its tensor arguments.

    Args:
        alpha: weight of ``u`` (>= 0).
        beta: weight of the normal flux ``k du/dn`` (>= 0); ``alpha + beta > 0``.
        value: the right-hand side (a finite float, or a tensor).
    """

    alpha: float
    beta: float
    value: Value = 0.0

    def __post_init__(self):
        if not (self.alpha >= 0 and self.beta >= 0 and self.alpha + self.beta > 0):
            raise ValueError(
                f"Robin: need alpha >= 0, beta >= 0 and alpha + beta > 0; got alpha={self.alpha!r}, "
                f"beta={self.beta!r}."
            )
        if not isinstance(self.value, torch.Tensor) and not math.isfinite(self.value):
            raise ValueError(f"Robin: value must be finite; got {self.value!r}. Use a finite boundary value.")

    def homogeneous(self) -> Robin:
        """The same condition with ``value = 0`` (the linear part of the operator)."""
        return Robin(self.alpha, self.beta, 0.0)


def Dirichlet(value: Value = 0.0) -> Robin:
    """Dirichlet condition ``u = value`` (``Robin(1, 0, value)``)."""
    return Robin(1.0, 0.0, value)


def Neumann(flux: Value = 0.0) -> Robin:
    """Neumann condition ``k du/dn = flux``, ``n`` the outward normal (``Robin(0, 1, flux)``)."""
    return Robin(0.0, 1.0, flux)


#: One condition for every side, or one ``(low, high)`` pair per axis.
Boundary = Union[Robin, Sequence[tuple[Robin, Robin]]]


@dataclasses.dataclass(frozen=True)
class Grid:
    """A uniform cell-centred grid on the box ``[lower, upper]``.

    Args:
        shape: number of cells along each axis (1 to 3 axes, each >= 1).
        lower: lower corner of the box (default the origin).
        upper: upper corner of the box (default all ones).

    Example:
        >>> g = Grid((4, 8))
        >>> g.spacing
        (0.25, 0.125)
    """

    shape: tuple[int, ...]
    lower: tuple[float, ...] | None = None
    upper: tuple[float, ...] | None = None

    def __post_init__(self):
        shape = tuple(self.shape)
        if not 1 <= len(shape) <= 3 or not all(isinstance(n, int) and n >= 1 for n in shape):
            raise ValueError(f"Grid: shape must be 1 to 3 positive ints; got {self.shape!r}.")
        object.__setattr__(self, "shape", shape)
        lower = (0.0,) * len(shape) if self.lower is None else tuple(float(v) for v in self.lower)
        upper = (1.0,) * len(shape) if self.upper is None else tuple(float(v) for v in self.upper)
        if len(lower) != len(shape) or len(upper) != len(shape) or any(u <= lo for lo, u in zip(lower, upper)):
            raise ValueError(
                f"Grid: lower and upper must have one entry per axis ({len(shape)}) with upper > lower; "
                f"got lower={self.lower!r}, upper={self.upper!r}."
            )
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of cells (unknowns)."""
        return math.prod(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple((u - lo) / n for lo, u, n in zip(self.lower, self.upper, self.shape))

    @property
    def cell_volume(self) -> float:
        return math.prod(self.spacing)

    def centers(self, dtype=torch.float64, device=None) -> tuple[torch.Tensor, ...]:
        """Cell-centre coordinates, one tensor of shape ``grid.shape`` per axis."""
        axes = [
            lo + (torch.arange(n, dtype=dtype, device=device) + 0.5) * h
            for lo, n, h in zip(self.lower, self.shape, self.spacing)
        ]
        return torch.meshgrid(*axes, indexing="ij")

    def can_coarsen(self) -> bool:
        return all(n % 2 == 0 and n >= 2 for n in self.shape)

    def coarsen(self) -> Grid:
        """The grid with every pair of cells along each axis merged."""
        if not self.can_coarsen():
            raise ValueError(f"Grid: cannot coarsen shape {self.shape}; every axis needs an even number of cells.")
        return Grid(tuple(n // 2 for n in self.shape), self.lower, self.upper)

    def check_field(self, name: str, field: torch.Tensor, *, batched: bool | None = None) -> None:
        """Raise ``ValueError`` unless ``field`` is shaped ``grid.shape`` or ``[B, *grid.shape]``.

        Args:
            name: the field's name, for the message.
            field: the tensor.
            batched: require a batch dimension (``True``), forbid it (``False``) or
                accept both (``None``).
        """
        if not isinstance(field, torch.Tensor):
            raise TypeError(f"{name} must be a tensor shaped {self.shape} or [B, *{self.shape}]; got "
                            f"{type(field).__name__}.")
        trailing = tuple(field.shape[-self.ndim:]) if field.dim() >= self.ndim else None
        ok = trailing == self.shape and field.dim() in (self.ndim, self.ndim + 1)
        if batched is True:
            ok = ok and field.dim() == self.ndim + 1
        if batched is False:
            ok = ok and field.dim() == self.ndim
        if not ok:
            raise ValueError(
                f"{name} has shape {tuple(field.shape)}, which does not match the grid of shape {self.shape}: "
                f"expected {self.shape}" + ("" if batched is False else f" or [B, *{self.shape}]")
                + ". Interpolate it to the grid or build the grid with the field's shape."
            )


def boundary_sides(bc: Boundary, ndim: int) -> list[tuple[Robin, Robin]]:
    """Normalize a ``Boundary`` to one ``(low, high)`` pair of ``Robin`` per axis."""
    if isinstance(bc, Robin):
        return [(bc, bc)] * ndim
    sides = list(bc)
    if len(sides) != ndim or not all(
        isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(c, Robin) for c in p) for p in sides
    ):
        raise ValueError(
            f"bc must be one condition (Dirichlet(), Neumann(), Robin(...)) or {ndim} (low, high) pairs of "
            f"conditions, one pair per axis; got {bc!r}."
        )
    return [tuple(p) for p in sides]


def _diff(x: torch.Tensor, dim: int) -> torch.Tensor:
    # Slicing rather than torch.diff, which is slow under torch.func transforms.
    n = x.shape[dim]
    return x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)


def _harmonic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Harmonic mean: the exact face coefficient of a 1-D layered medium, so that
    # coefficient jumps (void / solid) do not leak flux.
    return 2.0 * a * b / (a + b)


def _boundary_factor(cond: Robin, k_c: torch.Tensor, h: float):
    """``(s, denominator)`` of the boundary flux ``q_out = -s (value - alpha u_c) / denominator``.

    With the boundary value ``u_b`` half a cell away, ``k du/dn ~ s (u_b - u_c)`` with
    ``s = 2 k_c / h``; eliminating ``u_b`` from ``alpha u_b + beta k du/dn = value`` gives
    the outward flux ``q_out = -k du/dn = -s (value - alpha u_c) / (alpha + beta s)``.
    """
    s = 2.0 * k_c / h
    return s, cond.alpha + cond.beta * s


def diffusion(u: torch.Tensor, k: torch.Tensor | float, grid: Grid, bc: Boundary) -> torch.Tensor:
    r"""Apply the finite-volume operator of ``-div(k grad u)`` with boundary conditions.

    For each cell ``c`` of volume ``|c|`` the operator is the net outward flux
    ``(1/|c|) sum_faces |f| q_f``. On an interior face between cells ``c`` and ``c'``
    at distance ``h``, ``q = -k_f (u_{c'} - u_c) / h`` with the harmonic mean
    ``k_f = 2 k_c k_{c'} / (k_c + k_{c'})``. On a boundary face carrying
    ``alpha u + beta k du/dn = g``, ``q = -s (g - alpha u_c) / (alpha + beta s)`` with
    ``s = 2 k_c / h`` (the boundary half a cell away). For smooth data the scheme is
    second-order accurate: the discrete solution converges like ``h^2``.

    The operator is affine in ``u`` (linear when every boundary value is zero); it is
    symmetric positive definite in the cell-volume inner product for ``k > 0`` and
    at least one side with ``alpha > 0``.

    Args:
        u: the field ``[B, *grid.shape]``.
        k: the coefficient at cell centres: a float, ``grid.shape`` or
            ``[B, *grid.shape]``; must be positive (not checked here: ``PDELayer``
            checks the arguments named in ``positive=``).
        grid: the grid.
        bc: boundary conditions (see ``Boundary``).

    Returns:
        ``-div(k grad u)`` at cell centres, shaped like ``u``.

    Example:
        >>> g = Grid((8, 8))
        >>> u = torch.zeros(1, 8, 8, dtype=torch.float64)
        >>> float(diffusion(u, 1.0, g, Dirichlet(1.0)).abs().max())   # corner cell: two faces, 2 g / h^2 each
        256.0

    References:
        LeVeque, Finite Volume Methods for Hyperbolic Problems (2002), chapter 4,
            DOI 10.1017/CBO9780511791253.
        Eymard, Gallouet & Herbin, Finite volume methods (2000), section 9,
            DOI 10.1016/S1570-8659(00)07005-8.
    """
    grid.check_field("u", u, batched=True)
    k = _coefficient(k, u, grid)
    sides = boundary_sides(bc, grid.ndim)
    out = None
    # Written with few operations and tensors on the left of every scalar operation:
    # Newton-Krylov applies this operator under torch.func.jvp, where each elementwise
    # operation carries a fixed overhead (and scalar-first subtraction a large one).
    for axis, h in enumerate(grid.spacing):
        dim = axis + 1
        n = u.shape[dim]
        low_c, high_c = sides[axis]
        # Fluxes along +axis, pre-divided by h: the divergence is then one difference.
        inward_low = _inward_flux(low_c, k.narrow(dim, 0, 1), u.narrow(dim, 0, 1), h, dim, grid.ndim)
        inward_high = _inward_flux(high_c, k.narrow(dim, n - 1, 1), u.narrow(dim, n - 1, 1), h, dim, grid.ndim)
        parts = [inward_low]
        if n > 1:
            kf = _harmonic(k.narrow(dim, 0, n - 1), k.narrow(dim, 1, n - 1))
            parts.append(kf * _diff(u, dim) * (-1.0 / h**2))
        parts.append(-inward_high)
        term = _diff(torch.cat(parts, dim=dim), dim)
        out = term if out is None else out + term
    return out


def _inward_flux(cond: Robin, k_c: torch.Tensor, u_c: torch.Tensor, h: float, dim: int, ndim: int) -> torch.Tensor:
    """``-q_out / h`` on one boundary face layer (see ``_boundary_factor``)."""
    value = _face_value(cond.value, dim, ndim)
    zero = not isinstance(value, torch.Tensor) and value == 0
    if cond.beta == 0:  # Dirichlet: s (g / alpha - u_c)
        diff = u_c if zero else u_c - value / cond.alpha
        return k_c * diff * (-2.0 / h**2)
    if cond.alpha == 0:  # Neumann: g / beta
        if zero:
            return torch.zeros_like(u_c)
        flux = value * (1.0 / (cond.beta * h))
        return flux.expand_as(u_c) if isinstance(flux, torch.Tensor) else torch.full_like(u_c, flux)
    s = k_c * (2.0 / h)
    num = u_c * (-cond.alpha) if zero else u_c * (-cond.alpha) + value
    return s * num / (s * cond.beta + cond.alpha) * (1.0 / h)


def diffusion_diagonal(k: torch.Tensor | float, grid: Grid, bc: Boundary, like: torch.Tensor) -> torch.Tensor:
    """Diagonal of the linear part of ``diffusion`` (for Jacobi smoothing/preconditioning).

    Args:
        k: the coefficient, as for ``diffusion``.
        grid, bc: as for ``diffusion`` (boundary values are irrelevant).
        like: a ``[B, *grid.shape]`` tensor giving batch size, dtype and device.

    Returns:
        ``[B, *grid.shape]`` (``[1, *grid.shape]`` when ``k`` is unbatched).
    """
    k = _coefficient(k, like, grid, expand=False)
    sides = boundary_sides(bc, grid.ndim)
    diag = torch.zeros_like(k)
    for axis, h in enumerate(grid.spacing):
        dim = axis + 1
        n = k.shape[dim]
        low_c, high_c = sides[axis]
        k_lo, k_hi = k.narrow(dim, 0, 1), k.narrow(dim, n - 1, 1)
        s, den = _boundary_factor(low_c, k_lo, h)
        d_low = s * low_c.alpha / den
        s, den = _boundary_factor(high_c, k_hi, h)
        d_high = s * high_c.alpha / den
        if n > 1:
            kf = _harmonic(k.narrow(dim, 0, n - 1), k.narrow(dim, 1, n - 1)) / h
            left = torch.cat([d_low, kf], dim=dim)  # face below each cell
            right = torch.cat([kf, d_high], dim=dim)  # face above each cell
        else:
            left, right = d_low, d_high
        diag = diag + (left + right) / h
    return diag


def _coefficient(k, u: torch.Tensor, grid: Grid, expand: bool = True) -> torch.Tensor:
    """``k`` as a ``[B or 1, *grid.shape]`` tensor of ``u``'s dtype and device."""
    if not isinstance(k, torch.Tensor):
        k = torch.as_tensor(float(k), dtype=u.dtype, device=u.device)
    if k.dim() == 0:
        k = k.expand(grid.shape)
    grid.check_field("the coefficient k", k)
    if k.dim() == grid.ndim:
        k = k.unsqueeze(0)
    if k.shape[0] not in (1, u.shape[0]):
        raise ValueError(
            f"the coefficient k has batch size {k.shape[0]} but the field has {u.shape[0]}; pass one coefficient "
            "per sample or one shared by the batch."
        )
    return k.expand(u.shape) if expand else k


def _face_value(value, dim: int, ndim: int):
    """A boundary value as a float, or a tensor with a singleton normal axis inserted."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == ndim:  # [B, *face]
        return value.unsqueeze(dim)
    if value.dim() == ndim - 1:  # [*face], shared by the batch
        return value.unsqueeze(dim - 1)
    raise ValueError(
        f"a boundary value has shape {tuple(value.shape)}; expected the face shape ({ndim - 1} dims) or "
        f"[B, *face] ({ndim} dims)."
    )
