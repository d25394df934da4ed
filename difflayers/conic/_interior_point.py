"""Batched primal-dual interior point for cone programs with a quadratic objective.

Problem (``K`` = zero cone x orthant x second-order cones, see ``Cones``)::

    minimize    1/2 x'P x + q'x
    subject to  A x + s = b,   s in K

with dual ``maximize -1/2 x'P x - b'z  s.t.  P x + q + A'z = 0, z in K*``.

The method follows the homogeneous self-dual embedding with a quadratic objective
(Goulart and Chen, Clarabel, arXiv:2405.12762): the unknowns ``(x, z, s, tau,
kappa)`` satisfy

    P x + A'z + q tau = 0,   A x + s - b tau = 0,   q'x + b'z + kappa + x'P x / tau = 0,

with ``s o z = 0`` and ``tau kappa = 0``. A solution with ``tau > 0`` gives the optimum
``(x, z, s) / tau``; one with ``tau -> 0, kappa > 0`` is a certificate of primal
(``b'z < 0, A'z = 0``) or dual (``q'x < 0, P x = 0, A x + s = 0``) infeasibility, so
every element of a batch ends with a status and never spoils the others.

Each iteration is Mehrotra's predictor-corrector with Nesterov-Todd scaling: one
factorization of the KKT matrix (``KKTFactorization``), three solves with it.
"""

from __future__ import annotations

import dataclasses

import torch

from ..solvers import IterativeSolver, Status, batch_dot, iterate
from ..solvers._driver import _where
from ..solvers._tracing import compiling, host_any
from ._cone_algebra import ConeLayout
from ._cones import Cones
from ._exact import ExactKKT
from ._kkt import DualKKTFactorization, DualPrecomputation, KKTFactorization, _bmtv, _bmv

__all__ = ["InteriorPoint"]

_POINT = ("x", "z", "s", "tau", "kappa")  # the iterate of the embedding
_STEP_INPUTS = _POINT + ("Px", "Atz", "Ax")  # what a step computes from


class _DiscardRows(torch.autograd.Function):
    """Identity whose backward zeroes the gradient of the batch rows listed in
    ``discard["rows"]`` (filled in by the step after this was applied)."""

    @staticmethod
    def forward(ctx, t, discard):
        ctx.discard = discard
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        rows = ctx.discard.get("rows")
        if rows is None:
            return grad, None
        rows = rows.reshape(rows.shape + (1,) * (grad.dim() - 1))
        return torch.where(rows, torch.zeros_like(grad), grad), None


def _tolerance(atol: float, rtol: float, scale: torch.Tensor) -> torch.Tensor:
    """``atol + rtol * scale``, but at least ``eps^(3/4) * scale`` (scales are >= 1; about
    2e-12 in float64, 6e-6 in float32, below the default tolerances). A smaller tolerance,
    zero included, asks for more than an interior point reaches before its scaling
    degenerates: the sample then stops at the best accuracy it reaches (``SUCCESS``, or
    ``INACCURATE`` by the stall test in ``run``) or at ``max_steps``, instead of dividing
    by zero or iterating on rounding noise until the iterate overflows."""
    return torch.clamp_min(atol + rtol * scale, torch.finfo(scale.dtype).eps ** 0.75 * scale)


def _inf_norm(v: torch.Tensor) -> torch.Tensor:
    if v.shape[1] == 0:
        return v.new_zeros(v.shape[0])
    return torch.linalg.vector_norm(v, ord=float("inf"), dim=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InteriorPoint(IterativeSolver):
    """Batched homogeneous self-dual interior point (LP, QP, SOCP), pure torch.

    A sample is solved when its primal residual, dual residual and duality gap meet
    ``atol + rtol * scale`` (scales: the norms of the terms of each residual, at least
    1); tolerances below ``eps^(3/4) * scale`` (zero included) are raised to it, the
    accuracy the method reaches before its scaling degenerates. It is declared primal or dual infeasible when a normalized certificate meets
    ``infeasibility_tol``. At ``max_steps`` a sample whose residuals are within
    ``1e4 x`` the tolerances is ``INACCURATE``, otherwise ``MAX_STEPS``.

    Args:
        rtol, atol: ``None`` picks ``1e-8, 1e-8`` in float64 and ``1e-5, 1e-6`` in
            float32.
        max_steps: iteration budget (interior point methods need 10-40).
        check_every: iterations between two convergence checks (host syncs).
        infeasibility_tol: tolerance of the normalized certificates; ``None`` picks
            ``1e-8`` (float64) or ``1e-4`` (float32).
        refine_steps: iterative-refinement steps per KKT solve inside the
            iterations; ``None`` picks 2 in float32 and, in float64, 2 with
            second-order cones and 0 without. Solves for the final refinement and the
            backward pass use at least one.
        regularization: static regularization of the KKT matrix, relative to its
            largest diagonal entry.
        step_fraction: fraction of the step to the cone boundary taken.
        polish: refine LP and QP solutions on their active set (``refine_on_active_set``).

    References:
        Goulart and Chen, Clarabel: An interior-point solver for conic programs with
        quadratic objectives (2024), arXiv:2405.12762. Vandenberghe, The CVXOPT linear
        and quadratic cone program solvers (2010). Domahidi, Chu and Boyd, ECOS (2013).
    """

    max_steps: int = 100
    check_every: int = 1
    infeasibility_tol: float | None = None
    refine_steps: int | None = None
    regularization: float = 1e-13
    step_fraction: float = 0.99
    polish: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.max_steps is None:
            raise ValueError("InteriorPoint: max_steps must be an int >= 0, got None.")
        if self.infeasibility_tol is not None and not (0 < self.infeasibility_tol < 1):
            raise ValueError(f"InteriorPoint: infeasibility_tol must be in (0, 1), got {self.infeasibility_tol!r}.")
        if self.refine_steps is not None and (not isinstance(self.refine_steps, int) or self.refine_steps < 0):
            raise ValueError(f"InteriorPoint: refine_steps must be an int >= 0, got {self.refine_steps!r}.")
        if not (0 <= self.regularization < 1):
            raise ValueError(f"InteriorPoint: regularization must be in [0, 1), got {self.regularization!r}.")
        if not (0 < self.step_fraction < 1):
            raise ValueError(f"InteriorPoint: step_fraction must be in (0, 1), got {self.step_fraction!r}.")

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        rtol, atol = (1e-8, 1e-8) if dtype == torch.float64 else (1e-5, 1e-6)
        return (rtol if self.rtol is None else self.rtol, atol if self.atol is None else self.atol)

    def _infeasibility_tol(self, dtype) -> float:
        if self.infeasibility_tol is not None:
            return self.infeasibility_tol
        return 1e-8 if dtype == torch.float64 else 1e-4

    def _refine_steps(self, dtype, final: bool = False, cones: bool = True) -> int:
        """Refinement steps per KKT solve: inside the iterations (where the method
        corrects small errors of an orthant-only system itself) and, with ``final``,
        for the solution's refinement and the backward pass."""
        steps = self.refine_steps
        if steps is None:
            steps = (2 if cones else 0) if dtype == torch.float64 else 2
        return max(steps, 1) if final else steps

    def factorize(
        self, P, A, cones: Cones, layout: ConeLayout, s, z, pre: DualPrecomputation | None = None, final: bool = False
    ):
        """The KKT factorization at ``(s, z)`` (grouped layout), as used by the steps.

        With ``pre`` (``P`` positive definite, ``m <= n``) only the ``m x m`` Schur
        complement is factorized; otherwise the ``n x n`` reduced matrix.
        """
        p = cones.zero
        scaling = layout.scaling(s[:, p:], z[:, p:])
        return self._factorize(P, A, p, scaling, pre, final)

    def _factorize(self, P, A, p, scaling, pre, final=False):
        steps = self._refine_steps(A.dtype, final, cones=bool(scaling.w))
        options = dict(refine_steps=steps, regularization=self.regularization)
        if pre is not None:
            return DualKKTFactorization(pre, p, scaling, **options)
        return KKTFactorization(P, A, p, scaling, **options)

    def factorize_exact(
        self, P, A, cones: Cones, layout: ConeLayout, s, z, ratio: float = 1.0, pre: DualPrecomputation | None = None
    ) -> ExactKKT:
        """The factorized KKT system of the exact derivative at a solution ``(s, z)``.

        Uses the limit of the complementarity linearization (active rows as
        equalities, inactive rows dropped; see ``ExactKKT``) instead of the last
        iterate's scaling, which would leave an error of the order of the solver
        tolerance (and a constant one on second-order cones).
        """
        return ExactKKT(
            P, A, cones, s, z, refine_steps=self._refine_steps(A.dtype, final=True), regularization=self.regularization,
            ratio=ratio,
            pre=pre,
        )

    def refine_on_active_set(self, P, q, A, b, cones: Cones, layout: ConeLayout, x, z, s, status, pre=None):
        """Refine LP/QP solutions by solving the KKT system on the identified active set.

        With active rows (``z_i > s_i``) as equalities and inactive ones dropped, the
        KKT conditions are one linear system (the one ``ExactKKT`` factorizes):

            P x + A_act' z_act = -q,      A_act x = b_act.

        Its solution is the exact optimum when the active set is right; it is kept
        for a sample when it is primal and dual feasible within the tolerances
        (then the sample is ``SUCCESS``, also if the interior point had stopped
        ``INACCURATE``). Degenerate samples keep the interior-point solution. Only for
        problems without second-order cones.

        Returns ``(x, z, s, status, polished [B] bool, kkt)``; ``kkt`` is the
        factorization at the returned point, reused by the backward pass.
        """
        rtol, atol = self.tolerances(q.dtype)
        p = cones.zero
        one = torch.ones_like(q[:, 0])
        ptol = atol + rtol * torch.maximum(_inf_norm(b), one)
        dtol = atol + rtol * torch.maximum(_inf_norm(q), one)
        usable = (status == int(Status.SUCCESS)) | (status == int(Status.INACCURATE))
        done = torch.zeros_like(usable)
        z0, s0 = z, s
        kkt_out = None
        # Rows with both s_i and z_i small are ambiguous; if the natural split
        # (z_i > s_i) gives an infeasible point, try counting them as active, then
        # as inactive.
        for ratio in (1.0, 1e-2, 1e2):
            kkt = self.factorize_exact(P, A, cones, layout, s0, z0, ratio=ratio, pre=pre)
            xp, zp = kkt.solve(-q, b)
            active = torch.cat(
                [torch.ones_like(s0[:, :p], dtype=torch.bool), (z0 > ratio * s0)[:, p:]], dim=1
            )
            sp = torch.where(active, torch.zeros_like(s0), b - _bmv(A, xp))
            Px = _bmv(P, xp) if P is not None else torch.zeros_like(xp)
            dres = _inf_norm(Px + _bmtv(A, zp) + q)
            ok = usable & ~done & (dres <= dtol) & torch.isfinite(xp).all(1) & torch.isfinite(zp).all(1)
            if layout.mi > 0:
                ok = ok & (sp[:, p:].amin(1) >= -ptol) & (zp[:, p:].amin(1) >= -dtol)
            keep = ok[:, None]
            x = torch.where(keep, xp, x)
            z = torch.where(keep, torch.cat([zp[:, :p], zp[:, p:].clamp_min(0.0)], 1), z)
            s = torch.where(keep, sp.clamp_min(0.0), s)
            done = done | ok
            if not host_any(usable & ~done):  # while traced, every split is tried
                # the backward pass may reuse this factorization only if every
                # returned point comes from it (the first, natural split)
                kkt_out = kkt if ratio == 1.0 else None
                break
        status = torch.where(done, int(Status.SUCCESS), status)
        return x, z, s, status, done, kkt_out

    # ------------------------------------------------------------------------------
    def run(self, P, q, A, b, cones: Cones, layout: ConeLayout, warm_start=None, pre="auto"):
        """Solve a batch in the grouped row layout.

        Returns ``(x, z, s, status, stats)`` with ``(x, z, s)`` already divided by
        ``tau`` (for infeasible samples: the normalized certificate).
        """
        rtol, atol = self.tolerances(q.dtype)
        eps_inf = self._infeasibility_tol(q.dtype)
        batch, p = q.shape[0], cones.zero
        dtype, device = q.dtype, q.device
        degree = cones.degree
        frac = self.step_fraction

        def ineq(v):
            return v[:, p:]

        def with_eq(v_E, v_I):
            return torch.cat([v_E, v_I], dim=1)

        def Pmv(x, P=P):
            return _bmv(P, x) if P is not None else torch.zeros_like(x)

        q_norm, b_norm = _inf_norm(q), _inf_norm(b)
        a_norm = _inf_norm(A.flatten(1))
        b_norm1, q_norm1 = b_norm.clamp_min(1.0), q_norm.clamp_min(1.0)

        # -- initial point: one solve with W = I, then shift into the cone interior ----
        if isinstance(pre, str):
            pre = DualPrecomputation.try_build(P, A)
        if warm_start is None:
            kkt0 = self._factorize(P, A, p, layout.identity_scaling(batch, dtype, device), pre)
            x, y = kkt0.solve(-q, b)
            s_I, z_I = -ineq(y), ineq(y).clone()
            z_E = y[:, :p]
        else:
            x, z_w, s_w = warm_start
            s_I, z_I, z_E = ineq(s_w), ineq(z_w), z_w[:, :p]
        e = layout.identity(batch, dtype, device)

        def shift(u):
            alpha = layout.min_eigenvalue(u)
            # on or numerically at the boundary counts as outside (the scaling needs
            # a strictly interior point); such points move to lambda_min = 1
            margin = torch.finfo(u.dtype).eps ** 0.5 * torch.clamp_min(_inf_norm(u), 1.0)
            amount = torch.where(alpha <= margin, 1.0 - alpha, torch.zeros_like(alpha))
            if warm_start is not None:
                # a warm start sits on the boundary: move it to a well-centred interior
                amount = torch.clamp_min(amount, 0.1 * (1.0 + _inf_norm(u)) - alpha.clamp_min(0.0))
            return u + amount[:, None] * e

        if layout.mi > 0:
            s_I, z_I = shift(s_I), shift(z_I)
        s = with_eq(torch.zeros_like(z_E), s_I)
        z = with_eq(z_E, z_I)
        one = torch.ones(batch, dtype=dtype, device=device)
        state = {
            "x": x,
            "z": z,
            "s": s,
            "tau": one.clone(),
            "kappa": one.clone(),
            "failure": torch.zeros(batch, dtype=torch.int64, device=device),
        }

        inf = torch.tensor(float("inf"), dtype=dtype, device=device)
        a_scale = eps_inf * torch.maximum(one, a_norm)
        b_scale = eps_inf * torch.maximum(one, b_norm)

        def measure(st, P=P, q=q, A=A, b=b):
            """Normalized residuals and certificates (the driver's convergence test)."""
            x, z, s, tau, kappa = st["x"], st["z"], st["s"], st["tau"], st["kappa"]
            Px = Pmv(x, P)
            Atz = _bmtv(A, z)
            Ax = _bmv(A, x)
            Ax_s = Ax + s
            px_n, atz_n = _inf_norm(Px), _inf_norm(Atz)
            qx_raw, bz_raw = batch_dot(q, x), batch_dot(b, z)
            pres = _inf_norm(Ax_s - b * tau[:, None]) / tau
            dres = _inf_norm(Px + Atz + q * tau[:, None]) / tau
            xPx_n = batch_dot(x, Px) / tau**2
            pobj = 0.5 * xPx_n + qx_raw / tau
            dobj = -0.5 * xPx_n - bz_raw / tau
            gap = (pobj - dobj).abs()
            pscale = torch.maximum(b_norm1, torch.maximum(_inf_norm(Ax), _inf_norm(s)) / tau)
            dscale = torch.maximum(q_norm1, torch.maximum(px_n, atz_n) / tau)
            gscale = torch.minimum(pobj.abs(), dobj.abs()).clamp_min(1.0)
            err = torch.maximum(
                torch.maximum(pres / _tolerance(atol, rtol, pscale), dres / _tolerance(atol, rtol, dscale)),
                gap / _tolerance(atol, rtol, gscale),
            )
            # certificates, normalized by -b'z (primal) and -q'x (dual); only looked for
            # once kappa > tau somewhere (one host read saves the work on feasible batches)
            infeasible = (kappa > tau) | (tau < eps_inf)
            failure = torch.zeros_like(tau, dtype=torch.int64)
            if host_any(infeasible):
                p_inf = infeasible & (bz_raw < 0) & (atz_n <= -bz_raw * a_scale)
                p_inf = p_inf & (-bz_raw > eps_inf * torch.maximum(_inf_norm(z), one))
                d_inf = infeasible & (qx_raw < 0) & (px_n <= -qx_raw * eps_inf)
                d_inf = d_inf & (_inf_norm(Ax_s) <= -qx_raw * b_scale)
                d_inf = d_inf & (-qx_raw > eps_inf * torch.maximum(_inf_norm(x), one))
                # a certificate ends the sample with that status (read by the driver)
                failure = torch.where(d_inf, int(Status.DUAL_INFEASIBLE), failure)
                failure = torch.where(p_inf, int(Status.PRIMAL_INFEASIBLE), failure)
            return {"err": err, "failure": failure, "Px": Px, "Atz": Atz, "Ax": Ax}

        def step(st, P, q, A, b, pre, discard):
            """One predictor-corrector step; ``discard`` (unrolled only) receives the
            rows whose step is thrown away."""
            x, z, s, tau, kappa = st["x"], st["z"], st["s"], st["tau"], st["kappa"]
            Px, Atz, Ax = st["Px"], st["Atz"], st["Ax"]
            rx = Px + Atz + q * tau[:, None]
            rz = Ax + s - b * tau[:, None]
            rt = batch_dot(q, x) + batch_dot(b, z) + kappa + batch_dot(x, Px) / tau
            s_I, z_I = ineq(s), ineq(z)
            mu = (batch_dot(s_I, z_I) + tau * kappa) / (degree + 1)
            kkt = self.factorize(P, A, cones, layout, s, z, pre)
            W = kkt.scaling
            lam = W.lam
            xt = x / tau[:, None]
            c_tau = q + 2.0 * Px / tau[:, None]

            def rhs(dzr, ds):
                # eliminate ds = W (lam o\ ds - W dz): it enters the cone rows of the rhs
                corr = W.apply(layout.divide(lam, ds))
                return torch.cat([dzr[:, :p], dzr[:, p:] - corr], dim=1), corr

            def finish(dx1, dz1, corr, dtr, dk):
                # dtau from the tau row, then dkappa = (dk - kappa dtau) / tau
                dtau = (dtr - dk / tau - batch_dot(c_tau, dx1) - batch_dot(b, dz1)) / denom
                ddx = dx1 + dtau[:, None] * dx2
                ddz = dz1 + dtau[:, None] * dz2
                dds_I = corr - W.apply(W.apply(ineq(ddz)))
                ddk = (dk - kappa * dtau) / tau
                return ddx, ddz, dds_I, dtau, ddk

            # the tau-coupling direction K [dx2; dz2] = [-q; b] and the predictor
            # (affine-scaling) direction share one solve with two right-hand sides
            lam2 = layout.product(lam, lam)
            rz_aff, corr_aff = rhs(-rz, -lam2)
            dxs, dzs = kkt.solve(torch.stack([-q, -rx], 1), torch.stack([b, rz_aff], 1))
            dx2, dz2 = dxs[:, 0], dzs[:, 0]
            v = dx2 - xt
            wdz2 = W.apply(ineq(dz2))
            # The tau row's coefficient, -(v'P v + |W dz2|^2 + kappa / tau), uses
            # q'dx2 + b'dz2 = -dx2'P dx2 - |W dz2|^2, which holds for the exact K. The
            # regularized solve adds -eps |dx2|^2 to the left-hand side; it is small
            # unless the data are rank deficient (A without full column rank and no P,
            # or dependent equality rows), where dx2 grows like 1 / eps along the null
            # space and only the regularized form keeps dtau bounded (Clarabel computes
            # it this way). The more negative of the two is kept.
            denom = -(batch_dot(v, Pmv(v, P)) + batch_dot(wdz2, wdz2) + kappa / tau)
            direct = batch_dot(c_tau, dx2) + batch_dot(b, dz2) - batch_dot(xt, Pmv(xt, P)) - kappa / tau
            denom = torch.minimum(denom, direct)

            def step_length(dds_I, ddz, dtau, dk):
                a = torch.minimum(layout.max_step(s_I, dds_I), layout.max_step(z_I, ineq(ddz)))
                a = torch.minimum(a, torch.where(dtau < 0, -tau / dtau, inf))
                return torch.minimum(a, torch.where(dk < 0, -kappa / dk, inf))

            a_dx, a_dz, a_ds, a_dt, a_dk = finish(dxs[:, 1], dzs[:, 1], corr_aff, -rt, -tau * kappa)
            alpha = step_length(a_ds, a_dz, a_dt, a_dk).clamp(max=1.0)
            sigma = (1.0 - alpha) ** 3
            # corrector: centring plus Mehrotra's second-order term
            smu = (sigma * mu)[:, None]
            ds = -lam2 - layout.product(W.apply_inverse(a_ds), W.apply(ineq(a_dz))) + smu * e
            dk = -tau * kappa - a_dt * a_dk + sigma * mu
            g = (1.0 - sigma)[:, None]
            rz_c, corr_c = rhs(-g * rz, ds)
            c_dx1, c_dz1 = kkt.solve(-g * rx, rz_c)
            c_dx, c_dz, c_ds, c_dt, c_dk = finish(c_dx1, c_dz1, corr_c, -(1.0 - sigma) * rt, dk)
            alpha = (frac * step_length(c_ds, c_dz, c_dt, c_dk)).clamp(max=1.0)
            a = alpha[:, None]
            new = {
                "x": x + a * c_dx,
                "z": z + a * c_dz,
                "s": with_eq(s[:, :p], s_I + a * c_ds),
                "tau": tau + alpha * c_dt,
                "kappa": kappa + alpha * c_dk,
            }
            new.update(measure(new, P, q, A, b))  # NaN anywhere in the new point makes err NaN
            bad = torch.isnan(new["err"])
            # Near the solution the KKT matrix can become too ill-conditioned for the
            # working precision, and a cone's scaling can lose its last digits (in
            # float32, once a second-order cone's s'Js is below rounding). Each sample
            # keeps the point of its smallest residual; once that is within 1e4x the
            # tolerances, steps that stop reducing the residuals (three without
            # halving it, one growing it 100x) or that are not finite end the sample
            # there, INACCURATE, instead of letting it drift into overflow.
            broken = bad | (kkt.info > 0)
            best_err = st["best_err"]
            slow = torch.where(new["err"] > 0.5 * st["err"], st["slow"] + 1, torch.zeros_like(st["slow"]))
            stalled = (best_err <= 1e4) & ((slow >= 3) | (new["err"] > 100.0 * best_err) | broken)
            improved = new["err"] < best_err  # False for NaN
            new.update(_where(improved, {"best_" + k: new[k] for k in _POINT + ("err",)},
                              {"best_" + k: st["best_" + k] for k in _POINT + ("err",)}))
            new["slow"] = slow
            if host_any(stalled):  # rare; one host read saves a dozen selects per step
                back = {k: st["best_" + k] for k in _POINT}
                back.update(measure(back))
                new.update(_where(stalled, back, new))
            failure = torch.where(broken, int(Status.NONFINITE), new["failure"])
            new["failure"] = torch.where(stalled, int(Status.INACCURATE), failure)
            if discard is not None:
                discard["rows"] = stalled | broken
            return new

        # Unrolled differentiation backpropagates through every step. A step that is
        # thrown away (rejected, or not finite) gets a zero gradient from the select,
        # and zero times its non-finite local derivatives is NaN; its inputs are
        # therefore passed through _DiscardRows, which zeroes those rows' gradient.
        # (Not while torch.compile traces, which cannot follow that Function's state;
        # compiled unrolled solves keep the plain selects.)
        unrolled = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (P, q, A, b))
        unrolled = unrolled and not compiling()
        data = (P, q, A, b, pre)

        def guarded_step(st):
            if not unrolled:
                return step(st, *data, None)
            discard = {}
            st = {k: _DiscardRows.apply(v, discard) if k in _STEP_INPUTS else v for k, v in st.items()}
            P_, q_, A_, b_ = (None if t is None else _DiscardRows.apply(t, discard) for t in data[:4])
            pre_ = None if pre is None else pre.map(lambda t: _DiscardRows.apply(t, discard))
            return step(st, P_, q_, A_, b_, pre_, discard)

        def residual_fn(st):
            return st["err"], zero

        state.update(measure(state))
        zero = torch.zeros_like(state["err"])
        state["slow"] = torch.zeros(batch, dtype=torch.int64, device=device)  # steps without progress
        state.update({"best_" + k: state[k] for k in _POINT}, best_err=state["err"])
        state, status, num_steps, err = iterate(
            guarded_step, residual_fn, state, rtol=0.0, atol=1.0, max_steps=self.max_steps,
            check_every=self.check_every,
        )
        # out of steps: the sample's best point, INACCURATE if it is within 1e4x the tolerances
        back = (status == int(Status.MAX_STEPS)) & (state["best_err"] < err)
        state.update(_where(back, {k: state["best_" + k] for k in _POINT}, state))
        err = torch.where(back, state["best_err"], err)
        status = torch.where((status == int(Status.MAX_STEPS)) & (err <= 1e4), int(Status.INACCURATE), status)
        tau = state["tau"]
        x, z, s = state["x"], state["z"], state["s"]
        # optimal point (tau > 0) or normalized certificate (infeasible samples)
        p_inf = status == int(Status.PRIMAL_INFEASIBLE)
        d_inf = status == int(Status.DUAL_INFEASIBLE)
        scale = torch.where(p_inf, -batch_dot(b, z), torch.where(d_inf, -batch_dot(q, x), tau))
        scale = torch.where(scale.abs() > 0, scale, torch.ones_like(scale))[:, None]
        x, z, s = x / scale, z / scale, s / scale
        stats = {"num_steps": num_steps, "residual": err, "tau": tau, "kappa": state["kappa"]}
        return x, z, s, status, stats

    def center(self, P, q, A, b, cones: Cones, layout: ConeLayout, x, z, s, barrier: float):
        """Move a solution to the central-path point with barrier parameter ``barrier``.

        Newton's method on ``P x + A'z + q = 0``, ``A x + s = b``, ``s o z = barrier e``
        (``tau = 1``), started from ``(x, z, s)`` pushed into the interior. The result is
        the minimizer of ``1/2 x'P x + q'x - barrier * sum log det(b - A x)`` over the
        cone rows (one log-barrier term per orthant row and per second-order cone).

        Returns ``(x, z, s, status, num_steps)``.
        """
        rtol, atol = self.tolerances(q.dtype)
        batch, p = q.shape[0], cones.zero
        e = layout.identity(batch, q.dtype, q.device)
        root = barrier**0.5
        s_I = s[:, p:] + root * e
        z_I = z[:, p:] + root * e
        state = {"x": x, "z": torch.cat([z[:, :p], z_I], 1), "s": torch.cat([s[:, :p], s_I], 1)}
        q_norm, b_norm = _inf_norm(q), _inf_norm(b)
        one = torch.ones(batch, dtype=q.dtype, device=q.device)

        def Pmv(v):
            return _bmv(P, v) if P is not None else torch.zeros_like(v)

        def res(st):
            x, z, s = st["x"], st["z"], st["s"]
            rx = Pmv(x) + _bmtv(A, z) + q
            rz = _bmv(A, x) + s - b
            rc = layout.product(s[:, p:], z[:, p:]) - barrier * e
            return rx, rz, rc

        def residual_fn(st):
            rx, rz, rc = res(st)
            pscale = torch.maximum(torch.maximum(b_norm, _inf_norm(st["s"])), one)
            dscale = torch.maximum(q_norm, one)
            err = torch.stack(
                [
                    _inf_norm(rx) / _tolerance(atol, rtol, dscale),
                    _inf_norm(rz) / _tolerance(atol, rtol, pscale),
                    _inf_norm(rc) / (barrier * max(rtol, 1e3 * torch.finfo(q.dtype).eps)),
                ],
                1,
            ).amax(1)
            return err, torch.zeros_like(err)

        def step(st):
            x, z, s = st["x"], st["z"], st["s"]
            rx, rz, _ = res(st)
            kkt = self.factorize(P, A, cones, layout, s, z)
            W = kkt.scaling
            ds = barrier * e - layout.product(W.lam, W.lam)
            corr = W.apply(layout.divide(W.lam, ds))
            rhs_z = -rz.clone()
            rhs_z[:, p:] = rhs_z[:, p:] - corr
            dx, dz = kkt.solve(-rx, rhs_z)
            dsI = corr - W.apply(W.apply(dz[:, p:]))
            alpha = torch.minimum(layout.max_step(s[:, p:], dsI), layout.max_step(z[:, p:], dz[:, p:]))
            alpha = (self.step_fraction * alpha).clamp(max=1.0)[:, None]
            return {"x": x + alpha * dx, "z": z + alpha * dz, "s": torch.cat([s[:, :p], s[:, p:] + alpha * dsI], 1)}

        state, status, num_steps, _ = iterate(
            step, residual_fn, state, rtol=0.0, atol=1.0, max_steps=self.max_steps, check_every=self.check_every
        )
        return state["x"], state["z"], state["s"], status, num_steps
