"""Per-sample outcome of a batched solve: ``Status``, ``Solution``, ``ConvergenceError``."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch

__all__ = ["Status", "Solution", "ConvergenceError"]


class Status(enum.IntEnum):
    """Outcome of one sample of a batched solve.

    Statuses are stored per sample as an integer tensor (``Solution.status``);
    compare with ``Status.SUCCESS`` or use ``Solution.converged``. Each member's
    ``message`` says what happened and what to try.
    """

    SUCCESS = 0
    MAX_STEPS = 1
    NONFINITE = 2
    BREAKDOWN = 3
    LINE_SEARCH_FAILED = 4
    INACCURATE = 5
    PRIMAL_INFEASIBLE = 6
    DUAL_INFEASIBLE = 7

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.SUCCESS: "converged to the requested tolerance.",
    Status.MAX_STEPS: (
        "reached max_steps before the residual met atol + rtol * scale. Try a larger "
        "max_steps, a looser rtol/atol, a better initial guess, or a stronger solver "
        "(Anderson or Newton instead of Picard; a preconditioner for Krylov methods)."
    ),
    Status.NONFINITE: (
        "produced NaN or Inf. Check the inputs for NaN/Inf, reduce the step (damping < 1 "
        "for fixed-point iterations), or use float64."
    ),
    Status.BREAKDOWN: (
        "broke down: a division by (near) zero inside the method, usually a singular or "
        "indefinite operator. Check that the operator is nonsingular; use GMRES for "
        "general operators, MINRES for symmetric indefinite ones, CG only for symmetric "
        "positive definite ones."
    ),
    Status.LINE_SEARCH_FAILED: (
        "the line search could not decrease the residual: the Jacobian may be singular "
        "or wrong near this point. Try another initial guess, Levenberg-Marquardt, or "
        "check that the function is differentiable."
    ),
    Status.INACCURATE: (
        "stopped at max_steps with only a reduced accuracy (residuals within 1e4 times the "
        "tolerances); the value is usable but less precise than asked. Rescale the data "
        "(entries of order one), use float64, or raise max_steps."
    ),
    Status.PRIMAL_INFEASIBLE: (
        "the constraints cannot be satisfied: a certificate of primal infeasibility was "
        "found. Check the constraint data (h, b, bounds) of this sample, or relax the "
        "constraints (e.g. with slack variables and a penalty)."
    ),
    Status.DUAL_INFEASIBLE: (
        "the problem is unbounded below (dual infeasible): the objective decreases "
        "without limit along a feasible ray. Add bounds on the variables or a strictly "
        "convex (quadratic) term."
    ),
}


class ConvergenceError(RuntimeError):
    """Raised by a solve with ``throw=True`` when some samples did not succeed.

    Attributes:
        indices: batch indices of the samples that failed.
        statuses: their ``Status`` values, in the same order.
        solution: the full ``Solution`` (values of the failed samples are the last
            iterates), so that nothing computed is lost.

    Args:
        what: the operation, named in the message.
        solution: the batched result.
        hint: the last line of the message: how to get statuses instead.
    """

    def __init__(
        self,
        what: str,
        solution: Solution,
        hint: str = "Pass throw=False to get the per-sample status instead of this error.",
    ):
        failed = (~solution.converged).nonzero().flatten().tolist()
        statuses = [Status(int(s)) for s in solution.status[failed].tolist()]
        residual = solution.stats.get("residual")
        lines = [f"{what}: {len(failed)} of {solution.status.numel()} samples did not succeed."]
        shown = 8
        for i, s in zip(failed[:shown], statuses[:shown]):
            certificate = s in (Status.PRIMAL_INFEASIBLE, Status.DUAL_INFEASIBLE)  # no residual to speak of
            res = f" (residual {float(residual[i]):.3e})" if residual is not None and not certificate else ""
            lines.append(f"  sample {i}: {s.name}{res}")
        if len(failed) > shown:
            lines.append(f"  ... and {len(failed) - shown} more")
        for s in dict.fromkeys(statuses):
            lines.append(f"{s.name}: {s.message}")
        lines.append(hint)
        super().__init__("\n".join(lines))
        self.indices = failed
        self.statuses = statuses
        self.solution = solution


@dataclasses.dataclass(frozen=True)
class Solution:
    """The result of a batched solve.

    Attributes:
        value: the solution, leading batch dimension first.
        status: ``int64`` tensor of shape ``[B]`` holding ``Status`` codes.
        stats: per-sample statistics: ``num_steps`` (``[B]`` int64), ``residual``
            (``[B]``, the final residual norm), and solver-specific entries.
    """

    value: Any
    status: torch.Tensor
    stats: dict[str, torch.Tensor]

    @property
    def converged(self) -> torch.Tensor:
        """Boolean tensor ``[B]``: which samples reached ``Status.SUCCESS``."""
        return self.status == int(Status.SUCCESS)  # an int: Dynamo folds tensor == IntEnum to a bool

    def raise_if_failed(self, what: str = "solve") -> Solution:
        """Raise ``ConvergenceError`` if any sample failed; return ``self`` otherwise.

        This synchronizes with the device once.
        """
        if not bool(self.converged.all()):
            raise ConvergenceError(what, self)
        return self

    def describe(self) -> str:
        """A one-line human summary: how many samples succeeded, worst residual."""
        ok = int(self.converged.sum())
        total = self.status.numel()
        parts = [f"{ok}/{total} converged"]
        if total == 0:  # an empty batch: no steps or residuals to summarize
            return parts[0]
        if "num_steps" in self.stats:
            parts.append(f"steps <= {int(self.stats['num_steps'].max())}")
        if "residual" in self.stats:
            parts.append(f"max residual {float(self.stats['residual'].max()):.2e}")
        return ", ".join(parts)
