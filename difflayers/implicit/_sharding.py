"""``shard_batch``: one batch of solves split across the ranks of a process group.

Every rank holds the whole batch of inputs, solves its slice of the leading dimension,
and receives the whole batch of outputs; the gather carries its adjoint, so gradients
flow back to the rank that solved each sample.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["shard_batch"]


def _dist():
    import torch.distributed as dist

    return dist


def _world(group) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` without a process group."""
    dist = _dist()
    initialized = dist.is_available() and dist.is_initialized()
    if group is None and not initialized:
        return 0, 1
    if not initialized:
        raise RuntimeError(
            "shard_batch: group was given but no process group is initialized; expected "
            "torch.distributed.init_process_group(...) first (torchrun sets up its environment), "
            "or group=None to run on this process alone."
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(
            "shard_batch: this process is not a member of the group it was given; expected a group that "
            "contains it (every member must call shard_batch with the same inputs)."
        )
    return rank, dist.get_world_size(group)


def _counts(batch: int, world: int) -> list[int]:
    """Samples per rank: the first ``batch % world`` ranks take one more (``tensor_split``)."""
    share, extra = divmod(batch, world)
    return [share + (r < extra) for r in range(world)]


class _GatherBatch(torch.autograd.Function):
    """All-gather of per-rank slices of uneven sizes into the whole batch, with its adjoint."""

    @staticmethod
    def forward(local: torch.Tensor, counts: tuple[int, ...], group) -> torch.Tensor:
        dist = _dist()
        # all_gather needs equal shapes: pad every slice to the largest, strip afterwards
        largest = max(counts)
        padded = torch.cat([local, local.new_zeros((largest - local.shape[0], *local.shape[1:]))]).contiguous()
        pieces = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(pieces, padded, group=group)
        return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, counts, group = inputs
        ctx.counts, ctx.group = counts, group

    # Forward: Y = [y_0; ...; y_{R-1}] [B, ...] on every rank r, y_r [counts[r], ...] the
    # slice rank r solved. Each rank computes its own loss L_r from its copy of Y, and
    # the objective is sum_r L_r (DistributedDataParallel's convention, up to its 1/R).
    # Backward: d(sum_r L_r)/dy_q = sum_r (dL_r/dY)[rows of q]: the cotangents of all
    # ranks summed (one all_reduce of [B, ...]), and rank q keeps its own rows.
    # The collective is not recorded: second derivatives through the gather raise.
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        dist = _dist()
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.counts[:rank])
        return grad[start:start + ctx.counts[rank]], None, None


def _check_inputs(inputs) -> int:
    if not inputs:
        raise ValueError(
            "shard_batch: expected at least one batched input tensor (fn(*inputs) is run on slices of them); "
            "got none. Pass the batched tensors as arguments: shard_batch(fn, q, ...)."
        )
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            got = "a 0-dim tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(
                f"shard_batch: input {i} must be a tensor with a leading batch dimension; got {got}. Pass shared "
                "(unbatched) values through fn's closure instead, e.g. shard_batch(lambda q: layer(P, q), q)."
            )
    sizes = [t.shape[0] for t in inputs]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"shard_batch: every input must carry the same batch along its leading dimension; got leading "
            f"dimensions {sizes}. Pass only batched tensors as inputs and shared (unbatched) ones through fn's "
            "closure, e.g. shard_batch(lambda q: layer(P, q), q); expand an input to the batch if it is per sample."
        )
    return sizes[0]


def _as_outputs(result, count: int) -> tuple[tuple[torch.Tensor, ...], bool]:
    """The outputs of ``fn`` as a tuple, and whether ``fn`` returned a single tensor."""
    single = isinstance(result, torch.Tensor)
    outputs = (result,) if single else result
    if not isinstance(outputs, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in outputs):
        raise TypeError(
            "shard_batch: fn must return a tensor or a tuple of tensors batched along their leading dimension; "
            f"got {type(result).__name__}. Return the tensors themselves, e.g. "
            "lambda x: dl.ot.sinkhorn(x=x, y=y, epsilon=0.1).value."
        )
    for i, t in enumerate(outputs):
        if t.dim() == 0 or t.shape[0] != count:
            raise ValueError(
                f"shard_batch: output {i} of fn has shape {tuple(t.shape)}; expected a leading dimension equal to "
                f"the slice's batch size {count}. fn must map a batch to a batch (no reduction over samples: reduce "
                "after shard_batch, on the gathered outputs)."
            )
    return tuple(outputs), single


def shard_batch(fn: Callable, *inputs: torch.Tensor, group=None):
    """Run a batched callable with the batch split across the ranks of a process group.

    Every rank passes the same whole-batch ``inputs`` (leading dimension ``B``). Rank ``r``
    of ``R`` runs ``fn`` on its slice ``inputs[start_r:start_r + count_r]`` (the first
    ``B % R`` ranks take ``ceil(B / R)`` samples, the others ``floor(B / R)``; ranks
    beyond ``B`` take none and skip ``fn``), and the output slices are all-gathered, so
    every rank returns the outputs of the whole batch, in batch order. Since every
    solve of difflayers is per sample, each output equals that of ``fn(*inputs)`` on one
    process, for about ``1/R`` of the work per rank.

    Gradients: the gather is differentiable. Its backward sums the cotangents that all
    ranks compute for a sample and hands the sum to the rank that solved it, which
    pulls it back through ``fn`` (the adjoint of an all-gather when the objective is the
    sum of the ranks' losses). So when every rank computes the same loss from the
    gathered outputs, each rank's gradients are ``R`` times its share, and **averaging
    them over the ranks** gives the single-process gradient: DistributedDataParallel
    does this for the parameters it wraps; for other leaves (shared parameters used in
    ``fn``, the whole-batch inputs) call ``all_reduce`` and divide by ``R``. A rank
    without a sample (``B < R``) leaves ``.grad`` of the leaves used only in ``fn`` at
    ``None``: count it as zero. First derivatives only: differentiating the backward
    again raises.

    Without an initialized process group (``group=None``), or in a group of one, this is
    ``fn(*inputs)``.

    Args:
        fn: a batched callable ``fn(*slices)`` returning a tensor or a tuple of tensors
            whose leading dimension is the slice's batch (a layer, or
            ``lambda x: dl.ot.sinkhorn(x=x, y=y, epsilon=0.1).value``). Shared, unbatched
            tensors (``P`` of a QP, layer parameters) go through its closure.
        inputs: the batched tensors, the same on every rank, with equal leading
            dimensions.
        group: the process group (``None``: the default group when one is initialized).

    Returns:
        What ``fn`` returns, for the whole batch: a tensor or a tuple of tensors.

    Raises:
        TypeError: an input that is not a batched tensor, or an output of ``fn`` that is
            not a tensor.
        ValueError: inputs with different leading dimensions, or an output of ``fn``
            whose leading dimension is not the slice's batch.
        RuntimeError: ``group`` given without an initialized process group.

    Example:
        >>> layer = dl.QPLayer()
        >>> P = torch.eye(3, dtype=torch.float64)
        >>> q = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        >>> x = dl.shard_batch(lambda q_: layer(P, q_, lb=-torch.ones(3, dtype=torch.float64)), q)
        >>> x.shape   # every rank holds all 5 solutions, each solved on one rank
        torch.Size([5, 3])
    """
    batch = _check_inputs(inputs)
    rank, world = _world(group)
    if world == 1:
        return fn(*inputs)
    dist = _dist()
    counts = _counts(batch, world)
    start = sum(counts[:rank])
    if counts[rank]:
        outputs, single = _as_outputs(fn(*(t[start:start + counts[rank]] for t in inputs)), counts[rank])
    if min(counts) == 0:
        # Ranks without samples skip fn but join every collective, forward and backward:
        # they take the outputs' structure from the ranks that ran it.
        mine = ([(t.shape[1:], t.dtype, t.requires_grad) for t in outputs], single) if counts[rank] else None
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine, group=group)
        structure, single = next(m for m in gathered if m is not None)
        if not counts[rank]:
            device = inputs[0].device
            outputs = tuple(
                torch.zeros((0, *shape), dtype=dtype, device=device,
                            requires_grad=torch.is_grad_enabled() and any(m[0][i][2] for m in gathered if m))
                for i, (shape, dtype, _) in enumerate(structure)
            )
    whole = tuple(_GatherBatch.apply(t, tuple(counts), group) for t in outputs)
    return whole[0] if single else whole
