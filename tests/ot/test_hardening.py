"""Property-based bad-input tests of the transport entry points: every input gives a
clear exception or a result whose per-problem status says what happened, and no NaN
leaves without a status saying so."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import difflayers as dl

F64 = torch.float64
STATUSES = {int(s) for s in dl.Status}


@st.composite
def problems(draw):
    batch = draw(st.integers(0, 3))
    n, m = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, 2, generator=g, dtype=F64)
    y = torch.rand(batch, m, 2, generator=g, dtype=F64)
    a = torch.rand(batch, n, generator=g, dtype=F64) * (torch.rand(batch, n, generator=g) > 0.3)
    b = torch.rand(batch, m, generator=g, dtype=F64) * (torch.rand(batch, m, generator=g) > 0.3)
    a[:, 0] += 0.1  # positive mass
    b[:, 0] += 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    poison = draw(st.sampled_from([None, "x", "a", "negative", "mass"]))
    if batch and poison == "x":
        x[0, 0, 0] = draw(st.sampled_from([math.nan, math.inf]))
    if batch and poison == "a":
        a[0, 0] = math.nan
    if batch and poison == "negative":
        a[0, 0] = -0.5
    if batch and poison == "mass":
        a = a * 2.0
    epsilon = draw(st.sampled_from([1e-3, 0.05, 1.0]))
    max_steps = draw(st.sampled_from([0, 1, 50]))
    return dict(x=x, y=y, a=a, b=b, epsilon=epsilon), max_steps, poison if batch else None


def _check_outcome(res, batch):
    assert res.status.shape == (batch,)
    assert set(res.status.tolist()) <= STATUSES
    ok = res.status == int(dl.Status.SUCCESS)
    # a successful problem has a finite value; a non-finite one must carry a failure status
    assert bool(torch.isfinite(res.value[ok]).all())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["sinkhorn", "newton", "quadratic"]))
def test_transport_entry_points_fail_clearly_or_report_status(case, method):
    kwargs, max_steps, poison = case
    batch = kwargs["x"].shape[0]
    if method == "sinkhorn":
        run = lambda: dl.ot.sinkhorn(**kwargs, solver=dl.ot.Sinkhorn(max_steps=max_steps), throw=False)  # noqa: E731
    elif method == "newton":
        solver = dl.ot.SinkhornNewton(warmup=max_steps, newton_steps=max_steps)
        run = lambda: dl.ot.sinkhorn(**kwargs, solver=solver, throw=False)  # noqa: E731
    else:
        solver = dl.ot.SemismoothNewton(max_steps=max_steps)
        run = lambda: dl.ot.quadratic_ot(**kwargs, solver=solver, throw=False)  # noqa: E731
    if poison is not None:
        expected = {"x": "NaN or Inf", "a": "NaN or Inf", "negative": "negative", "mass": "same total mass"}[poison]
        with pytest.raises(ValueError, match=expected):
            run()
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tiny epsilons in few steps
        res = run()
    _check_outcome(res, batch)
    if max_steps == 0 and batch:
        assert bool((res.status != int(dl.Status.SUCCESS)).any() or (res.stats["num_steps"] == 0).all())


@pytest.mark.parametrize("bad", ["zero points", "one point each"])
def test_degenerate_sizes(bad):
    if bad == "zero points":
        with pytest.raises(ValueError, match="at least one point"):
            dl.ot.sinkhorn(x=torch.rand(2, 0, 2, dtype=F64), y=torch.rand(2, 3, 2, dtype=F64), epsilon=0.1)
        with pytest.raises(ValueError, match="at least two"):
            dl.ot.soft_sort(torch.rand(3, 1, dtype=F64))
    else:
        x, y = torch.rand(2, 1, 2, dtype=F64), torch.rand(2, 1, 2, dtype=F64)
        res = dl.ot.sinkhorn(x=x, y=y, epsilon=0.1)
        torch.testing.assert_close(res.plan, torch.ones(2, 1, 1, dtype=F64))
        torch.testing.assert_close(res.value, (x - y).square().sum((1, 2)))


def test_empty_batches_give_empty_results():
    x, y = torch.rand(0, 4, 2, dtype=F64), torch.rand(0, 5, 2, dtype=F64)
    assert dl.ot.sinkhorn(x=x, y=y, epsilon=0.1).value.shape == (0,)
    assert dl.ot.quadratic_ot(x=x, y=y, epsilon=0.1).plan.shape == (0, 4, 5)
    assert dl.ot.soft_sort(torch.rand(0, 5, dtype=F64)).shape == (0, 5)
    assert dl.ot.soft_rank(torch.rand(0, 5, dtype=F64)).shape == (0, 5)
