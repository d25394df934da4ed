"""qp_kkt_gradients against a closed form, autograd through the active-set system and
finite differences of Clarabel solves; and the problem generators it is checked on."""

from __future__ import annotations

import doctest

import pytest
import torch

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
from difflayers.testing import _conic_problems, _kkt_oracle

pytest.importorskip("clarabel")

DTYPE = torch.float64
NAMES = ("P", "q", "G", "h", "A", "b")


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def _split_qp(batch, m_eq: int):
    """``ConicBatch`` with ``Cones(zero=m_eq, nonneg=m)`` -> ``(P, q, G, h, A, b)``."""
    P, q, A, b, _ = batch
    return P, q, A[:, m_eq:], b[:, m_eq:], A[:, :m_eq], b[:, :m_eq]


def _solve_qp(P, q, G, h, A, b, tol=1e-12):
    """x, lam, nu of a batch of QPs by Clarabel."""
    ref = reference_solve(*qp_to_conic(P, q, G, h, A, b), tol=tol)
    assert all(s == "SUCCESS" for s in ref.status), ref.raw_status
    p = A.shape[1]
    return ref.x, ref.z[:, p:], ref.z[:, :p]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------- the oracle


def test_unconstrained_closed_form():
    n = 5
    L = _randn(3, n, n, seed=1)
    P = L @ L.mT + torch.eye(n, dtype=DTYPE)
    q, w = _randn(3, n, seed=2), _randn(3, n, seed=3)
    x = -torch.linalg.solve(P, q)
    grads = qp_kkt_gradients(P, q, None, None, None, None, x, None, None, w)
    dq = -torch.linalg.solve(P, w)
    torch.testing.assert_close(grads.q, dq, rtol=1e-12, atol=1e-12)
    outer = dq.unsqueeze(-1) * x.unsqueeze(-2)
    torch.testing.assert_close(grads.P, 0.5 * (outer + outer.mT), rtol=1e-12, atol=1e-12)
    assert grads.G is None and grads.h is None and grads.A is None and grads.b is None and grads.active is None


def _active_set_solution(P, q, G, h, A, b, active):
    """x* of the equality system on a fixed active set, differentiable by autograd.

    Reads P only through its symmetric part, as the objective 1/2 x'Px does."""
    Ga = G * active.unsqueeze(-1)
    n, m, p = q.shape[-1], G.shape[-2], A.shape[-2]
    mask = active.to(DTYPE)
    top = torch.cat([0.5 * (P + P.mT), Ga.mT, A.mT], dim=-1)
    mid = torch.cat([Ga, torch.diag_embed(1.0 - mask), G.new_zeros(*G.shape[:-2], m, p)], dim=-1)
    bot = torch.cat([A, A.new_zeros(*A.shape[:-2], p, m + p)], dim=-1)
    K = torch.cat([top, mid, bot], dim=-2)
    rhs = torch.cat([-q, h * mask, b], dim=-1)
    return torch.linalg.solve(K, rhs)[..., :n]


@pytest.mark.parametrize("rank", [None, 3])
def test_matches_autograd_through_active_set_system(rank):
    """Same active set, gradients by plain autograd: agreement to rounding."""
    m_eq = 2
    # 2 equalities + 3 active inequalities < 8 variables: x* is not pinned to a vertex.
    P, q, G, h, A, b = _split_qp(random_conic_qp(4, 8, 6, m_eq=m_eq, rank=rank, seed=10), m_eq)
    x, lam, nu = _solve_qp(P, q, G, h, A, b)
    w = _randn(4, 8, seed=11)
    grads = qp_kkt_gradients(P, q, G, h, A, b, x, lam, nu, w)
    assert bool(grads.active.any(dim=-1).all()) and not bool(grads.active.all())

    inputs = [t.clone().requires_grad_(True) for t in (P, q, G, h, A, b)]
    x_auto = _active_set_solution(*inputs, grads.active)
    torch.testing.assert_close(x_auto, x, rtol=1e-7, atol=1e-7)
    auto = torch.autograd.grad((x_auto * w).sum(), inputs)
    for name, got, want in zip(NAMES, grads[:6], auto):
        assert _rel(got, want) < 1e-9, name
    # Inactive inequality rows do not move the solution.
    inactive = ~grads.active
    assert bool((grads.h[inactive] == 0).all()) and bool((grads.G[inactive] == 0).all())


def _loss(P, q, G, h, A, b, w):
    x, _, _ = _solve_qp(P, q, G, h, A, b)
    return float((x * w).sum())


def test_matches_finite_differences_of_clarabel():
    """Directional central differences of the Clarabel solution (1e-12 tolerances).

    The generated problems are strictly complementary with margin 0.5, so the active
    set does not change within the step."""
    m_eq = 1
    data = list(_split_qp(random_conic_qp(3, 4, 5, m_eq=m_eq, seed=20), m_eq))
    x, lam, nu = _solve_qp(*data)
    w = _randn(3, 4, seed=21)
    grads = qp_kkt_gradients(*data, x, lam, nu, w)
    eps = 1e-5
    for k, name in enumerate(NAMES):
        # For P a non-symmetric direction: the convention makes every entry independent.
        direction = _randn(*data[k].shape, seed=30 + k)
        plus, minus = list(data), list(data)
        plus[k], minus[k] = data[k] + eps * direction, data[k] - eps * direction
        fd = (_loss(*plus, w) - _loss(*minus, w)) / (2 * eps)
        analytic = float((grads[k] * direction).sum())
        assert abs(fd - analytic) <= 1e-5 * max(1.0, abs(analytic)), (name, fd, analytic)


def test_active_set_survives_an_inaccurate_solution():
    """Multipliers and slacks off by 1e-6 (a loose solver) pick the same active set."""
    m_eq = 1
    P, q, G, h, A, b = _split_qp(random_conic_qp(6, 8, 10, m_eq=m_eq, seed=45), m_eq)
    x, lam, nu = _solve_qp(P, q, G, h, A, b)
    w = _randn(6, 8, seed=46)
    exact = qp_kkt_gradients(P, q, G, h, A, b, x, lam, nu, w)
    noisy = qp_kkt_gradients(P, q, G, h, A, b, x + 1e-6 * _randn(6, 8, seed=47),
                             (lam + 1e-6 * _randn(6, 10, seed=48).abs()), nu, w)
    assert torch.equal(noisy.active, exact.active)
    for name, got, want in zip(NAMES, noisy[:6], exact[:6]):
        assert _rel(got, want) < 1e-5, name


def test_unbatched_and_broadcast_inputs():
    m_eq = 1
    P, q, G, h, A, b = _split_qp(random_conic_qp(2, 5, 4, m_eq=m_eq, seed=40), m_eq)
    x, lam, nu = _solve_qp(P, q, G, h, A, b)
    w = _randn(2, 5, seed=41)
    batched = qp_kkt_gradients(P, q, G, h, A, b, x, lam, nu, w)
    single = qp_kkt_gradients(P[1], q[1], G[1], h[1], A[1], b[1], x[1], lam[1], nu[1], w[1])
    for name, got, want in zip(NAMES, single[:6], batched[:6]):
        assert got.shape == want.shape[1:], name
        torch.testing.assert_close(got, want[1], rtol=1e-12, atol=1e-12)
    # An unbatched P with batched q broadcasts and gives per-element gradients.
    shared = qp_kkt_gradients(P[1], q[1:], G[1:], h[1:], A[1:], b[1:], x[1:], lam[1:], nu[1:], w[1:])
    torch.testing.assert_close(shared.P, batched.P[1:], rtol=1e-12, atol=1e-12)


def test_half_given_arguments_raise():
    P, q = torch.eye(2, dtype=DTYPE), torch.ones(2, dtype=DTYPE)
    with pytest.raises(ValueError, match="G, h and lam"):
        qp_kkt_gradients(P, q, torch.ones(1, 2, dtype=DTYPE), None, None, None, -q, None, None, q)
    with pytest.raises(ValueError, match="A, b and nu"):
        qp_kkt_gradients(P, q, None, None, torch.ones(1, 2, dtype=DTYPE), torch.ones(1, dtype=DTYPE), -q, None,
                         None, q)
    with pytest.raises(ValueError, match="do not match"):
        qp_kkt_gradients(P, torch.ones(3, dtype=DTYPE), None, None, None, None, -q, None, None, q)


@pytest.mark.parametrize("module", [_kkt_oracle, _conic_problems])
def test_docstring_examples(module):
    failed, attempted = doctest.testmod(module, raise_on_error=False)[:2]
    assert attempted > 0 and failed == 0


# ------------------------------------------------------- the problem generators


def _kkt_residual(batch, ref) -> float:
    P, q, A, b, _ = batch
    stationarity = q + (A.mT @ ref.z.unsqueeze(-1)).squeeze(-1)
    if P is not None:
        stationarity = stationarity + (P @ ref.x.unsqueeze(-1)).squeeze(-1)
    primal = (A @ ref.x.unsqueeze(-1)).squeeze(-1) + ref.s - b
    return max(float(stationarity.abs().max()), float(primal.abs().max()))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: random_lp(6, 4, 9, m_eq=1, seed=1), "SUCCESS"),
        (lambda: random_conic_qp(6, 5, 6, m_eq=2, rank=2, seed=2), "SUCCESS"),
        (lambda: random_socp(6, 5, (3, 1, 4), m_ineq=2, m_eq=1, seed=3), "SUCCESS"),
        (lambda: random_socp(6, 5, (2, 5), quadratic=True, seed=4), "SUCCESS"),
        (lambda: degenerate_lp(6, 3, 6, seed=5), "SUCCESS"),
        (lambda: primal_infeasible_lp(6, 4, 9, m_eq=1, seed=6), "PRIMAL_INFEASIBLE"),
        (lambda: dual_infeasible_lp(6, 4, 9, m_eq=1, seed=7), "DUAL_INFEASIBLE"),
    ],
)
def test_families_have_the_outcome_they_promise(make, expected):
    batch = make()
    ref = reference_solve(*batch)
    assert ref.status == (expected,) * 6, ref.raw_status
    if expected == "SUCCESS":
        assert _kkt_residual(batch, ref) < 1e-7
    else:
        assert bool(ref.objective.isinf().all())


def test_known_solution_is_optimal():
    """The pair each feasible family is built from satisfies the KKT conditions and
    has Clarabel's optimal value (and Clarabel's x where the optimum is unique)."""
    # x_tol None: the optimum is not unique (by design). Clarabel's x is less accurate on
    # second-order cones (a few 1e-6 at 1e-10 tolerances) than on LPs and QPs.
    for batch, x_tol in [
        (random_lp(4, 4, 9, m_eq=1, seed=1), 1e-8),
        (random_conic_qp(4, 6, 6, m_eq=1, rank=3, seed=2), 1e-8),
        (random_socp(4, 5, (3, 1, 4), m_ineq=2, m_eq=1, quadratic=True, seed=3), 1e-4),
        (random_socp(4, 5, (3, 4), seed=3), 1e-4),
        (degenerate_lp(4, 3, 6, seed=5), None),
    ]:
        known = batch.solution
        assert _kkt_residual(batch, known) < 1e-12
        assert bool((known.s * known.z).sum(-1).abs().max() < 1e-12)
        ref = reference_solve(*batch)
        P, q = batch.P, batch.q
        objective = (q * known.x).sum(-1)
        if P is not None:
            objective = objective + 0.5 * (known.x * (P @ known.x.unsqueeze(-1)).squeeze(-1)).sum(-1)
        torch.testing.assert_close(objective, ref.objective, rtol=1e-8, atol=1e-8)
        if x_tol is not None:
            torch.testing.assert_close(known.x, ref.x, rtol=x_tol, atol=x_tol)


def test_lp_solution_is_the_constructed_vertex():
    """random_lp's solution is unique: exactly n active rows with positive duals."""
    batch = random_lp(5, 4, 10, seed=8)
    ref = reference_solve(*batch)
    active = ref.z > 1e-6
    assert bool((active.sum(dim=-1) == 4).all())
    assert bool((ref.s[active].abs() < 1e-8).all()) and bool((ref.z[~active].abs() < 1e-8).all())


def test_generators_are_seeded_and_dtype_independent():
    a, b = random_socp(3, 4, seed=9), random_socp(3, 4, seed=9)
    c = random_socp(3, 4, seed=9, dtype=torch.float32)
    for x, y, z in zip(tuple(a)[:4], tuple(b)[:4], tuple(c)[:4]):
        if x is None:
            continue
        assert torch.equal(x, y) and z.dtype == torch.float32
        torch.testing.assert_close(z, x.float())
    assert not torch.equal(random_socp(3, 4, seed=10).A, a.A)


def test_random_qp_is_feasible_and_strictly_convex():
    P, q, G, h, A, b = random_qp(4, 6, 3, 2, seed=0)
    assert bool((torch.linalg.eigvalsh(P) >= 0.1 - 1e-12).all())
    ref = reference_solve(*qp_to_conic(P, q, G, h, A, b))
    assert ref.status == ("SUCCESS",) * 4
    assert random_qp(2, 3, 0, seed=0).G is None and random_qp(2, 3, 1, seed=0).A is None


def test_concat_and_select():
    feasible, infeasible = random_lp(2, 3, 5, seed=0), primal_infeasible_lp(2, 3, 5, seed=1)
    mixed = concat_problems([feasible, infeasible])
    assert mixed.batch_size == 4 and torch.equal(mixed.select(2).A, infeasible.A[:1])
    with pytest.raises(ValueError, match="cones differ"):
        concat_problems([feasible, random_lp(2, 3, 6, seed=0)])
    with pytest.raises(ValueError, match="P is None"):
        concat_problems([random_conic_qp(2, 3, 5, seed=0), random_lp(2, 3, 5, seed=0)])
