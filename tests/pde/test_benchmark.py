"""The cases of benchmarks/pde_layer.py run (quick sizes) and agree on their gradients."""

import torch

from benchmarks import pde_layer


def test_benchmark_cases_agree():
    for title, cases in pde_layer._tables(quick=True, device=torch.device("cpu"))[:2]:
        reference = cases[0][1]()
        for name, run, _, _ in cases[1:]:
            assert pde_layer._error(run(), reference) < 1e-8, (title, name)


def test_scipy_comparison_quick():
    table = pde_layer._scipy_table(quick=True, repeats=1)
    if table is not None:  # SciPy installed
        row = next(line for line in table.splitlines() if line.startswith("| difflayers"))
        assert float(row.split("|")[4]) < 1e-10, table
