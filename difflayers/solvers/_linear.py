"""Common base of the linear solvers and the checks every linear solve performs."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ._driver import IterativeSolver, batch_norm, iterate
from ._operator import IdentityOperator, LinearOperator, aslinearoperator
from ._solution import Solution

__all__ = ["LinearSolver", "KrylovSolver"]

State = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearSolver:
    """Base of every linear solver: ``solve(operator, b) -> Solution``.

    ``Solution.value`` is ``x`` of shape ``[B, n]``; ``stats["residual"]`` is
    ``||b - A x||`` per sample and ``stats["num_steps"]`` the iterations taken
    (zero for direct solvers).
    """

    def solve(
        self,
        operator: LinearOperator,
        b: torch.Tensor,
        *,
        x0: torch.Tensor | None = None,
        preconditioner: LinearOperator | None = None,
    ) -> Solution:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class KrylovSolver(IterativeSolver, LinearSolver):
    """Base of the iterative linear solvers: shared set-up and stopping rule.

    A sample has converged when ``||b - A x|| <= atol + rtol * ||b||``.
    ``max_steps=None`` (the default) allows ``10 n`` iterations for systems of size
    ``n``: Krylov methods need a number of steps that grows with the conditioning,
    which a fixed cap would cut short on large ill-conditioned systems.
    """

    max_steps: int | None = None

    def solve(self, operator, b, *, x0=None, preconditioner=None) -> Solution:
        operator = aslinearoperator(operator)
        check_rhs(b, x0)
        M = IdentityOperator() if preconditioner is None else aslinearoperator(preconditioner)
        x = torch.zeros_like(b) if x0 is None else x0
        rtol, atol = self.tolerances(b.dtype)
        state = self._init(operator, M, b, x)
        b_norm = batch_norm(b)
        state, status, num_steps, err = iterate(
            lambda s: self._step(operator, M, b, s),
            lambda s: (self._residual_norm(s), b_norm),
            state,
            rtol=rtol,
            atol=atol,
            max_steps=10 * b.shape[1] if self.max_steps is None else self.max_steps,
            check_every=self.check_every,
        )
        return Solution(value=state["x"], status=status, stats={"num_steps": num_steps, "residual": err.detach()})

    # Subclasses implement the method itself.
    def _init(self, A: LinearOperator, M: LinearOperator, b: torch.Tensor, x: torch.Tensor) -> State:
        raise NotImplementedError

    def _step(self, A: LinearOperator, M: LinearOperator, b: torch.Tensor, state: State) -> State:
        raise NotImplementedError

    def _residual_norm(self, state: State) -> torch.Tensor:
        return batch_norm(state["r"])


def check_rhs(b: torch.Tensor, x0: torch.Tensor | None = None) -> None:
    """Validate the right-hand side (and initial guess) of a linear solve."""
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"b must be a tensor of shape [B, n]; got {type(b).__name__}.")
    if b.dim() != 2:
        raise ValueError(
            f"b must have shape [B, n] (leading batch dimension); got shape {tuple(b.shape)}. "
            "Use b.unsqueeze(0) for a single system."
        )
    if not b.is_floating_point():
        raise TypeError(f"b must be a floating-point tensor; got dtype {b.dtype}.")
    if x0 is None:
        return
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be None or a tensor shaped like b {tuple(b.shape)}; got {type(x0).__name__}.")
    if x0.shape != b.shape:
        raise ValueError(f"x0 must match b in shape; got x0 {tuple(x0.shape)} and b {tuple(b.shape)}.")
    if x0.dtype != b.dtype:
        raise TypeError(f"x0 has dtype {x0.dtype} but b has dtype {b.dtype}; they must match, e.g. x0.to(b.dtype).")
    if x0.device != b.device:
        raise ValueError(f"x0 is on device {x0.device} but b is on {b.device}; they must match, e.g. x0.to(b.device).")


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``num / den`` with 0 where ``den`` is 0 or non-finite; also returns that mask."""
    bad = (den == 0) | ~torch.isfinite(den)
    return torch.where(bad, torch.zeros_like(num), num / torch.where(bad, torch.ones_like(den), den)), bad


MatvecFn = Callable[[torch.Tensor], torch.Tensor]
