"""The examples (``--quick``) and the README's code run and report accurate gradients."""

import math
import pathlib
import re
import runpy
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_quick(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        quickstart = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))
    finally:
        sys.path.pop(0)
    rows = quickstart["main"](quick=True)
    out = capsys.readouterr().out
    assert "quickstart" in out
    for row in rows:
        for key in ("solution error", "gradient error"):
            value = row[key]
            assert math.isnan(value) or value < 1e-5, (row["what"], key, value)
    assert sum(not math.isnan(r["gradient error"]) for r in rows) >= 3


@pytest.mark.parametrize("page", ["conic.md", "ot.md"])
def test_docs_code_runs(page, capsys):
    """Every python block of the user guide runs as written (warnings are errors)."""
    text = (ROOT / "docs" / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{page} has no python example"
    for block in blocks:
        exec(compile(textwrap.dedent(block), page, "exec"), {})


def test_readme_code_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        # every block ends with a backward pass to its leaf parameters
        leaves = [v for v in namespace.values() if isinstance(v, torch.Tensor) and v.is_leaf and v.requires_grad]
        assert leaves and all(v.grad is not None and torch.isfinite(v.grad).all() for v in leaves)


def test_conic_layers_quick(capsys, tmp_path):
    pytest.importorskip("cvxpy")
    example = runpy.run_path(str(ROOT / "examples" / "conic_layers.py"))
    result = example["main"](quick=True, plot=str(tmp_path / "curves.png"))
    out = capsys.readouterr().out
    rows = {row["metric"]: row for row in result["rows"]}
    # QPLayer's gradient matches central finite differences
    assert rows["gradient rel. error vs central differences"]["value"] < 1e-6, out
    # ConicLayer (cvxpy front end) solves the same QPs: same solution and gradient
    assert rows["gradient rel. difference vs QPLayer"]["value"] < 1e-6, out
    # SPO+ learns: its decisions beat both its own start and random costs by a wide margin
    spo = result["curves"]["SPO+"]
    random_regret = result["curves"]["random costs"][0]
    assert all(math.isfinite(v) for curve in result["curves"].values() for v in curve)
    assert spo[-1] < 0.5 * spo[0] and spo[-1] < 0.6 * random_regret, out
    assert "normalized regret" in out


@pytest.mark.parametrize("name", ["ridge_hypergradient"])
def test_benchmark_quick(name):
    pytest.importorskip("torchopt")
    from benchmarks.run import BENCHMARKS
    import importlib

    table = importlib.import_module(BENCHMARKS[name]).run(repeats=1, quick=True)
    assert "| difflayers custom_root + CG |" in table
    # implicit CG reaches float64 accuracy on both conditionings
    errors = [float(line.split("|")[4]) for line in table.splitlines() if line.startswith("| difflayers custom_root + CG ")]
    assert len(errors) == 2 and max(errors) < 1e-8, table


def test_ot_layers_quick(tmp_path):
    example = runpy.run_path(str(ROOT / "examples" / "ot_layers.py"))
    result = example["main"](quick=True, plot=str(tmp_path / "ot.png"))
    match, rank = result["matching"], result["ranking"]
    # the divergence falls by orders of magnitude and the affine map is recovered
    assert match["final"] < 1e-2 * match["initial"] and match["map error"] < 0.1
    # the learned scores rank held-out items much like the hidden score
    assert rank["spearman after"] > 0.9 and rank["spearman after"] > rank["spearman before"] + 0.2


def test_conic_and_ot_benchmarks_quick():
    """The benchmarks behind docs/benchmarks.md run; their accuracy columns hold."""
    import importlib

    from benchmarks.run import BENCHMARKS

    suites = importlib.import_module(BENCHMARKS["conic_suites"]).run(repeats=1, quick=True)
    assert "| LP (25 problems) | SUCCESS 25 |" in suites, suites
    assert "PRIMAL_INFEASIBLE 3, DUAL_INFEASIBLE 3" in suites, suites
    pytest.importorskip("ot")
    table = importlib.import_module(BENCHMARKS["sinkhorn"]).run(repeats=1, quick=True)
    rows = [line for line in table.splitlines() if line.startswith("| difflayers (")]
    assert len(rows) == 2, table  # stabilized kernel and log domain
    for row in rows:
        assert float(row.split("|")[4]) < 1e-2, table  # float32, 20 iterations, against a converged float64 run
    sparse = importlib.import_module(BENCHMARKS["sparse_ot"]).run(repeats=1, quick=True)
    row = next(line for line in sparse.splitlines() if line.startswith("| difflayers quadratic_ot, rtol 1e-09"))
    assert float(row.split("|")[4]) < 1e-8, sparse  # marginal error
