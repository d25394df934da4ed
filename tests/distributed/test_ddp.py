"""Layers inside torch.distributed: two gloo processes training with
DistributedDataParallel end with the parameters of one process on the global batch."""

import pathlib
import runpy

import torch

WORKER = pathlib.Path(__file__).with_name("ddp_worker.py")


def test_ddp_two_processes_match_one_process(run_ranks):
    worker = runpy.run_path(str(WORKER))
    reference = worker["train"](worker["Model"](), *worker["data"]())
    for params in run_ranks(WORKER):
        assert params.keys() == reference.keys()
        for name, value in params.items():
            # DDP averages the two half-batch gradients: the mean over the global batch
            torch.testing.assert_close(value, reference[name], rtol=1e-9, atol=1e-11, msg=name)
    # the run moved the parameters (the comparison is not vacuous)
    start = {k: v.detach() for k, v in worker["Model"]().named_parameters()}
    assert max(float((reference[k] - start[k]).abs().max()) for k in reference) > 1e-3
