"""Batched log-domain Sinkhorn iterations (balanced and unbalanced entropic OT).

With potentials ``f, g`` and the plan ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``,
one iteration is the pair of soft-minimum updates

    g_j = -lam_b eps LSE_i(log a_i + (f_i - C_ij) / eps)
    f_i = -lam_a eps LSE_j(log b_j + (g_j - C_ij) / eps)

with ``lam = rho / (rho + eps)`` for a KL-relaxed marginal of weight ``rho`` and
``lam = 1`` for a hard one. After a ``g`` update the column marginal of ``P`` is exact,
so convergence is measured on the row marginal, ``sum_i |(P 1)_i - a_i|``, every
``check_every`` iterations (the only host synchronizations). Zero weights (``log a_i
= -inf``) drop a point from the soft-minimum of the other side, so padded and ragged
batches need no special case.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..solvers import IterativeSolver, Status, iterate
from ._geometry import Geometry, matvec, rmatvec

__all__ = ["Sinkhorn"]


def _update_g(geom: Geometry, log_a, f, eps, rho_b):
    """``g_j = -lam_b eps LSE_i(log a_i + (f_i - C_ij) / eps)``."""
    e = eps if isinstance(eps, float) else eps[:, None]
    g = -e * geom.lse_cols(log_a + f / e, eps)
    return g if rho_b is None else (rho_b / (rho_b + e)) * g


def _update_f(geom: Geometry, log_b, g, eps, rho_a):
    """``f_i = -lam_a eps LSE_j(log b_j + (g_j - C_ij) / eps)``."""
    e = eps if isinstance(eps, float) else eps[:, None]
    f = -e * geom.lse_rows(log_b + g / e, eps)
    return f if rho_a is None else (rho_a / (rho_a + e)) * f


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sinkhorn(IterativeSolver):
    """Batched log-domain Sinkhorn with per-problem convergence.

    A problem has converged when its row-marginal error ``sum_i |(P 1)_i - a_i|``
    (balanced; for unbalanced problems the change of ``f`` in units of ``eps``) is at
    most ``atol + rtol * sum(a)``.

    Args:
        rtol, atol: tolerances; ``None`` picks ``1e-9, 1e-12`` (float64) or
            ``1e-5, 1e-7`` (float32).
        max_steps: iteration budget (one iteration updates ``g`` then ``f``).
        check_every: iterations between two convergence checks.
        epsilon_scaling: ``None``, or a factor in ``(0, 1)``: the iterations start at
            ``eps_0 = max(eps, max C)`` and multiply it by this factor each iteration
            until it reaches ``eps`` (fewer iterations for small ``eps``).
        relaxation: over-relaxation ``omega`` in ``[1, 2)``: each potential moves to
            ``(1 - omega) * old + omega * update``. ``1`` is plain Sinkhorn; values near
            ``1.5`` often halve the iterations at small ``eps``. The fixed point, hence
            the solution and its implicit gradient, is the same.
        kernel: iterate with the stabilized kernel ``K_ij = exp((f~_i + g~_j - C_ij) /
            eps)`` and scalings ``u = exp((f - f~) / eps)``, ``v = exp((g - g~) / eps)``
            (two matrix-vector products per iteration instead of two log-sum-exp passes,
            about 10x fewer operations), absorbing the scalings into ``f~, g~`` at a
            convergence check when they grow large. A block whose scalings overflow is recomputed in the log
            domain. ``None`` (default) uses it whenever the whole cost is held in memory
            (a dense cost, or point clouds of at most ``2**24`` pairs), ``eps`` is fixed
            (no ``epsilon_scaling``) and no iteration is recorded (not ``Unroll``);
            ``False`` always iterates in the log domain. Both reach the same fixed point.

    References:
        Cuturi, Sinkhorn Distances (2013), arXiv:1306.0895; Schmitzer, Stabilized
        Sparse Scaling Algorithms for Entropy Regularized Transport Problems (2019),
        arXiv:1610.06519; Chizat et al., Scaling Algorithms for Unbalanced Transport
        Problems (2018), arXiv:1607.05816.
    """

    max_steps: int = 1000
    check_every: int = 10
    epsilon_scaling: float | None = None
    relaxation: float = 1.0
    kernel: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if not (1.0 <= self.relaxation < 2.0):
            raise ValueError(f"Sinkhorn: relaxation must be in [1, 2), got {self.relaxation!r}.")
        if self.max_steps is None:
            raise ValueError("Sinkhorn: max_steps must be an int >= 0, got None.")
        if self.epsilon_scaling is not None and not (0.0 < self.epsilon_scaling < 1.0):
            raise ValueError(f"Sinkhorn: epsilon_scaling must be in (0, 1) or None, got {self.epsilon_scaling!r}.")
        if self.kernel not in (None, True, False):
            raise TypeError(f"Sinkhorn: kernel must be True, False or None, got {self.kernel!r}.")

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (1e-5, 1e-7)
        return (rtol if self.rtol is None else self.rtol, atol if self.atol is None else self.atol)

    def update(self, geom: Geometry, log_a, log_b, f, eps, rho_a, rho_b):
        """One iteration from ``f``: returns ``(f_new, g_new)``. ``eps`` is a float
        (the same for the batch: the scaled cost is reused) or a ``[B]`` tensor."""
        g = _update_g(geom, log_a, f, eps, rho_b)
        return _update_f(geom, log_b, g, eps, rho_a), g

    def solve(self, geom: Geometry, a, b, eps: float, *, rho_a=None, rho_b=None, init=None, track: bool = False):
        """Run the iterations; returns ``(f, g, status, num_steps, residual)``.

        ``track=True`` keeps the autograd graph of every iteration (unrolling).
        """
        whole = geom.cost is not None or geom.tile >= geom.n
        if not track and self.epsilon_scaling is None and self.kernel is not False and (whole or self.kernel):
            return self._solve_kernel(geom, a, b, float(eps), rho_a, rho_b, init)
        rtol, atol = self.tolerances(a.dtype)
        batch = a.shape[0]
        log_a, log_b = torch.log(a), torch.log(b)
        eps_t = torch.full((batch,), float(eps), dtype=a.dtype, device=a.device)
        if init is None:
            f = torch.zeros_like(a)
        else:
            f = init[0].to(a)
        state = {"f": f, "step": torch.zeros(batch, dtype=a.dtype, device=a.device)}
        omega = self.relaxation
        if omega != 1.0:
            state["g"] = _update_g(geom, log_a, f, float(eps), rho_b)
        eps0 = None  # the schedule's start, with epsilon_scaling
        if self.epsilon_scaling is not None:
            c_max = torch.stack([c.detach().amax(dim=(1, 2)) for _, _, c in geom.tiles()], 1).amax(1)
            eps0 = torch.maximum(c_max, eps_t)
        unbalanced = rho_a is not None or rho_b is not None

        def current_eps(st):
            if self.epsilon_scaling is None:
                return float(eps)
            return torch.maximum(eps0 * self.epsilon_scaling ** st["step"], eps_t)

        def step(st):
            e = current_eps(st)
            if omega == 1.0:
                f_new, _ = self.update(geom, log_a, log_b, st["f"], e, rho_a, rho_b)
                return {"f": f_new, "step": st["step"] + 1.0}
            # over-relaxed: each half step moves past the plain update by omega
            g = (1.0 - omega) * st["g"] + omega * _update_g(geom, log_a, st["f"], e, rho_b)
            f = (1.0 - omega) * st["f"] + omega * _update_f(geom, log_b, g, e, rho_a)
            return {"f": f, "g": g, "step": st["step"] + 1.0}

        def residual(st):
            e = current_eps(st)
            f_new, _ = self.update(geom, log_a, log_b, st["f"], e, rho_a, rho_b)
            if unbalanced:
                err = ((f_new - st["f"]).abs() / float(eps)).amax(1)
            else:
                # (P 1)_i = a_i exp((f_i - f_new_i) / eps) after the g update
                err = (a * torch.expm1((st["f"] - f_new) / float(eps)).abs()).nansum(1)
            if not isinstance(e, float):
                # not converged while the schedule is above eps (finite: inf reads as a failure)
                err = torch.where(e <= eps_t, err, torch.full_like(err, torch.finfo(err.dtype).max))
            return err, a.sum(1)

        if track:
            state, status, num_steps, err = iterate(
                step, residual, state, rtol=rtol, atol=atol, max_steps=self.max_steps, check_every=self.check_every
            )
        else:
            with torch.no_grad():
                state, status, num_steps, err = iterate(
                    step, residual, state, rtol=rtol, atol=atol, max_steps=self.max_steps,
                    check_every=self.check_every,
                )
        with torch.set_grad_enabled(track and torch.is_grad_enabled()):
            f, g = self.update(geom, log_a, log_b, state["f"], float(eps), rho_a, rho_b)
        return f, g, status, num_steps, err

    @torch.no_grad()
    def _solve_kernel(self, geom: Geometry, a, b, eps: float, rho_a, rho_b, init):
        """The iterations of ``solve`` on the stabilized kernel (see ``kernel``).

        With absorbed potentials ``f~, g~``, ``K_ij = exp((f~_i + g~_j - C_ij) / eps)``
        and ``f = f~ + eps log u``, ``g = g~ + eps log v``, the updates of ``solve`` read

            log v = lam_b (-log K'(a u)) + (lam_b - 1) g~ / eps
            log u = lam_a (-log K (b v)) + (lam_a - 1) f~ / eps

        At a convergence check where a scaling has left ``[e^-M, e^M]`` (``M`` a quarter
        of the dtype's exponent range) it is absorbed: ``f~, g~ = f, g`` and ``u = v =
        1``, and the kernel is recomputed, so its entries stay within range. The scalings
        enter the products shifted by their maximum (``K'(a u) = e^M K'(a e^(log u -
        M))``), so they never overflow.
        """
        rtol, atol = self.tolerances(a.dtype)
        batch = a.shape[0]
        log_a, log_b = torch.log(a), torch.log(b)
        lam_a = 1.0 if rho_a is None else rho_a / (rho_a + eps)
        lam_b = 1.0 if rho_b is None else rho_b / (rho_b + eps)
        unbalanced = rho_a is not None or rho_b is not None
        omega = self.relaxation
        c = geom.dense()
        if init is None:
            # the c-transforms of 0: each row and column of the first kernel has an entry 1
            big = torch.finfo(c.dtype).max
            g = torch.where(b > 0, torch.where(a[:, :, None] > 0, c, big).amin(1), 0.0)
            f = torch.where(a > 0, torch.where(b[:, None, :] > 0, c - g[:, None, :], big).amin(2), 0.0)
        else:
            # one log-domain iteration: potentials from which the kernel is well scaled
            f, g = self.update(geom, log_a, log_b, init[0].to(a), eps, rho_a, rho_b)

        def log_product(kernel, log_scaling, weights, transpose):
            """``log(K' (w e^s))`` (``transpose``) or ``log(K (w e^s))``, shifted by max(s)."""
            top = log_scaling.amax(1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            vec = weights * torch.exp(log_scaling - top)
            out = rmatvec(vec, kernel) if transpose else matvec(kernel, vec)
            return torch.log(out) + top

        def absorb(f, g):
            kernel = torch.exp((f[:, :, None] + g[:, None, :] - c) / eps)
            return {"f": f, "g": g, "k": kernel, "lu": torch.zeros_like(f), "lv": torch.zeros_like(g)}

        def kernel_block(st, steps):
            k, lu, lv = st["k"], st["lu"], st["lv"]
            fixed_u, fixed_v = (lam_a - 1.0) * st["f"] / eps, (lam_b - 1.0) * st["g"] / eps
            lu_prev = lu
            for _ in range(steps):
                lv_new = -lam_b * log_product(k, lu, a, True) + fixed_v
                lv = lv_new if omega == 1.0 else (1.0 - omega) * lv + omega * lv_new
                lu_prev = lu
                lu_new = -lam_a * log_product(k, lv, b, False) + fixed_u
                lu = lu_new if omega == 1.0 else (1.0 - omega) * lu + omega * lu_new
            return lu, lv, lu_prev - lu

        def log_block(f, g, steps):
            f_prev = f
            for _ in range(steps):
                g_new = _update_g(geom, log_a, f, eps, rho_b)
                g = g_new if omega == 1.0 else (1.0 - omega) * g + omega * g_new
                f_prev = f
                f_new = _update_f(geom, log_b, g, eps, rho_a)
                f = f_new if omega == 1.0 else (1.0 - omega) * f + omega * f_new
            return f, g, (f_prev - f) / eps

        def error(change):
            if unbalanced:
                return change.abs().amax(1)
            # (P 1)_i = a_i exp((f_i - f_new_i) / eps) after the g update
            return (a * torch.expm1(change).abs()).nansum(1)

        status = torch.full((batch,), int(Status.MAX_STEPS), dtype=torch.int64, device=a.device)
        num_steps = torch.zeros(batch, dtype=torch.int64, device=a.device)
        active = torch.ones(batch, dtype=torch.bool, device=a.device)
        err = torch.full((batch,), float("inf"), dtype=a.dtype, device=a.device)
        scale = a.sum(1)
        # the scalings are absorbed once they leave [e^-bound, e^bound]: a quarter of the
        # dtype's exponent range, so products with the kernel stay finite
        bound = 0.25 * math.log(torch.finfo(a.dtype).max)
        st = absorb(f, g)
        taken = 0
        while taken < self.max_steps and bool(active.any()):  # the host sync of each check
            block = min(self.check_every, self.max_steps - taken)
            lu, lv, change = kernel_block(st, block)
            f_new, g_new = st["f"] + eps * lu, st["g"] + eps * lv
            if bool(torch.isfinite(f_new).all()) and bool(torch.isfinite(g_new).all()):
                st["lu"], st["lv"] = torch.where(active[:, None], lu, st["lu"]), torch.where(active[:, None], lv, st["lv"])
            else:  # recompute the block in the log domain, then start from a fresh kernel
                f_new, g_new, change = log_block(f, g, block)
                st = None
            new_err = error(change)
            keep = active[:, None]
            f, g = torch.where(keep, f_new, f), torch.where(keep, g_new, g)
            err = torch.where(active, new_err, err)
            num_steps = num_steps + block * active.long()
            taken += block
            converged = err <= atol + rtol * scale
            nonfinite = ~torch.isfinite(err)
            status = torch.where(active & converged, int(Status.SUCCESS), status)
            status = torch.where(active & nonfinite, int(Status.NONFINITE), status)
            active = active & ~converged & ~nonfinite
            if st is None or float(torch.maximum(st["lu"].abs().amax(), st["lv"].abs().amax())) > bound:
                st = absorb(f, g)
        # the returned pair is one plain iteration from f (g, then f), as in the log domain
        lv = -lam_b * log_product(st["k"], st["lu"], a, True) + (lam_b - 1.0) * st["g"] / eps
        lu = -lam_a * log_product(st["k"], lv, b, False) + (lam_a - 1.0) * st["f"] / eps
        f_end, g_end = st["f"] + eps * lu, st["g"] + eps * lv
        if not (bool(torch.isfinite(f_end).all()) and bool(torch.isfinite(g_end).all())):
            f_end, g_end = self.update(geom, log_a, log_b, f, eps, rho_a, rho_b)
        return f_end, g_end, status, num_steps, err

    def solve_symmetric(self, geom: Geometry, a, eps: float):
        """Self-transport ``OT_eps(a, a)`` with a symmetric cost: one potential ``f``
        (``g = f``), iterated by the averaged map ``f <- (f + T(f)) / 2`` with
        ``T(f)_i = -eps LSE_j(log a_j + (f_j - C_ij) / eps)``, which converges in a few
        iterations where the alternating updates oscillate slowly.

        Returns ``(f, status, num_steps, residual)`` (no graph recorded).
        """
        rtol, atol = self.tolerances(a.dtype)
        log_a = torch.log(a)
        eps = float(eps)

        def T(f):
            return _update_f(geom, log_a, f, eps, None)

        def step(st):
            return {"f": 0.5 * (st["f"] + T(st["f"]))}

        def residual(st):
            # (P 1)_i = a_i exp((f_i - T(f)_i) / eps)
            return (a * torch.expm1((st["f"] - T(st["f"])) / eps).abs()).nansum(1), a.sum(1)

        with torch.no_grad():
            state, status, num_steps, err = iterate(
                step, residual, {"f": torch.zeros_like(a)}, rtol=rtol, atol=atol, max_steps=self.max_steps,
                check_every=self.check_every,
            )
            f = T(state["f"])
            f = 0.5 * (f + T(f))
        return f, status, num_steps, err
