"""Launching worker scripts as gloo ranks on this machine."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def run_ranks(tmp_path):
    """``run_ranks(worker, world=2)`` runs ``worker rank world port out`` in ``world``
    processes, asserts that each exits cleanly (its log is the failure message), and
    returns what each rank saved to ``out`` with ``torch.save``."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")

    def run(worker: pathlib.Path, world: int = 2) -> list:
        port = _free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
        procs = [
            subprocess.Popen([sys.executable, str(worker), str(r), str(world), str(port), str(outs[r])], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(world)
        ]
        logs = [p.communicate(timeout=300)[0] for p in procs]
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log
        return [torch.load(out) for out in outs]

    return run
