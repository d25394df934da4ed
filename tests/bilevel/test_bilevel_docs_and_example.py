"""docs/bilevel.md runs as written; the example learns penalties that lower the validation loss."""

import pathlib
import re
import runpy
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_docs_code_blocks_run(capsys):
    text = (ROOT / "docs" / "bilevel.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    for block in blocks:
        exec(compile(textwrap.dedent(block), "bilevel.md", "exec"), {})
    out = capsys.readouterr().out
    assert "ImplicitCG" in out and "rel. error" in out


def test_example_quick(capsys):
    example = runpy.run_path(str(ROOT / "examples" / "bilevel_ridge.py"))
    result = example["main"](quick=True)
    before, after = result["before"], result["after"]
    assert after["validation"] < 0.5 * before["validation"]
    assert after["test"] < before["test"]
    history = result["history"]
    assert history.outer_loss[-1] < history.outer_loss[0] and all(history.converged)
    errors = {row["estimator"]: row["error"] for row in result["estimators"]}
    assert errors["ImplicitCG"] < 1e-8 and errors["ImplicitDense"] < 1e-8
    assert errors["Penalty"] < 1e-3
    # noisy features end up far more penalized than informative ones
    k = result["informative"]
    assert float(result["penalties"][k:].mean()) > 10 * float(result["penalties"][:k].mean())
    assert "validation loss" in capsys.readouterr().out


def test_benchmark_quick():
    """The benchmark behind docs/benchmarks.md runs; its accuracy columns hold."""
    import importlib
    import pytest

    pytest.importorskip("torchopt")
    from benchmarks.run import BENCHMARKS

    table = importlib.import_module(BENCHMARKS["bilevel_estimators"]).run(repeats=1, quick=True)

    def errors(prefix):
        return [float(line.split("|")[4]) for line in table.splitlines() if line.startswith(f"| {prefix} |")]

    assert len(errors("ImplicitCG")) == 2 and max(errors("ImplicitCG")) < 1e-8, table
    assert max(errors("ImplicitDense (Cholesky)")) < 1e-10, table
    assert max(errors("Penalty(1e3, extrapolated; Newton-CG penalized solves)")) < 1e-4, table
    assert len(errors("torchopt custom_root, default normal CG")) == 2, table


def test_memory_benchmark_quick():
    """The memory benchmark (meant for CUDA) runs; checkpointing does not change the gradient."""
    import importlib

    from benchmarks.run import BENCHMARKS

    table = importlib.import_module(BENCHMARKS["bilevel_memory"]).run(repeats=1, device="cpu", quick=True)
    rows = [line for line in table.splitlines() if line.startswith("| CheckpointedUnrolled")]
    assert len(rows) == 2 and all(float(r.split("|")[4]) < 1e-5 for r in rows), table
