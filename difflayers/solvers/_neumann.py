"""Truncated Neumann series (Richardson iteration) for operators close to the identity."""

from __future__ import annotations

import dataclasses

from ._linear import KrylovSolver

__all__ = ["Neumann"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Neumann(KrylovSolver):
    """Truncated Neumann series, i.e. Richardson iteration, batched.

    Solves ``A x = b`` by

        x_{k+1} = x_k + omega M (b - A x_k),   so that from x_0 = 0 and M = I
        x_k = omega sum_{i<k} (I - omega A)^i b,

    the partial sums of the Neumann series of ``A^-1 = omega sum_i (I - omega A)^i``.
    It converges (for every ``b``) if and only if the spectral radius of
    ``I - omega A M`` is below 1, linearly with that ratio. For a symmetric positive
    definite ``A`` with largest eigenvalue ``L``, ``omega = 1 / L`` makes it converge
    (slowly, at rate ``1 - 1/cond(A)``). It suits operators close to the identity, such as
    ``I - dT/dz`` for a contractive fixed-point map ``T`` in implicit deep
    equilibrium models, where a few terms give a cheap, often sufficient, gradient.
    Each step costs one matvec (and one preconditioner application).

    It stops early when ``||b - A x|| <= atol + rtol ||b||``. When the spectral
    radius is 1 or more the residual does not decrease, and the sample ends with
    ``Status.MAX_STEPS`` or, once it overflows, ``Status.NONFINITE``, never SUCCESS.
    GMRES converges in every case where this does, usually in fewer steps.

    Args:
        step_size: the relaxation ``omega`` > 0 (1 for ``I - dT/dz``).
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.

    Example:
        >>> A = torch.tensor([[1.0, 0.2], [0.1, 0.9]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
        >>> Neumann().solve(DenseOperator(A), b).value
        tensor([[0.7955, 1.0227]], dtype=torch.float64)

    References:
        Liao et al., Reviving and Improving Recurrent Back-Propagation (2018),
        arXiv:1803.06396.
        Lorraine, Vicol & Duvenaud, Optimizing Millions of Hyperparameters by Implicit
        Differentiation (2020), arXiv:1911.02590.
    """

    step_size: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not (self.step_size > 0.0 and self.step_size < float("inf")):
            raise ValueError(f"Neumann: step_size must be a finite number > 0, got {self.step_size!r}.")

    def _init(self, A, M, b, x):
        return {"x": x, "r": b - A.mv(x)}

    def _step(self, A, M, b, s):
        z = self.step_size * M.mv(s["r"])
        # r_{k+1} = b - A (x_k + z) = r_k - A z: one matvec gives the next residual.
        return {"x": s["x"] + z, "r": s["r"] - A.mv(z)}
