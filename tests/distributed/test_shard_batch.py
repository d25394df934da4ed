"""``dl.shard_batch``: a batch of solves split across two gloo processes gives the
outputs and (rank-averaged) gradients of one process solving the whole batch, for an
uneven batch (5 samples on 2 ranks), fewer samples than ranks, a tuple of outputs,
point-cloud Sinkhorn and a DistributedDataParallel model; and its input checks."""

import pathlib
import runpy

import pytest
import torch

import difflayers as dl

WORKER = pathlib.Path(__file__).with_name("shard_worker.py")


def test_sharded_solves_match_one_process(run_ranks):
    reference = runpy.run_path(str(WORKER))["run_all"]()
    ranks = run_ranks(WORKER)
    for results in ranks:  # every rank holds the whole batch's outputs and gradients
        assert results.keys() == reference.keys()
        for scenario, expected in reference.items():
            assert results[scenario].keys() == expected.keys(), scenario
            for name, value in expected.items():
                torch.testing.assert_close(results[scenario][name], value, rtol=1e-9, atol=1e-11,
                                           msg=f"{scenario}: {name}")
    # the comparisons are not vacuous: the gradients are far from zero
    for scenario, expected in reference.items():
        for name, value in expected.items():
            if name.startswith("grad"):
                assert float(value.abs().max()) > 1e-3, (scenario, name)


def test_one_process_is_fn():
    q = torch.randn(3, 2, dtype=torch.float64)
    assert dl.shard_batch(lambda t: 2 * t, q).equal(2 * q)
    out = dl.shard_batch(lambda a, b: (a + b, a * b), q, q)
    assert isinstance(out, tuple) and out[1].equal(q * q)


def test_bad_inputs():
    q = torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"same batch.*\[5, 4\]"):
        dl.shard_batch(lambda a, b: a, q, torch.zeros(4, 2))
    with pytest.raises(TypeError, match="leading batch dimension"):
        dl.shard_batch(lambda a: a, torch.tensor(1.0))
    with pytest.raises(TypeError, match="leading batch dimension"):
        dl.shard_batch(lambda a, b: a, q, None)
    with pytest.raises(ValueError, match="at least one"):
        dl.shard_batch(lambda: q)
    if torch.distributed.is_available() and not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="no process group is initialized"):
            dl.shard_batch(lambda a: a, q, group=object())
