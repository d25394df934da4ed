"""Hypergradient estimators: what ``hypergradient`` computes, chosen by object.

Every estimator approximates, for ``w*(lam)`` defined by the inner optimality
condition ``G(w*, lam) = 0`` (``G = grad_w g`` for an inner objective ``g``),

    dF/dlam = df/dlam - (dG/dlam)^T (dG/dw)^-T df/dw        (implicit function theorem)

or the derivative of a finite inner computation. They hold hyperparameters only
(no tensors) and are validated on construction. See ``docs/bilevel.md`` for the
maths, the cost of each and when to pick which.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..solvers import (
    CG,
    GMRES,
    LU,
    MINRES,
    Anderson,
    Cholesky,
    LinearSolver,
    Neumann,
    Newton,
    NonlinearSolver,
    batch_norm,
)
from ._optimizers import InnerOptimizer, as_inner_optimizer

__all__ = [
    "Estimator",
    "AsGiven",
    "ImplicitCG",
    "ImplicitMINRES",
    "ImplicitGMRES",
    "ImplicitNeumann",
    "ImplicitDense",
    "Unrolled",
    "CheckpointedUnrolled",
    "TruncatedUnrolled",
    "ForwardMode",
    "OneStep",
    "FiniteDifference",
    "Penalty",
    "default_inner_solver",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AsGiven(NonlinearSolver):
    """Inner "solver" that takes ``w0`` as the inner solution (warm start, closed form,
    or a solution computed elsewhere) and only checks it.

    ``w0`` counts as converged when ``||G(w0, lam)|| <= atol + rtol * ||w0||``
    (``None``: ``sqrt(eps)`` of the dtype for both).
    """

    max_steps: int = 0

    def tolerances(self, dtype):
        eps = math.sqrt(torch.finfo(dtype).eps)
        return (eps if self.rtol is None else self.rtol, eps if self.atol is None else self.atol)

    def init(self, problem, z0, params):
        return {"z": z0, "g": problem.root(z0, params)}

    def step(self, problem, state, params):
        return state

    def residual(self, problem, state, params):
        return batch_norm(state["g"]), batch_norm(state["z"])


def default_inner_solver(kind: str, symmetric: bool) -> NonlinearSolver:
    """Newton-CG for an inner objective, Anderson for a fixed point, Newton-GMRES (or
    Newton-MINRES when declared symmetric) for a root."""
    if kind == "objective":
        return Newton(linear_solver=CG(atol=0.0))
    if kind == "fixed_point":
        return Anderson(max_steps=500)
    return Newton(linear_solver=MINRES(atol=0.0) if symmetric else GMRES(atol=0.0))


def _check_inner_solver(owner: str, solver) -> None:
    if solver is not None and not isinstance(solver, NonlinearSolver):
        raise TypeError(
            f"{owner}: inner_solver must be a difflayers.solvers nonlinear solver (Newton(linear_solver=CG()), "
            "Anderson(), dl.bilevel.OptimizerSolver(optimizer=...), dl.bilevel.AsGiven()) or None for the default; "
            f"got {type(solver).__name__}."
        )


def _check_int(owner: str, name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}; got {value!r}.")


def _check_positive(owner: str, name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
        raise ValueError(f"{owner}: {name} must be a finite number > 0; got {value!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Estimator:
    """Base class of the hypergradient estimators."""

    def describe(self) -> str:
        """Short name with the settings that matter, for tables and messages."""
        return type(self).__name__


# ----------------------------------------------------------------------------- implicit


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Implicit(Estimator):
    """Implicit function theorem at a solved ``w*``: one linear solve
    ``(dG/dw)^T v = df/dw``, then ``dF/dlam = df/dlam - (dG/dlam)^T v``.

    Args:
        inner_solver: solves the inner problem from ``w0`` (``None``: Newton-CG for an
            objective, Anderson for a fixed point, Newton-GMRES for a root); ``AsGiven()``
            when ``w0`` is already the solution.
    """

    inner_solver: NonlinearSolver | None = None
    needs_symmetric = False
    exact = True

    def __post_init__(self):
        _check_inner_solver(type(self).__name__, self.inner_solver)

    def linear_solver(self) -> LinearSolver:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class _KrylovImplicit(_Implicit):
    rtol: float | None = None
    atol: float = 0.0
    max_steps: int | None = None
    check_every: int = 4

    def __post_init__(self):
        super().__post_init__()
        self.linear_solver()  # validates the tolerances through the solver itself

    def _krylov_args(self):
        return dict(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps, check_every=self.check_every)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImplicitCG(_KrylovImplicit):
    """Implicit hypergradient, adjoint system solved by conjugate gradients (the default).

    Solves ``H v = df/dw`` with the inner Hessian ``H = d^2 g/dw^2`` (symmetric positive
    definite at a strict minimum) by matrix-free CG, one Hessian-vector product
    (``torch.func``) per iteration. Never the normal equations: their condition number
    is ``cond(H)^2``.

    Args:
        inner_solver: solves the inner problem from ``w0`` without recording (``None``:
            Newton-CG for an objective, Anderson for a fixed point, Newton-GMRES or
            Newton-MINRES for a root; ``AsGiven()`` when ``w0`` already is the solution;
            ``OptimizerSolver(optimizer=...)`` for a first-order solve). The same argument
            exists on every estimator that works at a solved inner problem.
        rtol, atol, max_steps, check_every: of the CG solve (``rtol=None``: 1e-10 in
            float64, 1e-5 in float32; ``atol=0``: purely relative; ``max_steps=None``: 10 n).

    References:
        Pedregosa, Hyperparameter optimization with approximate gradient (2016), arXiv:1602.02355.
        Blondel et al., Efficient and Modular Implicit Differentiation (2022), arXiv:2105.15183.
    """

    needs_symmetric = True

    def linear_solver(self):
        return CG(**self._krylov_args())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImplicitMINRES(_KrylovImplicit):
    """Implicit hypergradient with MINRES: symmetric but possibly indefinite ``dG/dw``
    (a saddle point, a symmetric root problem). Arguments as ``ImplicitCG``."""

    needs_symmetric = True

    def linear_solver(self):
        return MINRES(**self._krylov_args())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImplicitGMRES(_KrylovImplicit):
    """Implicit hypergradient with restarted GMRES: any nonsingular ``dG/dw``, e.g.
    ``I - dT/dw`` of a fixed-point map. Arguments as ``ImplicitCG`` plus ``restart``."""

    restart: int = 20

    def linear_solver(self):
        return GMRES(restart=self.restart, **self._krylov_args())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImplicitNeumann(_Implicit):
    """Implicit hypergradient with a truncated Neumann series of ``(dG/dw)^-T``:

        v = alpha sum_{i < steps} (I - alpha (dG/dw)^T)^i df/dw.

    ``steps`` products, no inner products; accurate only when the series converges fast
    (error ~ (1 - alpha mu)^steps for a Hessian with eigenvalues in [mu, L]).

    Args:
        inner_solver: see ``ImplicitCG``.
        steps: number of terms.
        step_size: ``alpha``; ``None``: 1 for a fixed-point map, ``1/L`` (``L`` estimated
            by 20 power iterations) for an objective or a symmetric root.
        rtol: stop early once ``||df/dw - (dG/dw)^T v|| <= rtol ||df/dw||`` (0: all terms).

    References:
        Lorraine, Vicol & Duvenaud, Optimizing Millions of Hyperparameters by Implicit
        Differentiation (2020), arXiv:1911.02590.
    """

    steps: int = 50
    step_size: float | None = None
    rtol: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _check_int("ImplicitNeumann", "steps", self.steps, 1)
        if self.step_size is not None:
            _check_positive("ImplicitNeumann", "step_size", self.step_size)
        if not (isinstance(self.rtol, (int, float)) and 0 <= self.rtol < math.inf):
            raise ValueError(f"ImplicitNeumann: rtol must be a finite number >= 0; got {self.rtol!r}.")

    exact = False

    def linear_solver(self, step_size: float = 1.0):
        return Neumann(step_size=step_size, max_steps=self.steps, rtol=self.rtol, atol=0.0, check_every=self.steps)

    def describe(self):
        return f"ImplicitNeumann({self.steps})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImplicitDense(_Implicit):
    """Implicit hypergradient with a dense factorization of ``dG/dw`` (Cholesky for an
    objective, LU otherwise): exact to rounding, ``O(n^3)``; for small inner problems."""

    def linear_solver(self, symmetric: bool = True):
        return Cholesky() if symmetric else LU()


# ----------------------------------------------------------------------------- unrolled


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Unrolled(Estimator):
    """Differentiate ``steps`` steps of a differentiable inner optimizer started at ``w0``.

    Args:
        optimizer: an ``InnerOptimizer`` (``SGD``, ``Adam``, ``AdamW``) or a torchopt
            functional optimizer.
        steps: inner steps ``T``.
    """

    optimizer: InnerOptimizer
    steps: int = 100
    exact = False

    def __post_init__(self):
        object.__setattr__(self, "optimizer", as_inner_optimizer(self.optimizer, type(self).__name__))
        _check_int(type(self).__name__, "steps", self.steps, 1)

    def describe(self):
        return f"{type(self).__name__}(T={self.steps})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unrolled(_Unrolled):
    """Reverse mode through all ``steps`` inner updates: the exact derivative of the
    computation performed (also unconverged), memory ``O(T n)``.

    References:
        Maclaurin, Duvenaud & Adams, Gradient-based Hyperparameter Optimization through
        Reversible Learning (2015), arXiv:1502.03492.
        Franceschi et al., Forward and Reverse Gradient-Based Hyperparameter Optimization
        (2017), arXiv:1703.01785.
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointedUnrolled(_Unrolled):
    """``Unrolled`` storing one inner state per ``checkpoint_every`` steps and recomputing
    each block in the backward pass: same gradient, memory ``O((T/k + k) n)`` for about
    one extra forward pass.

    The blocks are re-entrant checkpoints, whose backward pass accumulates gradients into
    every leaf tensor they reach: a tensor with ``requires_grad=True`` that ``inner`` or
    ``outer`` captures from its closure gets a ``.grad`` as a side effect (detach it, or
    make it part of ``lam``).

    Args:
        checkpoint_every: block length ``k``; ``None``: ``ceil(sqrt(T))``.

    References:
        Griewank & Walther, Algorithm 799: Revolve (2000), DOI 10.1145/347837.347846.
    """

    checkpoint_every: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.checkpoint_every is not None:
            _check_int("CheckpointedUnrolled", "checkpoint_every", self.checkpoint_every, 1)

    def block(self) -> int:
        return self.checkpoint_every or max(1, math.ceil(math.sqrt(self.steps)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TruncatedUnrolled(_Unrolled):
    """Run ``steps - last`` inner steps without recording, then differentiate the last
    ``last`` steps (truncated back-propagation). Memory ``O(K n)``; the error decays
    like the contraction of ``last`` steps.

    References:
        Shaban et al., Truncated Back-propagation for Bilevel Optimization (2019),
        arXiv:1810.10667.
    """

    last: int = 10

    def __post_init__(self):
        super().__post_init__()
        _check_int("TruncatedUnrolled", "last", self.last, 1)
        if self.last > self.steps:
            raise ValueError(f"TruncatedUnrolled: last ({self.last}) must be <= steps ({self.steps}).")

    def describe(self):
        return f"TruncatedUnrolled(T={self.steps}, K={self.last})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForwardMode(_Unrolled):
    """Forward-mode differentiation (``torch.func.jvp``) of the unrolled inner optimizer,
    one pass per hyperparameter: same value as ``Unrolled``, memory independent of
    ``T``, cost ``m`` times one unrolled run for ``m`` hyperparameters.

    Args:
        max_hyperparameters: refuse more directions than this (the cost is linear in it).
        chunk_size: directions pushed forward together (``torch.func.vmap``); ``None``: all.

    References:
        Franceschi et al., Forward and Reverse Gradient-Based Hyperparameter Optimization
        (2017), arXiv:1703.01785.
    """

    max_hyperparameters: int = 64
    chunk_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        _check_int("ForwardMode", "max_hyperparameters", self.max_hyperparameters, 1)
        if self.chunk_size is not None:
            _check_int("ForwardMode", "chunk_size", self.chunk_size, 1)


# ----------------------------------------------------------------------------- first order


@dataclasses.dataclass(frozen=True, kw_only=True)
class OneStep(Estimator):
    """One differentiable inner step at ``w*``: replace ``(dG/dw)^-1`` by ``step_size I``,

        dF/dlam ~ df/dlam - step_size (dG/dlam)^T df/dw.

    For a fixed-point map and ``step_size = 1`` this is Jacobian-free backpropagation
    (``dT/dlam^T df/dw``); for an objective it is the derivative of one gradient step
    ``w* - step_size grad_w g``. Cost: one vjp. Exact only when ``dG/dw = I / step_size``.

    References:
        Fung et al., JFB: Jacobian-Free Backpropagation for Implicit Networks (2022),
        arXiv:2103.12803.
        Luketina et al., Scalable Gradient-Based Tuning of Continuous Regularization
        Hyperparameters (2016), arXiv:1511.06727.
    """

    inner_solver: NonlinearSolver | None = None
    step_size: float = 1.0
    exact = False

    def __post_init__(self):
        _check_inner_solver("OneStep", self.inner_solver)
        _check_positive("OneStep", "step_size", self.step_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FiniteDifference(Estimator):
    """DARTS-style one-step hypergradient without second derivatives: the mixed product
    of ``OneStep`` by a central difference of ``grad_lam g`` along ``v = df/dw``,

        dF/dlam ~ df/dlam - step_size (grad_lam g(w* + e v) - grad_lam g(w* - e v)) / (2 e),

    ``e = epsilon / ||v||``. Inner objectives only. Equals ``OneStep`` up to
    ``O(e^2)`` (exactly when ``g`` is quadratic in ``w``).

    Args:
        inner_solver: see ``ImplicitCG``.
        step_size: the virtual step ``xi`` of DARTS.
        epsilon: difference step, relative to ``||df/dw||``.

    References:
        Liu, Simonyan & Yang, DARTS: Differentiable Architecture Search (2019), arXiv:1806.09055.
    """

    inner_solver: NonlinearSolver | None = None
    step_size: float = 1.0
    epsilon: float = 1e-2
    exact = False

    def __post_init__(self):
        _check_inner_solver("FiniteDifference", self.inner_solver)
        _check_positive("FiniteDifference", "step_size", self.step_size)
        _check_positive("FiniteDifference", "epsilon", self.epsilon)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Penalty(Estimator):
    """First-order value-function penalty (F2SA style): no Hessian, no linear solve.

    With ``y_rho = argmin_y g(y, lam) + f(y, lam) / rho`` (warm-started at ``w*``),

        dF/dlam ~ df/dlam(y_rho) + rho (grad_lam g(y_rho, lam) - grad_lam g(w*, lam)),

    whose error is ``O(1/rho)``; with ``extrapolate=True`` the estimates at ``rho`` and
    ``2 rho`` are combined (Richardson) for an ``O(1/rho^2)`` error. Inner objectives only.

    Args:
        inner_solver: solves the inner problem (a first-order ``OptimizerSolver`` keeps the
            whole estimator free of second derivatives).
        penalty_solver: solves the penalized problem from ``w*``; ``None``: ``inner_solver``,
            or the default Newton-CG when that is ``None`` or ``AsGiven()``.
        multiplier: ``rho > 0``.
        extrapolate: Richardson extrapolation in ``1/rho`` (one more penalized solve).

    References:
        Kwon et al., A Fully First-Order Method for Stochastic Bilevel Optimization
        (2023), arXiv:2301.10945.
        Liu et al., BOME! Bilevel Optimization Made Easy (2022), arXiv:2209.08709.
        Shen & Chen, On Penalty Methods for Nonconvex Bilevel Optimization and
        First-Order Stochastic Approximation (2023), arXiv:2309.01753.
    """

    inner_solver: NonlinearSolver | None = None
    penalty_solver: NonlinearSolver | None = None
    multiplier: float = 1e3
    extrapolate: bool = True
    exact = False

    def __post_init__(self):
        _check_inner_solver("Penalty", self.inner_solver)
        _check_inner_solver("Penalty", self.penalty_solver)
        if isinstance(self.penalty_solver, AsGiven):
            raise TypeError("Penalty: penalty_solver cannot be AsGiven(): the penalized problem must be solved.")
        _check_positive("Penalty", "multiplier", self.multiplier)
        if not isinstance(self.extrapolate, bool):
            raise TypeError(f"Penalty: extrapolate must be True or False; got {self.extrapolate!r}.")

    def penalized_solver(self) -> NonlinearSolver:
        """The solver of the penalized problems."""
        if self.penalty_solver is not None:
            return self.penalty_solver
        if self.inner_solver is not None and not isinstance(self.inner_solver, AsGiven):
            return self.inner_solver
        return default_inner_solver("objective", True)
