"""The quickstart (``--quick``) and the README's code run and report accurate gradients."""

import math
import pathlib
import re
import runpy
import sys

import pytest

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


def test_readme_code_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
        assert namespace["W"].grad is not None and namespace["lam"].grad is not None


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
