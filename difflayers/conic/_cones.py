"""The cone of a cone program: ``K = {0}^zero x R_+^nonneg x SOC(d_1) x ... x SOC(d_k)``.

Rows of ``A x + s = b`` are ordered as the cones are listed (the order cvxpy's cone
programs use): first the equality rows (``s = 0``), then the inequality rows
(``s >= 0``), then one block of ``d_i`` rows per second-order cone
``{(t, u) : ||u||_2 <= t}``.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Cones"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cones:
    """Sizes of the cones of a cone program, shared by every element of a batch.

    Args:
        zero: number of equality rows (the zero cone; its dual is free).
        nonneg: number of inequality rows (the nonnegative orthant).
        soc: dimension of each second-order cone, in row order (each >= 1).

    Example:
        >>> Cones(zero=2, nonneg=3, soc=(3, 4)).dim
        12
    """

    zero: int = 0
    nonneg: int = 0
    soc: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("zero", "nonneg"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Cones: {name} must be an int >= 0, got {value!r}.")
        soc = tuple(self.soc)
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in soc):
            raise ValueError(f"Cones: soc must list cone dimensions, each an int >= 1; got {self.soc!r}.")
        object.__setattr__(self, "soc", soc)

    @property
    def dim(self) -> int:
        """Number of rows ``m`` of ``A`` and ``b``."""
        return self.zero + self.nonneg + sum(self.soc)

    @property
    def degree(self) -> int:
        """Barrier degree: one per inequality row and one per second-order cone."""
        return self.nonneg + len(self.soc)

    @property
    def num_inequality(self) -> int:
        """Rows outside the zero cone (``nonneg + sum(soc)``)."""
        return self.nonneg + sum(self.soc)
