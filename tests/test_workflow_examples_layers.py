"""Workflow examples (layers in networks, predict-then-optimize) run in quick mode and
reach their documented outcomes (fixed seeds)."""

import math
import pathlib
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(name: str, tmp_path: pathlib.Path) -> tuple[dict, pathlib.Path]:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    example = runpy.run_path(str(ROOT / "examples" / f"{name}.py"))
    plot = tmp_path / f"{name}.png"
    result = example["main"](quick=True, plot=str(plot))
    assert plot.stat().st_size > 0
    return result, plot


def test_optnet_digits_quick(tmp_path):
    results, _ = run_example("optnet_digits", tmp_path)
    smoothed, exact, mlp = results["OptNet, smoothed"], results["OptNet, exact"], results["MLP + softmax"]
    # similar sizes: the baseline has at least as many parameters, and at most 5 % more
    assert smoothed["parameters"] <= mlp["parameters"] <= 1.05 * smoothed["parameters"]
    # the QP layer with learned constraints classifies digits at least as well as the MLP
    assert mlp["accuracy"] > 0.9
    assert smoothed["accuracy"] > 0.93 and smoothed["accuracy"] >= mlp["accuracy"] - 0.01
    assert 0.5 < exact["accuracy"] <= 1.0 and math.isfinite(exact["brier"])


def test_deq_digits_quick(tmp_path):
    result, _ = run_example("deq_digits", tmp_path)
    assert result["test accuracy"] > 0.85
    rows = result["memory"]
    names = ("implicit, Neumann", "implicit, GMRES", "unroll")
    by = {name: [r for r in rows if r["adjoint"] == name] for name in names}
    unroll, implicit = by["unroll"], by["implicit, Neumann"]
    iterations = [r["iterations"] for r in unroll]
    assert iterations == sorted(iterations) and iterations[-1] >= 2 * iterations[0]
    # unrolled memory grows with the iterations; implicit memory stays the same and is smaller
    assert unroll[-1]["saved MiB"] > 2 * unroll[0]["saved MiB"]
    for name in ("implicit, Neumann", "implicit, GMRES"):
        saved = [r["saved MiB"] for r in by[name]]
        assert max(saved) <= 1.01 * min(saved)
    for i, u in zip(implicit, unroll):
        assert i["saved MiB"] < 0.5 * u["saved MiB"]
    # (peak RSS is printed for information: in a long test process the high-water mark
    # is often set by earlier tests, so the exact saved bytes above are what is asserted)
    # at a tight forward tolerance implicit and unrolled gradients agree
    assert implicit[-1]["grad rel. difference"] < 1e-5


def test_shortest_path_quick(tmp_path):
    result, _ = run_example("shortest_path", tmp_path)
    regret = result["regret"]
    assert all(math.isfinite(v) and v >= -1e-9 for values in regret.values() for v in values)
    misspecified = [i for i, d in enumerate(result["degrees"]) if d >= 4]
    assert misspecified
    for i in misspecified:
        # training on the decision beats fitting the costs when the model is misspecified
        assert regret["SPO+"][i] < regret["two-stage MSE"][i]


def test_portfolio_quick(tmp_path):
    result, _ = run_example("portfolio", tmp_path)
    obj = result["objective"]
    assert all(math.isfinite(v) for values in obj.values() for v in values)
    for i, degree in enumerate(result["degrees"]):
        # both learned policies beat equal weights; none beats the oracle
        for method in ("two-stage MSE", "decision-focused"):
            assert obj["equal weight"][i] < obj[method][i] <= obj["oracle"][i] + 1e-3
        if degree >= 4:
            # misspecified mean model: training through the QP beats least squares
            assert obj["decision-focused"][i] > obj["two-stage MSE"][i]
