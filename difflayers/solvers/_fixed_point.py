"""Fixed-point iterations: damped Picard, Anderson (type II) and Broyden.

All three act on any problem through its views (``problem.map`` for Picard and
Anderson, ``problem.root`` for Broyden), keep the whole batch in lockstep, and never
synchronize with the host inside a step.
"""

from __future__ import annotations

import dataclasses

import torch

from ._driver import batch_dot, batch_norm
from ._nonlinear import NonlinearSolver

__all__ = ["Picard", "Anderson", "Broyden"]


def _check_damping(solver, damping: float) -> None:
    if not (0.0 < damping <= 1.0):
        raise ValueError(f"{type(solver).__name__}: damping must be in (0, 1], got {damping!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Picard(NonlinearSolver):
    """Damped Picard iteration ``z <- (1 - damping) z + damping T(z)``.

    Converges linearly when ``T`` is a contraction (rate = its Lipschitz constant);
    damping < 1 helps when the iteration oscillates. Converged when
    ``||T(z) - z|| <= atol + rtol * scale`` (``scale = ||z||`` for fixed-point
    problems, ``||F(z0)||`` for root problems).

    Args:
        damping: step size in (0, 1].
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.

    Example:
        >>> problem = FixedPointProblem(lambda z: 0.5 * torch.cos(z))
        >>> Picard().solve(problem, torch.zeros(2, 1, dtype=torch.float64)).value
        tensor([[0.4502],
                [0.4502]], dtype=torch.float64)
    """

    damping: float = 1.0
    max_steps: int = 1000

    def __post_init__(self):
        super().__post_init__()
        _check_damping(self, self.damping)

    def init(self, problem, z0, params):
        tz = problem.map(z0, params)
        return {"z": z0, "tz": tz, "f0_norm": batch_norm(tz - z0)}

    def step(self, problem, state, params):
        z = state["z"] + self.damping * (state["tz"] - state["z"])
        return {"z": z, "tz": problem.map(z, params), "f0_norm": state["f0_norm"]}

    def residual(self, problem, state, params):
        z = state["z"]
        return batch_norm(state["tz"] - z), problem.scale(z, state["f0_norm"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Anderson(NonlinearSolver):
    """Anderson acceleration (type II) of the fixed-point map ``T``.

    Keeps the last ``memory`` iterates ``x_i`` and images ``T(x_i)``, with residuals
    ``g_i = T(x_i) - x_i``, and takes

        alpha = argmin ||sum_i alpha_i g_i||^2 + lambda ||alpha||^2   s.t.  sum_i alpha_i = 1
        z <- (1 - damping) sum_i alpha_i x_i + damping sum_i alpha_i T(x_i)

    The constrained least-squares problem is solved as its bordered (KKT) system in
    float64, with Tikhonov regularization ``lambda = regularization * max_i ||g_i||^2``
    relative to the residual scale. Safeguard: where that system is singular, its
    solution non-finite, or ``||alpha||_1 > max_coefficient`` (a sign of a nearly
    collinear history), the sample takes a plain damped Picard step instead.

    Args:
        memory: history length ``m``.
        regularization: relative Tikhonov weight (>= 0).
        damping: mixing parameter in (0, 1].
        max_coefficient: safeguard bound on ``||alpha||_1``.
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.

    Example:
        >>> problem = FixedPointProblem(lambda z: 0.5 * torch.cos(z))
        >>> Anderson().solve(problem, torch.zeros(2, 1, dtype=torch.float64)).value
        tensor([[0.4502],
                [0.4502]], dtype=torch.float64)

    References:
        Anderson (1965), DOI 10.1145/321296.321305.
        Walker & Ni (2011), DOI 10.1137/10078356X.
    """

    memory: int = 5
    regularization: float = 1e-10
    damping: float = 1.0
    max_coefficient: float = 1e4

    def __post_init__(self):
        super().__post_init__()
        _check_damping(self, self.damping)
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"Anderson: memory must be an int >= 1, got {self.memory!r}.")
        if not self.regularization >= 0.0:
            raise ValueError(f"Anderson: regularization must be >= 0, got {self.regularization!r}.")
        if not self.max_coefficient > 1.0:
            raise ValueError(f"Anderson: max_coefficient must be > 1, got {self.max_coefficient!r}.")

    def init(self, problem, z0, params):
        batch, n = z0.shape
        tz = problem.map(z0, params)
        X = z0.new_zeros(batch, self.memory, n)
        TX = z0.new_zeros(batch, self.memory, n)
        X[:, 0], TX[:, 0] = z0, tz
        count = torch.ones(batch, dtype=torch.int64, device=z0.device)
        return {"z": z0, "tz": tz, "X": X, "TX": TX, "count": count, "f0_norm": batch_norm(tz - z0)}

    def step(self, problem, state, params):
        return self._step(problem, state, params, hold_weights=False)

    def differentiable_step(self, problem, state, params):
        """A step whose mixing weights are held constant under autograd (see
        ``NonlinearSolver.differentiable_step``)."""
        return self._step(problem, state, params, hold_weights=True)

    def _step(self, problem, state, params, hold_weights):
        X, TX, count = state["X"], state["TX"], state["count"]
        m = self.memory
        slots = torch.arange(m, device=X.device)
        valid = slots[None, :] < count.clamp(max=m)[:, None]  # [B, m]
        latest = torch.nn.functional.one_hot((count - 1) % m, m).to(torch.bool)

        # Held weights are constants for autograd: exact at convergence, where
        # sum_i d(alpha_i) x_i = sum_i d(alpha_i) (x_i - z*) -> 0, and well conditioned
        # there, unlike the weights' own derivative (~ 1 / ||residual||).
        G = (TX - X).to(torch.float64)
        if hold_weights:
            G = G.detach()
        gram = torch.einsum("bin,bjn->bij", G, G)
        pair = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(m, dtype=torch.float64, device=X.device)
        scale = torch.diagonal(gram, dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        lam = self.regularization * scale
        # Unused slots get an identity row and no constraint weight, so alpha_i = 0 there.
        R = torch.where(pair, gram + lam[:, None, None] * eye, eye)
        border = valid.to(torch.float64)
        H = torch.zeros(X.shape[0], m + 1, m + 1, dtype=torch.float64, device=X.device)
        H[:, 0, 1:], H[:, 1:, 0], H[:, 1:, 1:] = border, border, R
        rhs = torch.zeros(X.shape[0], m + 1, dtype=torch.float64, device=X.device)
        rhs[:, 0] = 1.0
        sol, info = torch.linalg.solve_ex(H, rhs)
        alpha = sol[:, 1:]
        ok = (info == 0) & torch.isfinite(alpha).all(dim=1) & (alpha.abs().sum(dim=1) <= self.max_coefficient)
        alpha = torch.where(ok[:, None], alpha, latest.to(torch.float64)).to(X.dtype)

        mixed_x = torch.einsum("bi,bin->bn", alpha, X)
        mixed_t = torch.einsum("bi,bin->bn", alpha, TX)
        z = mixed_x + self.damping * (mixed_t - mixed_x)
        tz = problem.map(z, params)
        slot = torch.nn.functional.one_hot(count % m, m).to(torch.bool)[:, :, None]
        return {
            "z": z,
            "tz": tz,
            "X": torch.where(slot, z[:, None, :], X),
            "TX": torch.where(slot, tz[:, None, :], TX),
            "count": count + 1,
            "f0_norm": state["f0_norm"],
        }

    def residual(self, problem, state, params):
        z = state["z"]
        return batch_norm(state["tz"] - z), problem.scale(z, state["f0_norm"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Broyden(NonlinearSolver):
    """Limited-memory "good" Broyden method on the root form ``F(z) = 0``.

    Keeps an approximation ``H = I + sum_i u_i v_i^T`` of the inverse Jacobian
    ``(dF/dz)^-1`` and steps ``z <- z - damping * H F(z)``. After a step ``s`` with
    residual change ``y``, the Sherman-Morrison form of Broyden's update is

        H <- H + (s - H y) (s^T H) / (s^T H y)

    stored as one more rank-one pair. Once ``memory`` pairs are held the method
    restarts from ``H = I`` (dropping only the oldest pair would leave the others
    computed against an operator that no longer exists, which can diverge). Updates with ``|s^T H y|`` tiny relative to ``||s|| ||H y||`` are skipped.
    ``H0 = I`` suits fixed-point problems (``F = z - T(z)``, Jacobian ``I - dT/dz``);
    for general root problems with a very different Jacobian scale prefer Newton.

    Args:
        memory: number of rank-one pairs kept.
        damping: step length in (0, 1].
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.

    Example:
        >>> problem = FixedPointProblem(lambda z: 0.5 * torch.cos(z))
        >>> Broyden().solve(problem, torch.zeros(2, 1, dtype=torch.float64)).value
        tensor([[0.4502],
                [0.4502]], dtype=torch.float64)

    References:
        Broyden (1965), DOI 10.1090/S0025-5718-1965-0198670-6.
        Bai, Kolter & Koltun, Deep Equilibrium Models (2019), arXiv:1909.01377.
    """

    memory: int = 20
    damping: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check_damping(self, self.damping)
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"Broyden: memory must be an int >= 1, got {self.memory!r}.")

    def init(self, problem, z0, params):
        batch, n = z0.shape
        g = problem.root(z0, params)
        U = z0.new_zeros(batch, self.memory, n)
        count = torch.zeros(batch, dtype=torch.int64, device=z0.device)
        return {"z": z0, "g": g, "U": U, "V": torch.zeros_like(U), "count": count, "f0_norm": batch_norm(g)}

    @staticmethod
    def _apply(U, V, x):
        """``H x = x + sum_i u_i (v_i . x)``."""
        return x + torch.einsum("bin,bi->bn", U, torch.einsum("bin,bn->bi", V, x))

    def step(self, problem, state, params):
        return self._step(problem, state, params, hold_estimate=False)

    def differentiable_step(self, problem, state, params):
        """A step whose inverse-Jacobian estimate is held constant under autograd (see
        ``NonlinearSolver.differentiable_step``)."""
        return self._step(problem, state, params, hold_estimate=True)

    def _step(self, problem, state, params, hold_estimate):
        z, g, U, V, count = state["z"], state["g"], state["U"], state["V"], state["count"]
        s = -self.damping * self._apply(U, V, g)
        z_new = z + s
        g_new = problem.root(z_new, params)
        y = g_new - g
        if hold_estimate:  # the update of H from detached quantities: gradients flow through F
            s, y = s.detach(), y.detach()
        Hy = self._apply(U, V, y)
        sHy = batch_dot(s, Hy)
        Ht_s = self._apply(V, U, s)  # H^T s = s + sum_i v_i (u_i . s)
        eps = torch.finfo(z.dtype).eps
        ok = sHy.abs() > eps * batch_norm(s) * batch_norm(Hy)
        u = (s - Hy) / torch.where(ok, sHy, torch.ones_like(sHy))[:, None]
        slot = torch.nn.functional.one_hot(count % self.memory, self.memory).to(torch.bool)
        write = (slot & ok[:, None])[:, :, None]
        restart = (ok & (count > 0) & (count % self.memory == 0))[:, None, None]
        U, V = torch.where(restart, 0.0, U), torch.where(restart, 0.0, V)
        return {
            "z": z_new,
            "g": g_new,
            "U": torch.where(write, u[:, None, :], U),
            "V": torch.where(write, Ht_s[:, None, :], V),
            "count": count + ok.long(),
            "f0_norm": state["f0_norm"],
        }

    def residual(self, problem, state, params):
        z = state["z"]
        return batch_norm(state["g"]), problem.scale(z, state["f0_norm"])
