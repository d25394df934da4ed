"""Batches of solves split across ranks with ``dl.shard_batch``: run by
``test_shard_batch.py`` in two gloo processes and, as the reference, in one process
(no process group: ``shard_batch`` is ``fn(*inputs)``).

Every scenario builds the same whole-batch inputs on every rank, computes the same loss
from the gathered outputs, backpropagates, and averages the gradients of its leaves over
the ranks (DistributedDataParallel does that for the parameters it wraps).

Usage (one process per rank): ``python shard_worker.py RANK WORLD_SIZE PORT OUT``.
"""

from __future__ import annotations

import os
import sys

import torch

import difflayers as dl

D = torch.float64
N = 4
SINKHORN = dl.ot.Sinkhorn(max_steps=20000)


def _average(leaves):
    """Mean of the leaves' gradients over the ranks (a rank that solved no sample has
    none for the leaves used only inside the sharded function: zeros)."""
    dist = torch.distributed
    if not dist.is_initialized():
        return [leaf.grad for leaf in leaves]
    out = []
    for leaf in leaves:
        t = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad.clone()
        dist.all_reduce(t)
        out.append(t / dist.get_world_size())
    return out


def _qp_problem(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, N, generator=g, dtype=D).requires_grad_()
    G = torch.randn(2, N, generator=g, dtype=D).requires_grad_()  # shared across the batch
    weights = torch.randn(batch, N, generator=g, dtype=D)  # a different cotangent per sample
    return q, G, weights


def qp_batch(batch: int = 5) -> dict:
    """Batched QPs; gradients w.r.t. the batched input q and the shared rows G."""
    q, G, weights = _qp_problem(batch, seed=0)
    layer = dl.QPLayer()
    P, h = torch.eye(N, dtype=D), torch.ones(2, dtype=D)
    lb, ub = -torch.ones(N, dtype=D), torch.ones(N, dtype=D)
    x = dl.shard_batch(lambda q_: layer(P, q_, G, h, lb=lb, ub=ub), q)
    (x * weights).sum().backward()
    grad_q, grad_G = _average([q, G])
    return {"x": x.detach(), "grad_q": grad_q, "grad_G": grad_G}


def qp_tuple_fewer_samples_than_ranks() -> dict:
    """One QP on two ranks (one rank has no sample) and a tuple of outputs."""
    q, G, weights = _qp_problem(1, seed=1)
    layer = dl.QPLayer()
    P, h = 2.0 * torch.eye(N, dtype=D), torch.full((2,), -0.2, dtype=D)  # active rows

    def fn(q_):
        x = layer(P, q_, G, h)
        return x, 0.5 * (x * (P @ x.T).T).sum(1) + (q_ * x).sum(1)

    x, value = dl.shard_batch(fn, q)
    ((x * weights).sum() + value.sum()).backward()
    grad_q, grad_G = _average([q, G])
    return {"x": x.detach(), "value": value.detach(), "grad_q": grad_q, "grad_G": grad_G}


def sinkhorn_batch(batch: int = 5) -> dict:
    """Batched point-cloud Sinkhorn; gradients w.r.t. both batched clouds and a shared shift."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(batch, 4, 2, generator=g, dtype=D).requires_grad_()
    y = torch.rand(batch, 5, 2, generator=g, dtype=D).requires_grad_()
    shift = torch.tensor([0.1, -0.2], dtype=D, requires_grad=True)
    weights = torch.rand(batch, generator=g, dtype=D) + 0.5

    cost = dl.shard_batch(lambda x_, y_: dl.ot.sinkhorn(x=x_ + shift, y=y_, epsilon=0.5, solver=SINKHORN).value,
                          x, y)
    (cost * weights).sum().backward()
    grad_x, grad_y, grad_shift = _average([x, y, shift])
    return {"cost": cost.detach(), "grad_x": grad_x, "grad_y": grad_y, "grad_shift": grad_shift}


class QPModel(torch.nn.Module):
    """Features -> QP cost (a linear map, replicated) -> QPs solved on the rank's slice."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.linear = torch.nn.Linear(3, N, dtype=D)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(N, 3, generator=g, dtype=D))
            self.linear.bias.copy_(torch.randn(N, generator=g, dtype=D))
        self.G = torch.nn.Parameter(torch.randn(2, N, generator=g, dtype=D))
        self.qp = dl.QPLayer()

    def forward(self, features):
        P, h = torch.eye(N, dtype=D), torch.ones(2, dtype=D)
        lb, ub = -torch.ones(N, dtype=D), torch.ones(N, dtype=D)
        return dl.shard_batch(lambda q: self.qp(P, q, self.G, h, lb=lb, ub=ub), self.linear(features))


def ddp_model(batch: int = 5) -> dict:
    """The sharded solve inside a DistributedDataParallel model: DDP's averaging of the
    parameter gradients is the averaging ``shard_batch`` asks for."""
    model = QPModel()
    if torch.distributed.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(4)
    features = torch.randn(batch, 3, generator=g, dtype=D)
    target = torch.rand(batch, N, generator=g, dtype=D)
    x = model(features)
    (x - target).square().mean().backward()  # the same loss on every rank, on the whole batch
    out = {"x": x.detach()}
    out.update({f"grad_{name.removeprefix('module.')}": p.grad.clone() for name, p in model.named_parameters()})
    return out


SCENARIOS = {
    "qp_batch": qp_batch,
    "qp_tuple_fewer_samples_than_ranks": qp_tuple_fewer_samples_than_ranks,
    "sinkhorn_batch": sinkhorn_batch,
    "ddp_model": ddp_model,
}


def run_all() -> dict:
    return {name: scenario() for name, scenario in SCENARIOS.items()}


def main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(run_all(), out)
    finally:
        # every rank done before any tears down: gloo aborts a process (std::terminate)
        # whose peer closes the connection while its threads still use it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
