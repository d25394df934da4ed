"""Common base of the nonlinear solvers (fixed point, Newton, least squares)."""

from __future__ import annotations

import dataclasses

import torch

from ._driver import IterativeSolver, iterate
from ._problem import Params, Problem
from ._solution import Solution

__all__ = ["NonlinearSolver"]

State = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NonlinearSolver(IterativeSolver):
    """Base of the nonlinear solvers.

    Subclasses implement ``init``, ``step`` and ``residual`` over a state dict that
    holds the current iterate under ``"z"`` (shape ``[B, n]``); ``solve`` runs them
    through the shared driver. These three methods are also what differentiation
    strategies use to unroll or truncate a solve.
    """

    def init(self, problem: Problem, z0: torch.Tensor, params: Params) -> State:
        raise NotImplementedError

    def step(self, problem: Problem, state: State, params: Params) -> State:
        raise NotImplementedError

    def differentiable_step(self, problem: Problem, state: State, params: Params) -> State:
        """The step that ``Truncated`` and ``OneStep`` differentiate, restarted at a solution.

        Defaults to ``step``. Solvers whose step depends on quantities that are
        ill-conditioned functions of a vanishing residual (Anderson's mixing weights,
        Broyden's inverse-Jacobian estimate) hold them constant here; derivatives then
        flow through every evaluation of the problem, which is exact at convergence.
        """
        return self.step(problem, state, params)

    def residual(self, problem: Problem, state: State, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``(err, scale)``; converged when ``err <= atol + rtol * scale``."""
        raise NotImplementedError

    def check_problem(self, problem: Problem) -> None:
        """Raise ``TypeError`` if this solver cannot solve this kind of problem."""

    def solve(self, problem: Problem, z0: torch.Tensor, params: Params = (), *, checkpoint: bool = False) -> Solution:
        """Solve ``problem`` from ``z0`` (``[B, n]``).

        Runs under the caller's grad mode: with gradients enabled, the iterations are
        recorded (unrolled differentiation); ``checkpoint=True`` recomputes them in
        the backward pass instead of storing them.
        """
        self.check_problem(problem)
        rtol, atol = self.tolerances(z0.dtype)
        state = self.init(problem, z0, params)
        state, status, num_steps, err = iterate(
            lambda s: self.step(problem, s, params),
            lambda s: self.residual(problem, s, params),
            state,
            rtol=rtol,
            atol=atol,
            max_steps=self.max_steps,
            check_every=self.check_every,
            checkpoint=checkpoint,
        )
        return Solution(value=state["z"], status=status, stats={"num_steps": num_steps, "residual": err.detach()})
