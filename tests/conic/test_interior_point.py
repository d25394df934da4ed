"""The batched interior point (``solve_conic``, ``QPLayer``) against Clarabel, the
constructed optima of ``difflayers.testing`` and the KKT gradient oracle.

Suites are seeded batches of equal-shape problems (100 LPs, 100 SOCPs, 60 QPs);
infeasible and unbounded elements are mixed into batches of solvable ones.
"""

from __future__ import annotations

import pytest
import torch

import difflayers as dl
from difflayers import ConvergenceError
from difflayers.conic import Cones, InteriorPoint, solve_conic
from difflayers.solvers import Status
from difflayers.testing import (
    concat_problems,
    degenerate_lp,
    dual_infeasible_lp,
    primal_infeasible_lp,
    qp_kkt_gradients,
    qp_to_conic,
    random_conic_qp,
    random_lp,
    random_qp,
    random_socp,
    reference_solve,
)

pytest.importorskip("clarabel")

DTYPE = torch.float64

# (batch, n, m, m_eq, seed): 100 LPs in four shapes.
LP_SUITE = [(25, 6, 12, 0, 1), (25, 10, 20, 2, 2), (25, 15, 25, 3, 3), (25, 8, 30, 0, 4)]
# (batch, n, soc, m_ineq, m_eq, quadratic, seed): 100 SOCPs.
SOCP_SUITE = [
    (25, 5, (3, 4), 0, 0, False, 11),
    (25, 8, (3, 4, 5), 2, 1, False, 12),
    (25, 10, (2, 1, 6, 3), 4, 2, False, 13),
    (25, 6, (4, 4), 3, 0, True, 14),
]
# (batch, n, m_ineq, m_eq, rank, seed): strictly convex, rank deficient, and P = 0.
QP_SUITE = [(20, 10, 8, 2, None, 21), (20, 10, 10, 2, 4, 22), (20, 8, 10, 1, 0, 23)]


def _bmv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def _objective(P, q, x):
    value = (q * x).sum(-1)
    return value if P is None else value + 0.5 * (x * _bmv(P, x)).sum(-1)


def _assert_objective_close(got, want, rtol):
    err = (got - want).abs() / want.abs().clamp_min(1.0)
    assert bool((err <= rtol).all()), f"objective off by up to {float(err.max()):.2e} (elements {err.argmax()})"


def _assert_x_close(got, want, tol):
    err = (got - want).abs().amax(-1) / want.abs().amax(-1).clamp_min(1.0)
    assert bool((err <= tol).all()), f"x off by up to {float(err.max()):.2e} (element {int(err.argmax())})"


def _assert_optimality(batch, sol, tol=1e-6):
    """Stationarity, primal feasibility, s in K, z in K*, complementarity."""
    P, q, A, b, cones = batch
    x, z, s = sol.x, sol.z, sol.s
    stationarity = q + _bmv(A.mT, z) + (0 if P is None else _bmv(P, x))
    scale = 1.0 + q.abs().amax(-1, keepdim=True)
    assert float((stationarity.abs() / scale).max()) < tol, "P x + q + A'z != 0 (sign convention of z?)"
    assert float(((_bmv(A, x) + s - b).abs() / (1.0 + b.abs().amax(-1, keepdim=True))).max()) < tol
    if cones.zero:
        assert float(s[:, :cones.zero].abs().max()) < tol, "s != 0 on the equality rows"
    if cones.nonneg:
        nonneg = slice(cones.zero, cones.zero + cones.nonneg)
        assert float(s[:, nonneg].min()) > -tol and float(z[:, nonneg].min()) > -tol, "outside the orthant"
    row = cones.zero + cones.nonneg
    for d in cones.soc:
        for v in (s, z):
            block = v[:, row:row + d]
            assert bool((block[:, 1:].norm(dim=-1) <= block[:, 0] + tol).all()), "outside a second-order cone"
        row += d
    gap = (s * z)[:, cones.zero:].sum(-1).abs()
    assert float(gap.max()) < tol * 10, "s'z != 0"


# ----------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("batch, n, m, m_eq, seed", LP_SUITE)
def test_lp_suite_matches_clarabel(batch, n, m, m_eq, seed):
    problems = random_lp(batch, n, m, m_eq=m_eq, seed=seed)
    sol = solve_conic(*problems)
    assert bool((sol.status == Status.SUCCESS).all()), sol.status
    ref = reference_solve(*problems)
    assert set(ref.status) == {"SUCCESS"}
    _assert_objective_close(_objective(None, problems.q, sol.x), ref.objective, 1e-6)
    _assert_optimality(problems, sol)


def test_degenerate_lp_objective_matches_clarabel():
    problems = degenerate_lp(20, 5, 9, seed=5)
    sol = solve_conic(*problems)
    assert bool((sol.status == Status.SUCCESS).all()), sol.status
    ref = reference_solve(*problems)
    _assert_objective_close(_objective(None, problems.q, sol.x), ref.objective, 1e-6)
    _assert_optimality(problems, sol)


@pytest.mark.parametrize("batch, n, soc, m_ineq, m_eq, quadratic, seed", SOCP_SUITE)
def test_socp_suite_matches_clarabel(batch, n, soc, m_ineq, m_eq, quadratic, seed):
    problems = random_socp(batch, n, soc, m_ineq=m_ineq, m_eq=m_eq, quadratic=quadratic, seed=seed)
    sol = solve_conic(*problems)
    assert bool((sol.status == Status.SUCCESS).all()), sol.status
    objective = _objective(problems.P, problems.q, sol.x)
    ref = reference_solve(*problems)
    # Clarabel may end AlmostSolved on second-order cones; its optimal value is still ~1e-8.
    assert set(ref.status) <= {"SUCCESS", "INACCURATE"}
    _assert_objective_close(objective, ref.objective, 1e-6)
    known = problems.solution
    _assert_objective_close(objective, _objective(problems.P, problems.q, known.x), 1e-6)
    _assert_optimality(problems, sol)


@pytest.mark.parametrize("batch, n, m_ineq, m_eq, rank, seed", QP_SUITE)
def test_qp_suite_x_matches_constructed_optimum(batch, n, m_ineq, m_eq, rank, seed):
    """The optimum is unique by construction; Clarabel agrees with it to ~1e-9."""
    problems = random_conic_qp(batch, n, m_ineq, m_eq=m_eq, rank=rank, seed=seed)
    sol = solve_conic(*problems)
    assert bool((sol.status == Status.SUCCESS).all()), sol.status
    _assert_x_close(sol.x, problems.solution.x, 1e-6)
    ref = reference_solve(*problems)
    _assert_x_close(sol.x, ref.x, 1e-6)
    _assert_objective_close(_objective(problems.P, problems.q, sol.x), ref.objective, 1e-6)
    _assert_optimality(problems, sol)


def test_lp_with_zero_P_equals_P_none():
    problems = random_lp(4, 5, 9, seed=6)
    P0 = torch.zeros(4, 5, 5, dtype=DTYPE)
    x_none = solve_conic(*problems).x
    x_zero = solve_conic(P0, *tuple(problems)[1:]).x
    torch.testing.assert_close(x_zero, x_none, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ QPLayer


def test_qplayer_matches_clarabel_with_and_without_parts():
    from difflayers.conic import QPLayer

    layer = QPLayer()
    P, q, G, h, A, b = random_qp(8, 12, 6, 3, seed=30)
    for args in [(P, q, G, h, A, b), (P, q, G, h, None, None), (P, q, None, None, A, b)]:
        x = layer(*args)
        ref = reference_solve(*qp_to_conic(*args))
        _assert_x_close(x, ref.x, 1e-6)
    # unbatched P, G, h broadcast against a batched q
    x = layer(P[0], q, G[0], h[0])
    ref = reference_solve(*qp_to_conic(P[0], q, G[0], h[0]))
    _assert_x_close(x, ref.x, 1e-6)
    # fully unbatched
    x1 = layer(P[0], q[0], G[0], h[0], A[0], b[0])
    assert x1.shape == (12,)
    _assert_x_close(x1[None], reference_solve(*qp_to_conic(P[:1], q[:1], G[:1], h[:1], A[:1], b[:1])).x, 1e-6)


def test_qplayer_gradients_match_kkt_oracle():
    """Gradients of sum(w * x*) w.r.t. all six inputs, against the active-set KKT oracle.

    2 equalities + 3 active inequalities < 8 variables: x* is not a vertex, so every
    gradient (P included) is nonzero. An unbatched P receives the sum over the batch."""
    from difflayers.conic import QPLayer

    m_eq = 2
    problems = random_conic_qp(4, 8, 6, m_eq=m_eq, seed=31)
    P, q, A_all, b_all, _ = problems
    G, h, A, b = A_all[:, m_eq:], b_all[:, m_eq:], A_all[:, :m_eq], b_all[:, :m_eq]
    known = problems.solution
    w = torch.randn(4, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(32))
    oracle = qp_kkt_gradients(P, q, G, h, A, b, known.x, known.z[:, m_eq:], known.z[:, :m_eq], w)

    inputs = [t.clone().requires_grad_(True) for t in (P, q, G, h, A, b)]
    x = QPLayer()(*inputs)
    grads = torch.autograd.grad((w * x).sum(), inputs)
    for name, got, want in zip("P q G h A b".split(), grads, oracle[:6]):
        err = float((got - want).norm() / want.norm())
        assert err < 1e-5, f"d/d{name}: relative error {err:.2e}"

    P0 = P[0].clone().requires_grad_(True)
    x = QPLayer()(P0, q, G, h, A, b)
    (gP0,) = torch.autograd.grad((w * x).sum(), P0)
    shared = qp_kkt_gradients(P[0], q, G, h, A, b, *_solve_reference(P[0], q, G, h, A, b), w)
    torch.testing.assert_close(gP0, shared.P.sum(0), rtol=1e-5, atol=1e-8)


def _solve_reference(P, q, G, h, A, b):
    ref = reference_solve(*qp_to_conic(P, q, G, h, A, b), tol=1e-12)
    p = A.shape[-2]
    return ref.x, ref.z[:, p:], ref.z[:, :p]


# ----------------------------------------------------------------------- failures


def _mixed_batch():
    """[ok, primal infeasible, ok, dual infeasible, ok, primal infeasible] LPs of one shape."""
    kwargs = dict(n=5, m=10, m_eq=1)
    ok = random_lp(3, seed=40, **kwargs)
    pinf = primal_infeasible_lp(2, seed=41, **kwargs)
    dinf = dual_infeasible_lp(1, seed=42, **kwargs)
    order = [ok.select(0), pinf.select(0), ok.select(1), dinf.select(0), ok.select(2), pinf.select(1)]
    expected = [Status.SUCCESS, Status.PRIMAL_INFEASIBLE, Status.SUCCESS, Status.DUAL_INFEASIBLE,
                Status.SUCCESS, Status.PRIMAL_INFEASIBLE]
    return concat_problems(order), torch.tensor([int(s) for s in expected])


@pytest.mark.parametrize("on_failure", ["nan", "mask"])
def test_infeasible_and_unbounded_elements_do_not_spoil_the_batch(on_failure):
    problems, expected = _mixed_batch()
    ref = reference_solve(*problems)
    assert ref.status == ("SUCCESS", "PRIMAL_INFEASIBLE", "SUCCESS", "DUAL_INFEASIBLE", "SUCCESS",
                          "PRIMAL_INFEASIBLE")
    A = problems.A.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="failed"):
        sol = solve_conic(None, problems.q, A, problems.b, problems.cones, on_failure=on_failure)
    assert torch.equal(sol.status.cpu(), expected)
    ok = expected == int(Status.SUCCESS)
    _assert_objective_close(_objective(None, problems.q[ok], sol.x[ok].detach()), ref.objective[ok], 1e-6)
    if on_failure == "nan":
        assert bool(sol.x[~ok].isnan().all()) and bool(sol.x[ok].isfinite().all())
    else:
        assert bool((sol.x[~ok] == 0).all())
        (gA,) = torch.autograd.grad(sol.x.sum(), A)
        assert bool(gA.isfinite().all()) and bool((gA[~ok] == 0).all()) and bool((gA[ok] != 0).any())


def test_raise_names_the_failed_indices():
    problems, expected = _mixed_batch()
    with pytest.raises(ConvergenceError) as info:
        solve_conic(*problems, on_failure="raise")
    failed = (expected != int(Status.SUCCESS)).nonzero().flatten().tolist()
    assert list(info.value.indices) == failed
    assert [int(s) for s in info.value.statuses] == expected[failed].tolist()
    assert "PRIMAL_INFEASIBLE" in str(info.value) and "DUAL_INFEASIBLE" in str(info.value)


def _rank_deficient_batch(dtype):
    """Rank-deficient LPs and QPs of one shape: ``A`` has dependent equality rows (twice
    ``x1 + x2 = c``) or a null space with ``P`` absent, where the regularized KKT
    steps grow like ``1 / regularization`` along the null space.

    Rows: two equalities, then ``x >= 0`` as two orthant rows, then one free row
    ``x1 - x2 <= 10`` (inactive unless the problem is unbounded along it).
    """
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, -1.0]], dtype=dtype)
    cases = [
        # (P, q, b, expected status, optimal x or None)
        (None, [1.0, 2.0], [1.0, 1.0, 0.0, 0.0, 10.0], Status.SUCCESS, [1.0, 0.0]),
        (None, [1.0, 2.0], [1.0, 2.0, 0.0, 0.0, 10.0], Status.PRIMAL_INFEASIBLE, None),
        ("I", [1.0, 2.0], [1.0, 1.0, 0.0, 0.0, 10.0], Status.SUCCESS, [1.0, 0.0]),
        ("I", [1.0, 2.0], [1.0, 2.0, 0.0, 0.0, 10.0], Status.PRIMAL_INFEASIBLE, None),
    ]
    P = torch.stack([torch.zeros(2, 2, dtype=dtype) if c[0] is None else torch.eye(2, dtype=dtype) for c in cases])
    q = torch.tensor([c[1] for c in cases], dtype=dtype)
    b = torch.tensor([c[2] for c in cases], dtype=dtype)
    return P, q, A.expand(len(cases), -1, -1), b, [c[3] for c in cases], [c[4] for c in cases]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dependent_equality_rows_end_solved_or_primal_infeasible(dtype):
    P, q, A, b, expected, optima = _rank_deficient_batch(dtype)
    cones = Cones(zero=2, nonneg=3)
    with pytest.warns(RuntimeWarning, match="failed"):
        sol = solve_conic(P, q, A, b, cones, on_failure="nan")
    assert sol.status.tolist() == [int(s) for s in expected]
    for i, x in enumerate(optima):
        if x is not None:
            torch.testing.assert_close(sol.x[i], torch.tensor(x, dtype=dtype), rtol=0, atol=1e-4)
    # the certificate: A'z = 0 on the equality rows, b'z < 0
    clarabel = reference_solve(P[1:2].double(), q[1:2].double(), A[1:2].double(), b[1:2].double(), cones)
    assert clarabel.status == ("PRIMAL_INFEASIBLE",)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lp_with_fewer_rows_than_variables_detects_unboundedness(dtype):
    """min x1 - x2 s.t. x1 + x2 <= 1 (A has a null space, no P): unbounded along
    (-1, 1); min -x1 - x2 on the same set is bounded with a face of optima."""
    A = torch.tensor([[[1.0, 1.0]]], dtype=dtype).expand(2, -1, -1)
    q = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=dtype)
    b = torch.ones(2, 1, dtype=dtype)
    with pytest.warns(RuntimeWarning, match="failed"):
        sol = solve_conic(None, q, A, b, Cones(nonneg=1), on_failure="nan")
    assert sol.status.tolist() == [int(Status.DUAL_INFEASIBLE), int(Status.SUCCESS)]
    assert abs(float(sol.x[1].sum()) - 1.0) < 1e-4


def test_float32_second_order_cones_never_end_nonfinite_near_a_solution():
    """Near a float32 SOCP solution a cone's s'Js falls below rounding; the step that
    would break the scaling is rejected and the element ends INACCURATE (or SUCCESS)
    at the last finite point, close to the float64 solution."""
    torch.manual_seed(0)
    B, n = 32, 12
    L = torch.randn(B, n, n, dtype=torch.float64)
    P = L @ L.transpose(1, 2) / n
    q = torch.randn(B, n, dtype=torch.float64)
    cones = Cones(zero=2, nonneg=6, soc=[4, 4, 5])
    A = torch.randn(B, cones.dim, n, dtype=torch.float64)
    b = torch.randn(B, cones.dim, dtype=torch.float64)
    with pytest.warns(RuntimeWarning):  # random data: some elements are infeasible
        exact = solve_conic(P, q, A, b, cones, on_failure="nan")
    with pytest.warns(RuntimeWarning):
        sol = solve_conic(P.float(), q.float(), A.float(), b.float(), cones, on_failure="nan")
    solved = exact.status == int(Status.SUCCESS)
    assert int(solved.sum()) >= B // 2
    assert not bool((sol.status[solved] == int(Status.NONFINITE)).any()), sol.status
    near = (sol.status == int(Status.SUCCESS)) | (sol.status == int(Status.INACCURATE))
    assert bool(near[solved].all()), sol.status
    assert bool((sol.stats["residual"][solved] <= 1e4).all())  # INACCURATE: within 1e4x the tolerances
    f32 = _objective(P[solved], q[solved], sol.x[solved].double())
    f64 = _objective(P[solved], q[solved], exact.x[solved])
    _assert_objective_close(f32, f64, 1e-3)


def test_unrolled_gradient_stays_finite_when_steps_are_rejected():
    """float32 SOCPs where steps near the solution are rejected (non-finite or not
    reducing the residuals): backpropagating through the thrown-away steps must not
    turn their non-finite local derivatives into NaN, neither in the element's rows
    nor in a shared (broadcast) matrix that sums every row."""
    torch.manual_seed(0)
    B, n = 32, 12
    L = torch.randn(n, n, dtype=torch.float64)
    P = (L @ L.T / n).float().requires_grad_()
    cones = Cones(zero=2, nonneg=6, soc=[4, 4, 5])
    q = torch.randn(B, n).requires_grad_()
    A = torch.randn(B, cones.dim, n)
    b = torch.randn(B, cones.dim)
    with pytest.warns(RuntimeWarning):
        sol = solve_conic(P.expand(B, n, n), q, A, b, cones, adjoint=dl.Unroll(), on_failure="mask")
    inaccurate = sol.status == int(Status.INACCURATE)
    assert int(inaccurate.sum()) >= 4
    gP, gq = torch.autograd.grad(sol.x.sum(), (P, q))
    assert bool(gP.isfinite().all()) and bool(gq.isfinite().all())
    assert bool((gq[inaccurate] != 0).any(1).all())  # not zeroed: the kept steps' derivative


# ------------------------------------------------------------- batch, dtype, inputs


def test_batched_equals_loop():
    problems = random_socp(5, 6, (3, 4), m_ineq=2, m_eq=1, quadratic=True, seed=50)
    batched = solve_conic(*problems)
    for i in range(problems.batch_size):
        single = solve_conic(*problems.select(i))
        torch.testing.assert_close(single.x, batched.x[i:i + 1], rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(single.z, batched.z[i:i + 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make, x_tol", [
    (lambda dtype: random_lp(8, 6, 12, m_eq=1, seed=60, dtype=dtype), 1e-4),
    (lambda dtype: random_conic_qp(8, 8, 6, m_eq=2, seed=61, dtype=dtype), 1e-4),
    # x* moves along the curved boundary of a second-order cone: first-order in the
    # float32 residuals but with a larger constant; the optimal value stays at 1e-4.
    (lambda dtype: random_socp(8, 6, (3, 4), m_ineq=2, quadratic=True, seed=62, dtype=dtype), 1e-3),
], ids=["lp", "qp", "socp"])
def test_float32_solves_to_1e_4(make, x_tol):
    problems = make(torch.float32)
    sol = solve_conic(*problems)
    assert sol.x.dtype == torch.float32 and sol.z.dtype == torch.float32
    assert bool((sol.status == Status.SUCCESS).all()), sol.status
    exact = make(torch.float64)
    _assert_x_close(sol.x.double(), exact.solution.x, x_tol)
    _assert_objective_close(_objective(exact.P, exact.q, sol.x.double()),
                            _objective(exact.P, exact.q, exact.solution.x), 1e-4)


@pytest.mark.parametrize("which", ["P", "q", "A", "b"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_raises(which, bad):
    problems = random_conic_qp(3, 4, 4, seed=70)
    data = dict(zip("P q A b".split(), (t.clone() for t in tuple(problems)[:4])))
    data[which].view(-1)[5] = bad
    with pytest.raises(ValueError):
        solve_conic(data["P"], data["q"], data["A"], data["b"], problems.cones)


def _bad_inputs():
    P, q, A, b, cones = random_conic_qp(3, 4, 5, m_eq=1, seed=71)
    return [
        ("A rows != cones.dim", (P, q, A[:, :-1], b, cones), ValueError),
        ("b rows != cones.dim", (P, q, A, b[:, :-1], cones), ValueError),
        ("q length != A columns", (P, q[:, :-1], A, b, cones), ValueError),
        ("P not square", (P[:, :, :-1], q, A, b, cones), ValueError),
        ("batch sizes differ", (P, q, A[:2], b[:2], cones), ValueError),
        ("q unbatched", (P, q[0], A, b, cones), ValueError),
        ("cones not a Cones", (P, q, A, b, {"zero": 1, "nonneg": 4}), TypeError),
        ("cones of another dim", (P, q, A, b, Cones(nonneg=4)), ValueError),
        ("mixed dtypes", (P, q.float(), A, b, cones), (TypeError, ValueError)),
        ("integer data", (P, q.round().long(), A, b, cones), TypeError),
        ("not a tensor", (P, q.tolist(), A, b, cones), TypeError),
        ("mixed devices", (P, q, A.to("meta"), b, cones), (TypeError, ValueError)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise(case):
    _, args, error = _bad_inputs()[case]
    with pytest.raises(error):
        solve_conic(*args)


def test_bad_options_raise():
    problems = random_lp(2, 3, 6, seed=72)
    with pytest.raises(ValueError):
        solve_conic(*problems, on_failure="ignore")
    with pytest.raises(TypeError):
        solve_conic(*problems, solver="interior_point")
    with pytest.raises((TypeError, ValueError)):
        InteriorPoint(max_steps=-1)
