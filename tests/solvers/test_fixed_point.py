"""Picard, Anderson, Broyden and the shared iteration driver."""

import dataclasses

import pytest
import torch

from difflayers.solvers import (
    Anderson,
    Broyden,
    ConvergenceError,
    FixedPointProblem,
    Picard,
    RootProblem,
    Solution,
    Status,
    iterate,
)

D = torch.float64
SOLVERS = [Picard(max_steps=3000), Anderson(), Anderson(memory=1, max_steps=3000), Broyden()]
IDS = ["picard", "anderson", "anderson-m1", "broyden"]


def linear_problem(B=4, n=30, top=0.95, dtype=D):
    """T(z) = A z + b with symmetric A, eigenvalues in [-0.5, top]."""
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, dtype=D))
    ev = torch.linspace(-0.5, top, n, dtype=D)
    A = (Q * ev) @ Q.transpose(1, 2)
    b = torch.randn(B, n, dtype=D)
    z_star = torch.linalg.solve(torch.eye(n, dtype=D) - A, b)
    return A.to(dtype), b.to(dtype), z_star


def T_lin(z, A, b):
    return torch.einsum("bij,bj->bi", A, z) + b


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_linear_fixed_point_closed_form(solver):
    A, b, z_star = linear_problem()
    sol = solver.solve(FixedPointProblem(T_lin), torch.zeros_like(b), (A, b))
    assert sol.status.tolist() == [Status.SUCCESS] * 4
    # residual <= 1e-10 ||z||; error <= ||(I - A)^-1|| * residual = 20 * residual
    torch.testing.assert_close(sol.value, z_star, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_float32(solver):
    A, b, z_star = linear_problem(top=0.8, dtype=torch.float32)
    sol = solver.solve(FixedPointProblem(T_lin), torch.zeros_like(b), (A, b))
    assert sol.value.dtype == torch.float32
    assert bool(sol.converged.all())
    # residual <= 1e-5 ||z|| and ||(I - A)^-1|| <= 5
    assert float((sol.value.double() - z_star).norm() / z_star.norm()) < 1e-4


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_batched_equals_loop_and_frozen_samples(solver):
    A, b, _ = linear_problem()
    batched = solver.solve(FixedPointProblem(T_lin), torch.zeros_like(b), (A, b))
    for i in range(b.shape[0]):
        alone = solver.solve(FixedPointProblem(T_lin), torch.zeros_like(b[i : i + 1]), (A[i : i + 1], b[i : i + 1]))
        # both meet the tolerance; reductions ordered differently by batch size may
        # stop them one iteration apart
        torch.testing.assert_close(alone.value[0], batched.value[i], rtol=1e-7, atol=1e-8)


def test_faster_methods_take_fewer_steps():
    A, b, _ = linear_problem(top=0.99)
    steps = {}
    for name, solver in zip(IDS, SOLVERS):
        solver = dataclasses.replace(solver, max_steps=5000)
        sol = solver.solve(FixedPointProblem(T_lin), torch.zeros_like(b), (A, b))
        assert bool(sol.converged.all()), name
        steps[name] = int(sol.stats["num_steps"].max())
    assert steps["anderson"] < steps["picard"] / 4
    assert steps["broyden"] < steps["picard"] / 4


def test_anderson_safeguard_on_singular_history():
    """A scalar problem makes every history of length > 1 collinear: the unregularized
    least-squares system is singular and the safeguard must take Picard steps."""
    solver = Anderson(memory=5, regularization=0.0)
    sol = solver.solve(FixedPointProblem(lambda z: torch.cos(z)), torch.zeros(3, 1, dtype=D))
    assert bool(sol.converged.all())
    torch.testing.assert_close(sol.value, torch.full((3, 1), 0.7390851332151607, dtype=D))


def test_root_problem_through_fixed_point_view():
    c = torch.tensor([[0.2], [0.4]], dtype=D)
    sol = Anderson().solve(RootProblem(lambda z, c: 0.5 * z + 0.1 * torch.sin(z) - c), torch.zeros_like(c), (c,))
    assert bool(sol.converged.all())
    z = sol.value
    torch.testing.assert_close(0.5 * z + 0.1 * torch.sin(z), c)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_nan_sample_is_isolated(solver):
    A, b, z_star = linear_problem(top=0.8)
    b[2, 0] = float("nan")
    sol = solver.solve(FixedPointProblem(T_lin), torch.zeros_like(b), (A, b))
    assert sol.status[2] == Status.NONFINITE
    keep = [0, 1, 3]
    assert bool(sol.converged[keep].all())
    torch.testing.assert_close(sol.value[keep], z_star[keep], rtol=1e-8, atol=1e-8)


def test_divergent_map_is_not_success():
    sol = Picard(max_steps=5000).solve(FixedPointProblem(lambda z: 2.0 * z + 1.0), torch.zeros(2, 3, dtype=D))
    assert not bool(sol.converged.any())
    assert set(sol.status.tolist()) <= {Status.NONFINITE, Status.MAX_STEPS}


def test_max_steps_and_check_every_accounting():
    A, b, _ = linear_problem(top=0.99)
    sol = Picard(max_steps=10, check_every=4).solve(FixedPointProblem(T_lin), torch.zeros_like(b), (A, b))
    assert sol.status.tolist() == [Status.MAX_STEPS] * 4
    assert sol.stats["num_steps"].tolist() == [10] * 4
    with pytest.raises(ConvergenceError, match="4 of 4 samples"):
        sol.raise_if_failed("picard")


def test_warm_start_at_solution_takes_zero_steps():
    A, b, z_star = linear_problem()
    sol = Anderson().solve(FixedPointProblem(T_lin), z_star, (A, b))
    assert sol.stats["num_steps"].tolist() == [0] * 4


def test_driver_reports_failure_code_from_step():
    state = {"x": torch.zeros(3, dtype=D), "failure": torch.zeros(3, dtype=torch.int64)}

    def step(s):
        fail = torch.tensor([0, int(Status.BREAKDOWN), 0])
        return {"x": s["x"] + torch.tensor([1.0, 1.0, 0.0], dtype=D), "failure": fail}

    def residual(s):
        return (5.0 - s["x"]).abs() * torch.tensor([1.0, 1.0, 1.0], dtype=D), torch.zeros(3, dtype=D)

    state, status, num_steps, err = iterate(step, residual, state, rtol=0.0, atol=0.5, max_steps=20, check_every=1)
    assert status.tolist() == [Status.SUCCESS, Status.BREAKDOWN, Status.MAX_STEPS]
    assert num_steps.tolist() == [5, 1, 20]
    assert state["x"].tolist() == [5.0, 1.0, 0.0]


def test_solution_describe_and_messages():
    sol = Solution(torch.zeros(2), torch.tensor([0, 1]), {"num_steps": torch.tensor([3, 9]), "residual": torch.ones(2)})
    assert "1/2 converged" in sol.describe()
    for status in Status:
        assert len(status.message) > 20


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_cuda_float32(solver):
    A, b, z_star = linear_problem(top=0.8, dtype=torch.float32)
    sol = solver.solve(FixedPointProblem(T_lin), torch.zeros_like(b).cuda(), (A.cuda(), b.cuda()))
    assert sol.status.device.type == "cuda"
    torch.testing.assert_close(sol.value.double().cpu(), z_star, rtol=1e-4, atol=1e-4)
