"""float32, bfloat16 and float16 inputs: the documented precision policy of every layer.

Policy (``difflayers/solvers/_precision.py``, ``docs/precision.md``): float64 and float32
are solved as given; float16 and bfloat16 are solved in float32 and the outputs cast
back, with gradients reaching the inputs in their dtype; integer inputs raise
``TypeError``; mixed dtypes within a call raise ``TypeError``.

The problems are those of the accuracy table of ``docs/precision.md``
(``benchmarks/precision.py``): each runs on inputs rounded to the dtype under test and,
as the reference, on the same rounded values in float64.
"""

import math
import warnings

import pytest
import torch

import difflayers as dl
from benchmarks.precision import CASES, measure_case
from difflayers.solvers import compute_dtype

# Relative tolerances: 16-bit outputs are float32 solves rounded once to 8 (bfloat16) or
# 11 (float16) significant bits (2^-9, 2^-12 per entry); float32 solves stop at rtol 1e-5.
OUTPUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
GRADIENT_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_layer_accuracy_against_float64(case, dtype):
    if case.run is None:
        pytest.importorskip("cvxpy")
    result = measure_case(case, dtype)
    assert result["dtypes_ok"], f"{case.name}: output or gradients not in {dtype}"
    assert result["output"] < OUTPUT_TOL[dtype], result
    if case.grad:
        assert result["gradient"] < GRADIENT_TOL[dtype], result


def test_compute_dtype():
    assert compute_dtype(torch.float64) == torch.float64
    assert compute_dtype(torch.float32) == torch.float32
    assert compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float16) == torch.float32
    with pytest.raises(TypeError, match="floating-point"):
        compute_dtype(torch.int64)


# ----------------------------------------------------------------------------- integer inputs


def _int_calls():
    i = torch.ones(2, 3, dtype=torch.int64)
    i1 = torch.ones(3, dtype=torch.int64)
    f = torch.ones(2, 3)
    cone = dl.conic.Cones(nonneg=3)
    yield "fixed_point", lambda: dl.fixed_point(lambda z: 0.5 * z, i)
    yield "root_find", lambda: dl.root_find(lambda z: z - 1, i)
    yield "argmin", lambda: dl.argmin(lambda z: (z**2).sum(1), i)
    yield "least_squares", lambda: dl.least_squares(lambda z: z - 1, i)
    yield "custom_root", lambda: dl.custom_root(lambda z: z - 1)(lambda z0: z0)(i)
    yield "linear_solve", lambda: dl.linear_solve(torch.eye(3), i)
    yield "linear_solve A", lambda: dl.linear_solve(torch.eye(3, dtype=torch.int64), f)
    yield "QPLayer", lambda: dl.QPLayer()(torch.eye(3, dtype=torch.int64), i1)
    yield "solve_conic", lambda: dl.conic.solve_conic(None, i[:1], -torch.eye(3, dtype=torch.int64)[None],
                                                      torch.zeros(1, 3, dtype=torch.int64), cone)
    yield "sinkhorn cost", lambda: dl.ot.sinkhorn(cost=torch.ones(3, 4, dtype=torch.int64), epsilon=0.1)
    yield "sinkhorn clouds", lambda: dl.ot.sinkhorn(x=torch.ones(3, 2, dtype=torch.int64),
                                                    y=torch.ones(4, 2, dtype=torch.int64), epsilon=0.1)
    yield "SinkhornDivergence", lambda: dl.ot.SinkhornDivergence(epsilon=0.1)(torch.ones(3, 2, dtype=torch.int64),
                                                                             torch.ones(4, 2, dtype=torch.int64))
    yield "soft_sort", lambda: dl.ot.soft_sort(i1)
    yield "quadratic_ot", lambda: dl.ot.quadratic_ot(cost=torch.ones(3, 4, dtype=torch.int64), epsilon=0.1)
    yield "PDELayer", lambda: dl.pde.PDELayer(lambda u, k: u - k, grid=dl.pde.Grid((4,)))(
        torch.ones(1, 4, dtype=torch.int64))
    yield "hypergradient", lambda: dl.bilevel.hypergradient(lambda w, lam: (w**2).sum(),
                                                            lambda w, lam: (lam * w**2).sum(), i1, i1)


@pytest.mark.parametrize("name, call", list(_int_calls()), ids=[n for n, _ in _int_calls()])
def test_integer_inputs_raise_type_error(name, call):
    with pytest.raises(TypeError):
        call()


def test_integer_conic_layer_parameter_raises_type_error():
    cp = pytest.importorskip("cvxpy")
    x, c = cp.Variable(2), cp.Parameter(2)
    layer = dl.ConicLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - c))), parameters=[c], variables=[x])
    with pytest.raises(TypeError):
        layer(torch.ones(2, dtype=torch.int64))


# ----------------------------------------------------------------------------- mixed dtypes


def _mixed_calls():
    h, f = torch.bfloat16, torch.float32
    yield "fixed_point", lambda: dl.fixed_point(lambda z, c: 0.5 * z + c, torch.zeros(2, 3, dtype=h),
                                                torch.ones(2, 3, dtype=f))
    yield "linear_solve", lambda: dl.linear_solve(torch.eye(3, dtype=f), torch.ones(2, 3, dtype=h))
    yield "QPLayer", lambda: dl.QPLayer()(torch.eye(3, dtype=f), torch.ones(3, dtype=h))
    yield "sinkhorn", lambda: dl.ot.sinkhorn(x=torch.rand(3, 2, dtype=h), y=torch.rand(4, 2, dtype=f), epsilon=0.1)
    yield "SinkhornDivergence", lambda: dl.ot.SinkhornDivergence(epsilon=0.1)(torch.rand(3, 2, dtype=h),
                                                                             torch.rand(4, 2, dtype=f))
    yield "PDELayer", lambda: dl.pde.PDELayer(lambda u, k: u - k, grid=dl.pde.Grid((4,)))(
        torch.ones(1, 4, dtype=h), u0=torch.zeros(1, 4, dtype=f))
    yield "hypergradient", lambda: dl.bilevel.hypergradient(lambda w, lam: (w**2).sum(),
                                                            lambda w, lam: (lam * w**2).sum(),
                                                            torch.ones(3, dtype=h), torch.ones(3, dtype=f))


@pytest.mark.parametrize("name, call", list(_mixed_calls()), ids=[n for n, _ in _mixed_calls()])
def test_mixed_16bit_and_float32_inputs_raise_type_error(name, call):
    with pytest.raises(TypeError, match="dtype"):
        call()


# ----------------------------------------------------------------------------- details of the policy


def test_problem_function_sees_float32_and_a_captured_16bit_matrix_is_explained():
    seen = []
    W = torch.full((3, 3), 0.1, dtype=torch.bfloat16)

    def T(z, W):
        seen.append(z.dtype)
        return torch.tanh(z @ W.T + 1)

    z = dl.fixed_point(T, torch.zeros(2, 3, dtype=torch.bfloat16), W)
    assert z.dtype == torch.bfloat16 and set(seen) == {torch.float32}
    # the same matrix captured instead of passed: a matrix product of float32 and bfloat16
    with pytest.raises(TypeError, match=r"\.to\(torch\.float32\)"):
        dl.fixed_point(lambda z: torch.tanh(z @ W.T + 1), torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"\.to\(torch\.float32\)"):
        A = W + torch.eye(3, dtype=torch.bfloat16)
        dl.linear_solve(lambda x: x @ A.T, torch.ones(2, 3, dtype=torch.bfloat16), dl.solvers.CG(), symmetric=True,
                        positive_definite=True)


def test_sinkhorn_result_16bit_fields():
    x = torch.rand(2, 6, 2, dtype=torch.float64).to(torch.bfloat16)
    y = torch.rand(2, 7, 2, dtype=torch.float64).to(torch.bfloat16)
    res = dl.ot.sinkhorn(x=x, y=y, epsilon=0.05)
    ref = dl.ot.sinkhorn(x=x.double(), y=y.double(), epsilon=0.05)
    for name in ("value", "f", "g", "plan"):
        assert getattr(res, name).dtype == torch.bfloat16, name
    assert res.potentials[0].dtype == torch.float32 and res.geometry.x.dtype == torch.float32
    # the plan comes from the float32 potentials: rounding f and g first would multiply
    # their error by |f| / eps inside the exponential
    assert torch.allclose(res.plan.double(), ref.plan, rtol=1e-2, atol=1e-5)
    v = torch.randn(2, 7, 3, dtype=torch.bfloat16)
    Pv = res.apply_plan(v)
    assert Pv.dtype == torch.bfloat16
    assert torch.allclose(Pv.double(), ref.apply_plan(v.double()), rtol=2e-2, atol=2e-3)


def test_16bit_weights_with_rounded_masses_are_accepted():
    # 1/7 and 1/5 rounded to bfloat16 sum to 0.998 and 1.001: equal up to the rounding
    a = torch.full((7,), 1 / 7).to(torch.bfloat16)
    b = torch.full((5,), 1 / 5).to(torch.bfloat16)
    assert float(a.float().sum() - b.float().sum()) != 0.0
    res = dl.ot.sinkhorn(cost=torch.rand(7, 5).to(torch.bfloat16), a=a, b=b, epsilon=0.1)
    assert res.value.dtype == torch.bfloat16 and bool(res.status == 0)
    with pytest.raises(ValueError, match="same total mass"):
        dl.ot.sinkhorn(cost=torch.rand(7, 5).to(torch.bfloat16), a=a, b=2 * b, epsilon=0.1)


def test_small_epsilon_warning_covers_16bit_inputs():
    with pytest.warns(RuntimeWarning, match="float32 potentials"):
        dl.ot.sinkhorn(cost=(10 * torch.rand(5, 6)).to(torch.bfloat16), epsilon=1e-4, throw=False,
                       solver=dl.ot.Sinkhorn(max_steps=1))


def test_qp_duals_and_solution_in_16bit():
    P = torch.eye(2, dtype=torch.bfloat16)
    q = torch.tensor([[-1.0, -1.0]], dtype=torch.bfloat16, requires_grad=True)
    G, h = torch.ones(1, 2, dtype=torch.bfloat16), torch.ones(1, dtype=torch.bfloat16)
    x, lam, nu, sol = dl.QPLayer()(P, q, G, h, return_duals=True, return_solution=True)
    assert x.dtype == lam.dtype == nu.dtype == sol.z.dtype == torch.bfloat16
    assert torch.allclose(x.float(), torch.tensor([[0.5, 0.5]]), atol=1e-2)
    x.sum().backward()
    assert q.grad.dtype == torch.bfloat16


def test_conic_layer_warns_when_its_maps_are_cast_to_16bit():
    cp = pytest.importorskip("cvxpy")
    x, c = cp.Variable(2), cp.Parameter(2)
    layer = dl.ConicLayer(cp.Problem(cp.Minimize(cp.sum_squares(x - c)), [x <= 0.3]), parameters=[c], variables=[x])
    c16 = torch.tensor([1.0, -1.0], dtype=torch.bfloat16)
    (out,) = layer(c16)  # 16-bit parameters need no cast of the layer
    assert out.dtype == torch.bfloat16
    with pytest.warns(RuntimeWarning, match="canonical maps"):
        layer.to(torch.bfloat16)(c16)


def test_hypergradient_16bit_warm_start_keeps_float32():
    X = torch.randn(30, 4)
    y = X.sum(1)
    inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w**2).sum()  # noqa: E731
    outer = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean()  # noqa: E731
    w0, lam = torch.zeros(4, dtype=torch.bfloat16), torch.full((4,), 0.1, dtype=torch.bfloat16)
    g, info = dl.bilevel.hypergradient(outer, inner, w0, lam)
    assert g.dtype == info.w.dtype == info.value.dtype == torch.bfloat16
    assert info.state.w.dtype == torch.float32
    g2, info2 = dl.bilevel.hypergradient(outer, inner, w0, lam, state=info.state)
    assert g2.dtype == torch.bfloat16 and torch.allclose(g2.float(), g.float(), rtol=1e-2, atol=1e-4)
    assert bool(info2.converged.all())


def test_float32_stays_float32_and_16bit_solves_use_float32_tolerances():
    # a contraction whose float32 fixed point needs more steps than bfloat16 tolerances would
    T = lambda z, c: 0.9 * torch.cos(z) + c  # noqa: E731
    c = torch.full((1, 4), 0.1)
    for dtype in (torch.float32, torch.bfloat16):
        sol = dl.fixed_point(T, torch.zeros(1, 4, dtype=dtype), c.to(dtype), solver=dl.solvers.Picard(max_steps=2000),
                             return_solution=True)
        assert sol.value.dtype == dtype
        residual = float(sol.stats["residual"].max())
        assert residual <= 1e-5 * math.sqrt(4) * 2, (dtype, residual)


def test_no_warning_on_16bit_paths():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dl.ot.soft_rank(torch.randn(3, 6, dtype=torch.float16))
        dl.pde.PDELayer(lambda u, k: k * u - 1.0, symmetric=True, linear=True)(torch.ones(2, 5, dtype=torch.float16),
                                                                               u0=torch.zeros(2, 5,
                                                                                              dtype=torch.float16))


def test_solves_run_without_autocast():
    """Under torch.autocast(bfloat16) the iterations would run their matrix products in
    bfloat16 and stall at its rounding; solves turn autocast off and match float32."""
    gen = torch.Generator().manual_seed(0)
    W, x = 0.5 * torch.randn(16, 16, generator=gen) / 4, torch.randn(4, 16, generator=gen)
    T = lambda z, W, x: torch.tanh(z @ W.T + x)  # noqa: E731
    P, q = torch.eye(3), torch.randn(2, 3, generator=gen)
    G, h = torch.ones(1, 3), torch.ones(1)
    A = W @ W.T + torch.eye(16)  # built outside autocast: the user's own products are autocast's business
    calls = {
        "fixed_point": lambda: dl.fixed_point(T, torch.zeros(4, 16), W, x),
        "QPLayer": lambda: dl.QPLayer()(P, q, G, h),
        "linear_solve": lambda: dl.linear_solve(A, x, dl.solvers.CG(), symmetric=True, positive_definite=True).value,
    }
    for name, call in calls.items():
        expected = call()
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = call()
                assert torch.is_autocast_enabled("cpu")  # restored for the rest of the model
        assert got.dtype == torch.float32, name
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), name


def test_precision_page_code_runs():
    import pathlib
    import re
    import textwrap

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "precision.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(textwrap.dedent(block), "precision.md", "exec"), {})
