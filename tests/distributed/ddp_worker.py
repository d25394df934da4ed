"""A small model with a QP layer and a Sinkhorn loss, trained for a few steps: run by
``test_ddp.py`` in two gloo processes (DistributedDataParallel) and in one process.

Usage (one process per rank): ``python ddp_worker.py RANK WORLD_SIZE PORT OUT``.
"""

from __future__ import annotations

import os
import sys

import torch

import difflayers as dl

D = torch.float64
N, FEATURES, BATCH, STEPS = 6, 4, 8, 3
SOLVER = dl.ot.Sinkhorn(max_steps=20000, relaxation=1.5)


class Model(torch.nn.Module):
    """Features -> QP cost -> QP solution in a box with learnable inequality rows."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.linear = torch.nn.Linear(FEATURES, N, dtype=D)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(N, FEATURES, generator=g, dtype=D))
            self.linear.bias.copy_(torch.randn(N, generator=g, dtype=D))
        self.G = torch.nn.Parameter(torch.randn(2, N, generator=g, dtype=D))
        self.qp = dl.QPLayer()

    def forward(self, features):
        q = self.linear(features)
        P = torch.eye(N, dtype=D)
        h = torch.ones(2, dtype=D)
        lb, ub = -torch.ones(N, dtype=D), torch.ones(N, dtype=D)
        return self.qp(P, q, self.G, h, lb=lb, ub=ub)


def data():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(BATCH, FEATURES, generator=g, dtype=D)
    targets = torch.rand(BATCH, N // 2, 2, generator=g, dtype=D)
    return features, targets


def loss_fn(x, targets):
    clouds = x.reshape(x.shape[0], N // 2, 2)
    transport = dl.ot.sinkhorn(x=clouds, y=targets, epsilon=0.5, solver=SOLVER).value
    return (transport + 0.1 * x.square().sum(1)).mean()


def train(model, features, targets):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_fn(model(features), targets).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(Model())
        features, targets = data()
        share = BATCH // world  # each rank trains on its slice of the global batch
        params = train(model, features[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share])
        torch.save({name.removeprefix("module."): p for name, p in params.items()}, out)
    finally:
        # every rank done before any tears down: gloo aborts a process (std::terminate)
        # whose peer closes the connection while its threads still use it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
