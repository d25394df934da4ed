"""Layers inside torch.distributed: two gloo processes training with
DistributedDataParallel end with the parameters of one process on the global batch."""

import os
import pathlib
import runpy
import socket
import subprocess
import sys

import pytest
import torch

WORKER = pathlib.Path(__file__).with_name("ddp_worker.py")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    worker = runpy.run_path(str(WORKER))
    reference = worker["train"](worker["Model"](), *worker["data"]())

    port, world = _free_port(), 2
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(port), str(outs[r])], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    for out in outs:
        params = torch.load(out)
        assert params.keys() == reference.keys()
        for name, value in params.items():
            # DDP averages the two half-batch gradients: the mean over the global batch
            torch.testing.assert_close(value, reference[name], rtol=1e-9, atol=1e-11, msg=name)
    # the run moved the parameters (the comparison is not vacuous)
    start = {k: v.detach() for k, v in worker["Model"]().named_parameters()}
    assert max(float((reference[k] - start[k]).abs().max()) for k in reference) > 1e-3
