"""Estimators that differentiate a finite run of a differentiable inner optimizer:
reverse mode (all steps, checkpointed, or the last ``K``) and forward mode.

The inner run is ``OptimizerSolver`` through the shared driver
``difflayers.solvers.iterate``, whose ``checkpoint=True`` recomputes each block of
steps in the backward pass.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.func import jvp, vmap
from torch.utils.checkpoint import checkpoint

from ..solvers import Status, batch_norm, iterate
from ._estimators import CheckpointedUnrolled, ForwardMode, TruncatedUnrolled, _Unrolled
from ._optimizers import OptimizerSolver
from ._problem import BilevelProblem
from ._tree import Tree, leaves

__all__ = ["unrolled_estimate"]


def _run(solver: OptimizerSolver, problem, state, params, steps: int, block: int, checkpoint: bool):
    # rtol = atol = 0: exactly `steps` updates (a sample stops early only at G = 0 exactly).
    return iterate(
        lambda s: solver.step(problem, s, params),
        lambda s: solver.residual(problem, s, params),
        state,
        rtol=0.0,
        atol=0.0,
        max_steps=steps,
        check_every=max(1, min(block, steps)),
        checkpoint=checkpoint,
    )


def _run_checkpointed(solver: OptimizerSolver, problem, state, params, steps: int, block: int):
    """``steps`` recorded updates in blocks of ``block``; only block boundaries are stored.

    Re-entrant checkpointing: each block runs without recording and is recomputed, with
    its graph, when the backward pass reaches it. (Non-re-entrant checkpointing would
    recompute the block for every inner ``torch.autograd.grad`` it contains.)
    """
    keys = list(state)
    count = len(keys)

    def run_block(length, *values):
        block_state = dict(zip(keys, values[:count]))
        block_params = values[count:]
        for _ in range(length):
            block_state = solver.step(problem, block_state, block_params)
        return tuple(block_state[k] for k in keys)

    done = 0
    while done < steps:
        length = min(block, steps - done)
        values = checkpoint(functools.partial(run_block, length), *state.values(), *params, use_reentrant=True)
        state = dict(zip(keys, values))
        done += length
    err = batch_norm(state["d"])
    status = torch.where(err == 0, int(Status.SUCCESS), int(Status.MAX_STEPS))
    return state, status, torch.full_like(status, steps), err


def unrolled_estimate(problem: BilevelProblem, estimator: _Unrolled, x0: torch.Tensor, lam: Tree) -> dict:
    """Run an unrolled estimator; returns a dict of results for ``HypergradientInfo``."""
    if isinstance(estimator, ForwardMode):
        return _forward(problem, estimator, x0, lam)
    solver = OptimizerSolver(optimizer=estimator.optimizer, max_steps=estimator.steps)
    layout = problem.lam_layout
    lam_leaves = [t.detach().requires_grad_(True) for t in leaves(lam)]
    params = tuple(lam_leaves)
    graph_problem = problem.solver_problem(graph=True)
    steps, skipped = estimator.steps, 0
    with torch.enable_grad():
        if isinstance(estimator, TruncatedUnrolled):
            skipped = estimator.steps - estimator.last
            steps = estimator.last
            with torch.no_grad():
                plain = problem.solver_problem()
                detached = tuple(t.detach() for t in lam_leaves)
                state = solver.init(plain, x0, detached)
                if skipped:
                    state = _run(solver, plain, state, detached, skipped, skipped, False)[0]
            state = {k: v.detach() for k, v in state.items()}
            # The stored direction was computed without a graph: recompute it with one, so that
            # the first differentiated step sees its dependence on lam.
            state["d"] = graph_problem.root(state["z"], params)
        else:
            state = solver.init(graph_problem, x0.detach().requires_grad_(True), params)
        if isinstance(estimator, CheckpointedUnrolled):
            state, status, num_steps, err = _run_checkpointed(
                solver, graph_problem, state, params, steps, estimator.block()
            )
            values = problem.outer_value(state["z"], layout.from_leaves(lam_leaves))
            # Re-entrant checkpoints support backward() only (not autograd.grad with inputs).
            values.sum().backward()
            grads = [t.grad for t in lam_leaves]
        else:
            state, status, num_steps, err = _run(solver, graph_problem, state, params, steps, steps, False)
            values = problem.outer_value(state["z"], layout.from_leaves(lam_leaves))
            total = values.sum()
            # No step taken (an empty batch): the outer values do not depend on lam.
            grads = (torch.autograd.grad(total, lam_leaves, allow_unused=True) if total.requires_grad
                     else [None] * len(lam_leaves))
    grads = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(lam_leaves, grads)]
    return {
        "x": state["z"].detach(),
        "values": values.detach(),
        "grad": layout.from_leaves(grads),
        "inner_residual": err.detach(),
        "inner_steps": num_steps + skipped,
        "inner_status": status,
        "statuses": [],
    }


def _forward(problem: BilevelProblem, estimator: ForwardMode, x0: torch.Tensor, lam: Tree) -> dict:
    layout = problem.lam_layout
    batch = problem.batch
    count = layout.size
    if count > estimator.max_hyperparameters:
        raise ValueError(
            f"hypergradient: ForwardMode needs one forward pass per hyperparameter; lam has {count} per problem, "
            f"more than max_hyperparameters={estimator.max_hyperparameters}. Expected few hyperparameters: use "
            "Unrolled or CheckpointedUnrolled (reverse mode) or an implicit estimator, or raise "
            "max_hyperparameters if the cost is acceptable."
        )
    solver = OptimizerSolver(optimizer=estimator.optimizer, max_steps=estimator.steps)
    plain = problem.solver_problem()
    primals = tuple(t.detach() for t in leaves(lam))

    def run(*lam_leaves):
        # A plain loop rather than the driver: no convergence checks (rtol = atol = 0), and
        # no host synchronization, so that the tangents of all directions can be vectorized.
        state = solver.init(plain, x0, lam_leaves)
        for _ in range(estimator.steps):
            state = solver.step(plain, state, lam_leaves)
        return problem.outer_value(state["z"], layout.from_leaves(lam_leaves))

    # One basis tangent per hyperparameter entry (shared by the problems of a batch).
    basis = [(i, math.prod(shape)) for i, shape in enumerate(layout.shapes)]
    tangents = [torch.zeros((count,) + tuple(t.shape), dtype=t.dtype, device=t.device) for t in primals]
    offset = 0
    for i, size in basis:
        view = tangents[i].reshape(count, batch, size)
        view[offset + torch.arange(size), :, torch.arange(size)] = 1.0
        offset += size
    derivatives = vmap(lambda *t: jvp(run, primals, t)[1], chunk_size=estimator.chunk_size)(*tangents)  # [m, B]
    grads, offset = [], 0
    for i, size in basis:
        grads.append(derivatives[offset:offset + size].T.reshape(primals[i].shape))
        offset += size
    with torch.no_grad():
        state = solver.init(plain, x0, primals)
        state, status, num_steps, err = _run(solver, plain, state, primals, estimator.steps, estimator.steps, False)
        values = problem.outer_value(state["z"], layout.from_leaves(primals))
    return {
        "x": state["z"].detach(),
        "values": values,
        "grad": layout.from_leaves(grads),
        "inner_residual": err,
        "inner_steps": num_steps,
        "inner_status": status,
        "statuses": [],
    }
