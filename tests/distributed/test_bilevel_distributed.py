"""``examples/bilevel_distributed.py``: the outer loop launched with torchrun on two
gloo processes (tasks split 4 / 3, hypergradients summed with all_reduce) learns the
penalties of the same loop run in one process, and they beat the baselines."""

import os
import pathlib
import runpy
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "bilevel_distributed.py"


def test_two_ranks_match_one_process(tmp_path, capsys):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    plot = tmp_path / "bilevel_distributed.png"
    one = runpy.run_path(str(EXAMPLE))["main"](quick=True, plot=str(plot))
    out = capsys.readouterr().out
    assert plot.stat().st_size > 0 and "tasks per rank [7]" in out

    saved = tmp_path / "two.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
         "--quick", "--plot", "", "--save", str(saved)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "on 2 process(es), tasks per rank [4, 3]" in run.stdout, run.stdout
    two = torch.load(saved)
    assert two["world"] == 2
    # same penalties and curve; only the order of the sums over tasks differs
    torch.testing.assert_close(two["lam"], one["lam"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.tensor(two["outer loss"]), torch.tensor(one["history"]["outer loss"]),
                               rtol=1e-9, atol=0.0)

    # the learned per-feature penalties beat the initial and the best shared penalty on new tasks
    initial, shared, learned = one["rows"]
    assert learned["validation"] < shared["validation"] < initial["validation"]
    assert learned["test"] < 0.5 * shared["test"]
    penalties = one["lam"].exp()
    assert penalties[one["informative"]:].min() > 10 * penalties[: one["informative"]].max()
    assert max(one["history"]["inner residual"]) < 1e-6 and max(one["history"]["linear residual"]) < 1e-6
