"""``PDELayer``: the solution of a discrete PDE ``R(u, theta) = 0`` as a differentiable layer."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import torch

from ..implicit import Adjoint, CheckpointedUnroll, Implicit, ImplicitSpec, Unroll, implicit_solution
from ..solvers import (
    CG,
    GMRES,
    LU,
    CholeskyFactorization,
    LUFactorization,
    ConvergenceError,
    JacobianOperator,
    LinearOperator,
    LinearSolver,
    Newton,
    RootProblem,
    Solution,
    Status,
    batch_norm,
)
from ..solvers._precision import to_compute, to_output, without_autocast
from ..solvers._problem import first_evaluation
from ..solvers._tracing import check_all, compiling
from ._banded import BlockCholeskyFactorization
from ._grid import Grid
from ._multigrid import Preconditioned

__all__ = ["PDELayer"]

Residual = Callable[..., torch.Tensor]
PreconditionerFactory = Callable[..., LinearOperator]


class _Flat:
    """The residual on flat ``[B, n]`` iterates, checking the shape it returns."""

    def __init__(self, residual: Residual, event: tuple[int, ...]):
        self.residual, self.event = residual, event
        self.evaluated = False

    def __call__(self, z: torch.Tensor, *theta: torch.Tensor) -> torch.Tensor:
        u = z.reshape(z.shape[0], *self.event)
        if self.evaluated:
            out = self.residual(u, *theta)
        else:
            out = self._first_call(u, theta)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(u.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"PDELayer: the residual returned {got}; it must return a tensor shaped like u {tuple(u.shape)}."
            )
        return out.reshape(z.shape[0], out.shape[1:].numel())  # not -1: ambiguous for an empty batch

    def _first_call(self, u: torch.Tensor, theta) -> torch.Tensor:
        """Evaluate once with torch's shape errors restated in terms of the arguments."""
        out = first_evaluation(self.residual, u, theta, owner="PDELayer", what="the residual",
                               expects="the residual", arg="u", params_name="theta", each="theta",
                               batch=u.shape[0], start="u0")
        self.evaluated = True
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Factored(LinearSolver):
    """A linear solver that reuses one factorization of a symmetric Jacobian.

    Valid only where every system it is asked to solve has that matrix, which
    ``PDELayer`` guarantees: an affine residual (constant Jacobian) declared symmetric,
    so ``J``, ``J^T`` and the tangent system share it.
    """

    factorization: CholeskyFactorization | LUFactorization | BlockCholeskyFactorization

    def solve(self, operator, b, *, x0=None, preconditioner=None) -> Solution:
        return self.factorization.solve(b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Unrecorded(LinearSolver):
    """Runs a linear solver with gradient recording off.

    The implicit backward pass builds the Jacobian's pullback with gradients enabled;
    without this wrapper every Krylov iteration of the adjoint solve would be recorded
    in an autograd graph that nobody differentiates (memory growing with the
    iterations).
    """

    solver: LinearSolver

    def solve(self, operator, b, *, x0=None, preconditioner=None) -> Solution:
        with torch.no_grad():
            return self.solver.solve(operator, b, x0=x0, preconditioner=preconditioner)


def _linear_step(problem: RootProblem, solver: LinearSolver, z0: torch.Tensor, params,
                 jacobian: LinearOperator | None) -> tuple[Solution, LinearSolver | None]:
    """The one Newton step that solves an affine residual: ``J du = -R(u0)``.

    Returns the solution and, when a dense factorization of a symmetric Jacobian was
    computed, a solver that reuses it (for the adjoint and tangent systems).
    """
    f0 = problem.root(z0, params)
    J = JacobianOperator(lambda z: problem.root(z, params), z0, symmetric=problem.symmetric)
    reuse = None
    if jacobian is not None and callable(getattr(solver, "factorize", None)):
        factorization = solver.factorize(jacobian, z0)
        sol = factorization.solve(-f0)
        if problem.symmetric:
            reuse = _Factored(factorization=factorization)
    else:
        sol = solver.solve(J if jacobian is None else jacobian, -f0)
    z = z0 + sol.value
    residual = batch_norm(problem.root(z, params))
    status = torch.where(torch.isfinite(residual), sol.status, int(Status.NONFINITE))
    return Solution(value=z, status=status, stats={"num_steps": sol.stats["num_steps"], "residual": residual}), reuse


class PDELayer(torch.nn.Module):
    r"""Differentiable solution ``u*(theta)`` of a discrete PDE ``R(u, theta) = 0``.

    The user writes the discrete residual ``residual(u, *theta)`` in torch (``u``
    shaped ``[B, *event]``, typically ``[B, *grid.shape]``; each ``theta`` a tensor:
    coefficients, sources, boundary data, design fields, batched or shared), returning
    a tensor shaped like ``u``. Sample ``b`` of the residual may depend only on sample
    ``b`` of ``u``.

    **Forward.** Batched Newton (``solvers.Newton``: per-sample backtracking line search
    on ``1/2 ||R||^2``, converged samples frozen), by default Newton-Krylov with GMRES
    (CG when ``symmetric=True``): ``J(u_k) d = -R(u_k)``, ``u_{k+1} = u_k + alpha d``,
    ``J = dR/du`` applied matrix-free by forward-mode AD. With ``linear=True`` the
    residual is affine in ``u`` and one linear solve ``J du = -R(u0)`` replaces the
    Newton loop.

    **Reverse mode** (``adjoint=Implicit(...)``, the default). Differentiating
    ``R(u*(theta), theta) = 0`` gives ``J du* = -(dR/dtheta) dtheta``; a cotangent
    ``g = dL/du*`` pulls back through ONE adjoint solve and ONE vector-Jacobian product

    .. math::
        J^T \lambda = g, \qquad \frac{dL}{d\theta} = -\Big(\frac{\partial R}{\partial\theta}\Big)^T \lambda,

    with ``J^T`` applied by reverse-mode AD (exact for non-symmetric Jacobians; nothing
    is unrolled). **Forward mode** (``torch.func.jvp``) solves the tangent linear
    system ``J du = -(dR/dtheta) dtheta``. Both go through the one implicit-function
    ``autograd.Function`` of ``difflayers.implicit``. ``Unroll()`` and
    ``CheckpointedUnroll()`` backpropagate through the Newton iterations instead
    (a baseline; memory grows with the iterations). The implicit backward is first
    order: second derivatives through the layer (Hessian-vector products by double
    backward) are not available with ``Implicit``.

    **Preconditioning.** ``preconditioner(u0, *theta)`` builds one operator
    ``M ~ J^-1`` per call (``Jacobi``, ``Multigrid``), used by every Newton system and
    by the adjoint solve.

    **Precision.** ``u*`` has ``u0``'s dtype (that of the floating ``theta`` when ``u0``
    is omitted); floating ``theta`` must share it. float64 and float32 are solved as
    given; float16 and bfloat16 ``u0`` and ``theta`` are cast to float32, solved and
    differentiated there (``residual``, ``preconditioner`` and ``jacobian`` see float32
    tensors), and ``u*`` is cast back. Non-floating ``theta`` (masks, indices) pass
    through unchanged.

    **Failures.** Each sample has a ``Status``. With ``throw=True`` (default) a failed
    sample raises ``ConvergenceError`` naming it. With ``throw=False`` the layer warns,
    returns the last iterate of failed samples *detached* (their gradient is zero, never
    NaN) and, with ``return_solution=True``, the per-sample statuses. A residual that
    turns NaN/Inf (a vanishing coefficient not declared in ``positive=``) gives
    ``NONFINITE``, a singular Jacobian ``BREAKDOWN``, ``max_steps=0`` returns ``u0`` with
    ``MAX_STEPS``; an empty batch (``B = 0``) gives an empty result.

    Args:
        residual: ``R(u, *theta)``, same shape as ``u``.
        solver: a ``solvers.Newton`` (its ``linear_solver`` solves the Newton systems).
            Default: ``Newton(linear_solver=GMRES(restart=40))``, or ``CG()`` when
            ``symmetric``.
        adjoint: ``Implicit(linear_solver=...)`` (default: GMRES, or CG when
            ``symmetric``, relative tolerance only), ``Unroll()`` or
            ``CheckpointedUnroll()``.
        symmetric: declare ``dR/du`` symmetric (CG-based defaults).
        linear: the residual is affine in ``u``: one linear solve, no Newton loop.
        preconditioner: ``(u0, *theta) -> LinearOperator`` or ``None``.
        jacobian: with ``linear=True`` only: ``(u0, *theta) -> LinearOperator``, an
            assembled ``dR/du`` (e.g. a ``DenseOperator`` stiffness matrix) used by the
            forward solve instead of the matrix-free Jacobian. With a direct solver
            (``Newton(linear_solver=Cholesky())``, ``LU()`` or ``BlockCholesky()``) and
            ``symmetric=True`` its factorization is computed once and reused by the
            adjoint solve.
        grid: if given, ``u0`` must be ``[B, *grid.shape]`` and may be omitted (zeros).
        positive: indices of ``theta`` that must be strictly positive (diffusion
            coefficients); checked once per call.
        throw: raise on failure (see above).

    Example:
        >>> from difflayers.pde import Grid, Dirichlet, diffusion
        >>> grid = Grid((16, 16))
        >>> layer = PDELayer(lambda u, k, f: diffusion(u, k, grid, Dirichlet()) - f, grid=grid,
        ...                  symmetric=True, linear=True, positive=(0,))
        >>> k = torch.ones(2, 16, 16, dtype=torch.float64, requires_grad=True)
        >>> f = torch.ones(16, 16, dtype=torch.float64)
        >>> u = layer(k, f)
        >>> u.shape
        torch.Size([2, 16, 16])
        >>> u.sum().backward(); bool((k.grad < 0).all())   # stiffer medium, smaller u
        True

    References:
        Giles & Pierce, An introduction to the adjoint approach to design (2000),
            DOI 10.1023/A:1011430410075.
        Farrell, Ham, Funke & Rognes, Automated derivation of the adjoint of high-level
            transient finite element programs (2013), DOI 10.1137/120873558.
        Knoll & Keyes, Jacobian-free Newton-Krylov methods (2004),
            DOI 10.1016/j.jcp.2003.08.010.
    """

    def __init__(
        self,
        residual: Residual,
        *,
        solver: Newton | None = None,
        adjoint: Adjoint | None = None,
        symmetric: bool = False,
        linear: bool = False,
        preconditioner: PreconditionerFactory | None = None,
        jacobian: PreconditionerFactory | None = None,
        grid: Grid | None = None,
        positive: tuple[int, ...] = (),
        throw: bool = True,
    ):
        super().__init__()
        if not callable(residual):
            raise TypeError(f"PDELayer: residual must be callable R(u, *theta); got {type(residual).__name__}.")
        if solver is not None and not isinstance(solver, Newton):
            raise TypeError(
                f"PDELayer: solver must be a difflayers.solvers.Newton (Newton(linear_solver=GMRES()) for "
                f"Newton-Krylov); got {type(solver).__name__}."
            )
        adjoint = Implicit() if adjoint is None else adjoint
        if not isinstance(adjoint, (Implicit, Unroll, CheckpointedUnroll)):
            raise TypeError(
                f"PDELayer: adjoint must be Implicit(...), Unroll() or CheckpointedUnroll(); got {adjoint!r}."
            )
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError("PDELayer: preconditioner must be a callable (u0, *theta) -> LinearOperator, or None.")
        if jacobian is not None and (not callable(jacobian) or not linear):
            raise ValueError("PDELayer: jacobian= must be a callable (u0, *theta) -> LinearOperator and needs linear=True.")
        if grid is not None and not isinstance(grid, Grid):
            raise TypeError(f"PDELayer: grid must be a difflayers.pde.Grid; got {type(grid).__name__}.")
        if not all(isinstance(i, int) for i in positive):
            raise TypeError(f"PDELayer: positive must be a tuple of argument indices; got {positive!r}.")
        self.residual = residual
        self.solver = solver or Newton(linear_solver=CG() if symmetric else GMRES(restart=40))
        self.adjoint = adjoint
        self.symmetric = bool(symmetric)
        self.linear = bool(linear)
        self.preconditioner = preconditioner
        self.jacobian = jacobian
        self.grid = grid
        self.positive = tuple(positive)
        self.throw = bool(throw)

    # ------------------------------------------------------------------ checks

    def _check(self, theta, u0) -> torch.Tensor:
        for i, t in enumerate(theta):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"PDELayer: theta[{i}] is a {type(t).__name__}; every argument must be a tensor "
                    "(bind constants in the residual's closure instead)."
                )
        if u0 is None:
            if self.grid is None:
                raise ValueError("PDELayer: pass u0=... (the initial guess [B, ...]) or build the layer with grid=.")
            ref = next((t for t in theta if t.is_floating_point()), None)
            if ref is None:
                raise TypeError(
                    f"PDELayer: no floating-point theta to take the dtype from (got dtypes {[t.dtype for t in theta]}); "
                    "pass floating-point coefficients, or u0=."
                )
            batch = max([t.shape[0] for t in theta if t.dim() == self.grid.ndim + 1] or [1])
            u0 = torch.zeros((batch, *self.grid.shape), dtype=ref.dtype, device=ref.device)
        if not isinstance(u0, torch.Tensor) or not u0.is_floating_point() or u0.dim() < 1:
            raise TypeError("PDELayer: u0 must be a floating-point tensor [B, ...] with a leading batch dimension.")
        if self.grid is not None:
            self.grid.check_field("PDELayer: u0", u0, batched=True)
        for i, t in enumerate(theta):
            if t.device != u0.device:
                raise ValueError(
                    f"PDELayer: theta[{i}] is on {t.device} but u0 is on {u0.device}; move them to one device."
                )
            if t.is_floating_point() and t.dtype != u0.dtype:
                raise TypeError(f"PDELayer: theta[{i}] has dtype {t.dtype} but u0 has {u0.dtype}; cast them to one.")
            if self.grid is not None and t.dim() == self.grid.ndim + 1 and t.shape[1:] == self.grid.shape:
                if t.shape[0] not in (1, u0.shape[0]):
                    raise ValueError(
                        f"PDELayer: theta[{i}] has batch size {t.shape[0]} but u0 has {u0.shape[0]}; pass one "
                        "value per sample or one shared by the batch."
                    )
        # One host sync at the boundary: NaN/Inf and sign checks.
        floating = [t.detach() for t in (u0, *theta) if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in floating]).all()
        if any(i >= len(theta) or i < -len(theta) for i in self.positive):
            raise ValueError(f"PDELayer: positive={self.positive} names arguments beyond the {len(theta)} given.")
        positive = [theta[i].detach() for i in self.positive]
        signs = torch.stack([(t > 0).all() for t in positive]).all() if positive else finite.new_ones(())
        if compiling():  # device-side assertions: no host read while traced
            check_all(finite, lambda _: ValueError("PDELayer: u0 or theta contains NaN or Inf."))
            check_all(signs, lambda _: ValueError(f"PDELayer: theta{list(self.positive)} must be strictly positive."))
            return u0
        finite, signs = torch.stack([finite, signs]).tolist()
        if not finite:
            bad = [i for i, t in enumerate(theta) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            where = f"theta{bad}" if bad else "u0"
            raise ValueError(f"PDELayer: {where} contains NaN or Inf; the solve would be meaningless.")
        if not signs:
            bad = [i for i in self.positive if not bool((theta[i] > 0).all())]
            raise ValueError(
                f"PDELayer: theta{bad} must be strictly positive everywhere (a diffusion coefficient); got a "
                "minimum of " + ", ".join(f"{float(theta[i].detach().min()):.3g}" for i in bad)
                + ". Parametrize it as exp(log_k) or clamp it away from zero."
            )
        return u0

    # ------------------------------------------------------------------ forward

    @without_autocast
    def forward(self, *theta: torch.Tensor, u0: torch.Tensor | None = None, return_solution: bool = False):
        """Solve ``R(u, *theta) = 0`` from ``u0``.

        Args:
            *theta: the parameters of the residual.
            u0: initial guess ``[B, *event]`` (zeros on ``grid`` when omitted).
            return_solution: return a ``Solution`` (``value``, per-sample ``status``,
                ``stats`` with ``num_steps`` and ``residual``) instead of the tensor.

        Returns:
            ``u*`` shaped like ``u0`` (or a ``Solution``).

        Raises:
            ConvergenceError: with ``throw=True``, naming the samples that failed.
            ValueError, TypeError: mismatched shapes, devices or dtypes; NaN/Inf inputs;
                non-positive coefficients.
        """
        u0 = self._check(theta, u0)
        # 16-bit inputs are solved in float32 and u* cast back (solvers._precision)
        dtype = u0.dtype
        u0, theta = to_compute(u0), tuple(to_compute(t) for t in theta)
        batch, event = u0.shape[0], tuple(u0.shape[1:])
        flat = _Flat(self.residual, event)
        problem = RootProblem(flat, symmetric=self.symmetric)
        z0 = u0.reshape(batch, math.prod(event))  # not -1: ambiguous for an empty batch
        track = torch.is_grad_enabled()

        precond = None
        if self.preconditioner is not None:
            with torch.no_grad():
                precond = self.preconditioner(u0.detach(), *[t.detach() for t in theta])
            if not isinstance(precond, LinearOperator):
                raise TypeError(
                    f"PDELayer: preconditioner(u0, *theta) must return a LinearOperator; got {type(precond).__name__}."
                )
        newton = self.solver
        if precond is not None:
            newton = dataclasses.replace(newton, linear_solver=Preconditioned(solver=newton.linear_solver or LU(),
                                                                              preconditioner=precond))

        jac = None
        if self.jacobian is not None:
            with torch.no_grad():
                jac = self.jacobian(u0.detach(), *[t.detach() for t in theta])
            if not isinstance(jac, LinearOperator):
                raise TypeError(f"PDELayer: jacobian(u0, *theta) must return a LinearOperator; got {type(jac).__name__}.")
        reuse = None

        def solve(z0, params):
            nonlocal reuse
            if self.linear:
                sol, reuse = _linear_step(problem, newton.linear_solver or LU(), z0, params, jac)
                return sol
            return newton.solve(problem, z0, params, checkpoint=isinstance(self.adjoint, CheckpointedUnroll))

        if isinstance(self.adjoint, (Unroll, CheckpointedUnroll)) and track:
            sol = solve(z0, theta)
            z = sol.value
        else:
            with torch.no_grad():
                sol = solve(z0.detach(), tuple(t.detach() for t in theta))
            z = sol.value
        ok = sol.converged
        if compiling() and not self.throw:
            # traced: no host read; failed samples are masked as below, without a warning
            all_ok = False
        else:
            all_ok = bool(ok.all())  # the one host sync after the solve
        if not all_ok and not compiling():
            failed = Solution(value=z.detach().reshape(u0.shape), status=sol.status, stats=sol.stats)
            if self.throw:
                raise ConvergenceError("PDELayer", failed, hint=(
                    "Pass throw=False to get per-sample statuses (failed samples are returned detached), or "
                    "improve u0, raise solver.max_steps, or add a preconditioner."))
            warnings.warn(
                f"PDELayer: {int((~ok).sum())} of {batch} samples did not converge ("
                + ", ".join(sorted({Status(int(s)).name for s in sol.status[~ok].tolist()}))
                + "); they are returned detached, with zero gradient.",
                RuntimeWarning,
                stacklevel=3,  # past without_autocast's frame
            )
        if track and isinstance(self.adjoint, Implicit):
            lin = self.adjoint.linear_solver
            if lin is None and reuse is not None:
                lin = reuse
            elif lin is None:
                lin = CG(atol=0.0) if self.symmetric else GMRES(atol=0.0, restart=40)
            if precond is not None:
                lin = Preconditioned(solver=lin, preconditioner=precond)
            spec = ImplicitSpec(flat, self.symmetric, _Unrecorded(solver=lin), "PDELayer")
            # Failed samples get a finite stand-in (u0) so that the adjoint of the batch
            # stays finite; their output is detached below, so they receive no gradient.
            z_safe = z if all_ok else torch.where(ok[:, None], z, z0.detach())
            z_out = implicit_solution(spec, z_safe, tuple(theta))
        else:
            z_out = z
        if not all_ok:
            z_out = torch.where(ok[:, None], z_out, z.detach())
        u = to_output(z_out.reshape(u0.shape), dtype)
        if return_solution:
            return Solution(value=u, status=sol.status, stats=sol.stats)
        return u

    def extra_repr(self) -> str:
        return f"solver={self.solver}, adjoint={self.adjoint}, symmetric={self.symmetric}, linear={self.linear}"

