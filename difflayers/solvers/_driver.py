"""The one iteration driver behind every iterative solver of difflayers.

A solver is written as three pure functions over a *state*, a ``dict`` of tensors
whose leading dimension is the batch ``B``:

* ``init`` builds the first state (done by the solver before calling ``iterate``),
* ``step(state) -> state`` advances every sample by one iteration,
* ``residual(state) -> (err, scale)`` gives per-sample norms; a sample has converged
  when ``err <= atol + rtol * scale``.

``iterate`` runs ``check_every`` steps between two convergence checks. Only a check
synchronizes with the host (one ``bool`` read to know whether any sample is still
running), so a GPU runs ``check_every`` steps without stalling. Samples that have
converged or failed are frozen with ``torch.where``: their state no longer changes,
which keeps results independent of what the rest of the batch is doing.

With ``check_every >= max_steps`` the whole budget is one block and there is nothing
to stop early, so ``iterate`` reads nothing from the device at all: every sample takes
its ``max_steps`` steps (or is frozen where it converged), statuses and counts are
still computed on the device. This fixed-iteration mode is what ``torch.compile``
(``fullgraph=True``) and CUDA graphs can capture.

A solver reports a failure detected inside ``step`` (a Krylov breakdown, a singular
least-squares system) by writing a ``Status`` code into ``state["failure"]`` (an int64
tensor ``[B]``, 0 meaning none); the driver then freezes that sample with that status.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from ._solution import Status

__all__ = ["IterativeSolver", "iterate", "default_tolerances", "batch_norm", "batch_dot"]

State = dict[str, torch.Tensor]


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` used when a solver leaves them as ``None``.

    Chosen near the accuracy each floating-point type can actually reach on a
    well-conditioned problem, so that implicit gradients are as accurate as the dtype
    allows: float64 -> (1e-10, 1e-12), float32 -> (1e-5, 1e-7), 16-bit -> (1e-2, 1e-3).
    The public entry points (``fixed_point``, ``linear_solve``, the layers) solve 16-bit
    inputs in float32 (see ``compute_dtype``), so they use the float32 tolerances; the
    16-bit row applies only to a solver's ``solve`` called directly on 16-bit tensors.
    """
    if dtype == torch.float64:
        return 1e-10, 1e-12
    if dtype == torch.float32:
        return 1e-5, 1e-7
    return 1e-2, 1e-3


def batch_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each sample of a ``[B, ...]`` tensor, shape ``[B]``."""
    # explicit sizes: reshape(B, -1) is ambiguous for an empty batch
    return torch.linalg.vector_norm(x.reshape(x.shape[0], x.shape[1:].numel()), dim=1)


def batch_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Inner product of each pair of samples of ``[B, n]`` tensors, shape ``[B]``."""
    return torch.linalg.vecdot(x, y, dim=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterativeSolver:
    """Hyperparameters shared by every iterative solver.

    Args:
        rtol: relative tolerance; ``None`` picks a dtype-dependent default
            (see ``default_tolerances``).
        atol: absolute tolerance; ``None`` picks a dtype-dependent default.
        max_steps: iteration budget per sample; ``max_steps=0`` returns the initial point
            with ``Status.MAX_STEPS`` (``SUCCESS`` where it already meets the tolerance,
            ``NONFINITE`` where it is not finite).
        check_every: steps between two convergence checks (the only host syncs);
            ``check_every >= max_steps`` runs a fixed number of iterations with no
            host synchronization (see ``iterate``).
    """

    rtol: float | None = None
    atol: float | None = None
    max_steps: int = 256
    check_every: int = 4

    def __post_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not (value >= 0.0 and value < float("inf")):
                raise ValueError(f"{type(self).__name__}: {name} must be a finite number >= 0, got {value!r}.")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 0):
            raise ValueError(f"{type(self).__name__}: max_steps must be an int >= 0, got {self.max_steps!r}.")
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"{type(self).__name__}: check_every must be an int >= 1, got {self.check_every!r}.")

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """This solver's ``(rtol, atol)`` for tensors of ``dtype``."""
        rtol, atol = default_tolerances(dtype)
        return (rtol if self.rtol is None else self.rtol, atol if self.atol is None else self.atol)


def _where(mask: torch.Tensor, new: State, old: State) -> State:
    out = {}
    for key, value in new.items():
        m = mask.reshape(mask.shape + (1,) * (value.dim() - 1))
        out[key] = torch.where(m, value, old[key])
    return out


def iterate(
    step: Callable[[State], State],
    residual: Callable[[State], tuple[torch.Tensor, torch.Tensor]],
    state: State,
    *,
    rtol: float,
    atol: float,
    max_steps: int,
    check_every: int,
    checkpoint: bool = False,
) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``step`` until every sample converges, fails or exhausts ``max_steps``.

    Args:
        step: one iteration, ``state -> state``; must keep shapes.
        residual: ``state -> (err, scale)``, both ``[B]``.
        state: the initial state; every tensor has leading dimension ``B``.
        rtol, atol: convergence when ``err <= atol + rtol * scale``.
        max_steps: iteration budget.
        check_every: steps between two checks. With ``check_every >= max_steps``
            nothing is read from the device: ``max_steps`` steps run (converged
            samples frozen), so that the loop can be compiled or captured.
        checkpoint: recompute each block of ``check_every`` steps in the backward pass
            instead of storing it (``torch.utils.checkpoint``); used by unrolled
            differentiation of long loops.

    Returns:
        ``(state, status, num_steps, err)``: the final state, ``Status`` codes
        ``[B]`` (int64), iterations taken ``[B]`` and final residual norms ``[B]``.
    """
    first = next(iter(state.values()))
    batch, device = first.shape[0], first.device
    status = torch.full((batch,), int(Status.MAX_STEPS), dtype=torch.int64, device=device)
    num_steps = torch.zeros(batch, dtype=torch.int64, device=device)

    def check(state, active, status):
        err, scale = residual(state)
        converged = err <= atol + rtol * scale
        nonfinite = ~torch.isfinite(err)
        status = torch.where(active & converged, int(Status.SUCCESS), status)
        status = torch.where(active & nonfinite, int(Status.NONFINITE), status)
        failure = state.get("failure")
        if failure is not None:
            failed = active & (failure != 0) & ~converged
            status = torch.where(failed, failure, status)
            active = active & ~failed
        active = active & ~converged & ~nonfinite
        return err, active, status

    active = torch.ones(batch, dtype=torch.bool, device=device)
    err, active, status = check(state, active, status)
    taken = 0
    # one block holds the whole budget: no early exit to decide, hence no host read
    fixed = check_every >= max_steps
    while taken < max_steps and batch > 0:  # an empty batch has nothing to run
        if fixed:
            n_active = None  # unknown on the host
        else:
            n_active = int(active.sum())  # the host sync of this check
            if n_active == 0:
                break
        block = min(check_every, max_steps - taken)

        def run_block(state, active=active, n_active=n_active, block=block):
            if n_active is None:
                # Every sample steps and the ones done before the block get their state
                # back at its end (samples do not interact, so the others are unchanged).
                # One select instead of one per step: chains of per-step selects are what
                # a compiler inlines into ever larger expressions.
                start = state
                for _ in range(block):
                    state = step(state)
                return _where(active, state, start)
            for _ in range(block):
                new = step(state)
                state = new if n_active == batch else _where(active, new, state)
            return state

        if checkpoint and torch.is_grad_enabled():
            keys = list(state)
            values = _checkpoint(
                # run_block is bound now: the backward pass recomputes this very block
                lambda *vals, run_block=run_block: tuple(run_block(dict(zip(keys, vals))).values()),
                *state.values(),
                use_reentrant=False,
            )
            state = dict(zip(keys, values))
        else:
            state = run_block(state)
        num_steps = num_steps + block * active.long()
        taken += block
        err, active, status = check(state, active, status)
    return state, status, num_steps, err
