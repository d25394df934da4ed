"""Linear solvers: a shared contract for every solver x operator kind, then specifics."""

import pytest
import torch

from difflayers.solvers import (
    CG,
    GMRES,
    LSTSQ,
    LU,
    MINRES,
    Auto,
    BiCGStab,
    Cholesky,
    ConvergenceError,
    DenseOperator,
    JacobianOperator,
    MatvecOperator,
    Neumann,
    Status,
    linear_solve,
)

D = torch.float64


# ----------------------------------------------------------------------------- problems


def _orthogonal(B, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(B, n, n, dtype=D, generator=gen))[0]


def make_problem(kind, B=4, n=24, seed=0):
    """``(A [B, n, n], b [B, n])`` in float64.

    spd: eigenvalues in [0.5, 1.5] (so that the Neumann series converges too);
    sym: symmetric indefinite, eigenvalues in +-[0.5, 2];
    nonsym: I + 0.3 G / sqrt(n), spectral radius of I - A about 0.3.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "spd":
        Q = _orthogonal(B, n, seed)
        A = (Q * torch.linspace(0.5, 1.5, n, dtype=D)) @ Q.transpose(1, 2)
    elif kind == "sym":
        Q = _orthogonal(B, n, seed)
        half = torch.linspace(0.5, 2.0, n // 2, dtype=D)
        ev = torch.cat([-half, torch.linspace(0.5, 2.0, n - n // 2, dtype=D)])
        A = (Q * ev) @ Q.transpose(1, 2)
    elif kind == "nonsym":
        A = torch.eye(n, dtype=D) + 0.3 * torch.randn(B, n, n, dtype=D, generator=gen) / n**0.5
    else:
        raise AssertionError(kind)
    A = 0.5 * (A + A.transpose(1, 2)) if kind != "nonsym" else A
    b = torch.randn(B, n, dtype=D, generator=gen)
    return A, b


def make_operator(A, op_kind, kind):
    symmetric, pd = kind in ("spd", "sym"), kind == "spd"
    if op_kind == "dense":
        return DenseOperator(A, symmetric=symmetric, positive_definite=pd)
    if op_kind == "matvec":  # transpose derived by vjp
        return MatvecOperator(lambda x: torch.einsum("bij,bj->bi", A, x), symmetric=symmetric, positive_definite=pd)
    if op_kind == "jacobian":  # Jacobian of an affine map, linearized at a random point
        c = torch.ones(A.shape[-1], dtype=A.dtype)
        z = torch.randn(A.shape[0], A.shape[-1], dtype=A.dtype)
        return JacobianOperator(
            lambda z_: torch.einsum("bij,bj->bi", A, z_) + c, z, symmetric=symmetric, positive_definite=pd
        )
    raise AssertionError(op_kind)


def true_residual(A, b, x):
    return torch.linalg.vector_norm(b - torch.einsum("bij,bj->bi", A, x), dim=1)


SOLVERS = {
    "cg": (CG(), ["spd"]),
    "minres": (MINRES(), ["spd", "sym"]),
    "gmres": (GMRES(), ["spd", "sym", "nonsym"]),
    "gmres-restart5": (GMRES(restart=5, max_steps=1000), ["spd", "nonsym"]),
    "bicgstab": (BiCGStab(), ["spd", "sym", "nonsym"]),
    "neumann": (Neumann(), ["spd", "nonsym"]),
    "lu": (LU(), ["spd", "sym", "nonsym"]),
    "cholesky": (Cholesky(), ["spd"]),
    "lstsq": (LSTSQ(), ["spd", "sym", "nonsym"]),
}
ITERATIVE = ["cg", "minres", "gmres", "gmres-restart5", "bicgstab", "neumann"]
CASES = [pytest.param(sid, kind, id=f"{sid}-{kind}") for sid, (_, kinds) in SOLVERS.items() for kind in kinds]
NONSYM = [sid for sid, (_, kinds) in SOLVERS.items() if "nonsym" in kinds]
OPS = ["dense", "matvec", "jacobian"]


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("op_kind", OPS)
@pytest.mark.parametrize("sid, kind", CASES)
def test_closed_form(sid, kind, op_kind):
    solver = SOLVERS[sid][0]
    A, b = make_problem(kind)
    sol = solver.solve(make_operator(A, op_kind, kind), b)
    assert sol.status.dtype == torch.int64 and sol.status.shape == (4,)
    assert sol.converged.all(), sol.status
    torch.testing.assert_close(sol.value, torch.linalg.solve(A, b), rtol=0, atol=1e-8)
    # The reported residual is ||b - A x|| (up to the recurrence's rounding).
    torch.testing.assert_close(sol.stats["residual"], true_residual(A, b, sol.value), rtol=1e-3, atol=1e-11)
    rtol, atol = 1e-10, 1e-12
    if sid in ITERATIVE:
        assert (sol.stats["residual"] <= atol + rtol * b.norm(dim=1) * 1.001).all()
        assert (sol.stats["num_steps"] > 0).all()
    else:
        assert (sol.stats["num_steps"] == 0).all()


@pytest.mark.parametrize("sid, kind", CASES)
def test_batched_equals_loop(sid, kind):
    solver = SOLVERS[sid][0]
    A, b = make_problem(kind, B=3, n=16)
    batched = solver.solve(make_operator(A, "dense", kind), b)
    for i in range(3):
        alone = solver.solve(make_operator(A[i : i + 1], "dense", kind), b[i : i + 1])
        assert alone.status.item() == batched.status[i].item()
        assert alone.stats["num_steps"].item() == batched.stats["num_steps"][i].item()
        torch.testing.assert_close(alone.value[0], batched.value[i], rtol=0, atol=1e-11)


@pytest.mark.parametrize("op_kind", OPS)
@pytest.mark.parametrize("sid", NONSYM)
def test_transpose_solve(sid, op_kind):
    solver = SOLVERS[sid][0]
    A, b = make_problem("nonsym")
    sol = solver.solve(make_operator(A, op_kind, "nonsym").T, b)
    assert sol.converged.all()
    torch.testing.assert_close(sol.value, torch.linalg.solve(A.transpose(1, 2), b), rtol=0, atol=1e-8)


@pytest.mark.parametrize("sid, kind", CASES)
def test_float32_reaches_its_tolerance(sid, kind):
    solver = SOLVERS[sid][0]
    A, b = make_problem(kind)
    A32, b32 = A.float(), b.float()
    sol = solver.solve(make_operator(A32, "dense", kind), b32)
    assert sol.value.dtype == torch.float32 and sol.converged.all(), sol.status
    assert (sol.stats["residual"] <= 1e-7 + 1e-5 * b32.norm(dim=1) * 1.001).all()
    # The true residual agrees with the reported one up to float32 rounding.
    assert (true_residual(A, b, sol.value.double()) <= 1e-4 * b.norm(dim=1)).all()
    torch.testing.assert_close(sol.value.double(), torch.linalg.solve(A, b), rtol=0, atol=1e-3)


@pytest.mark.parametrize("sid", ITERATIVE)
def test_warm_start_at_solution_takes_no_steps(sid):
    solver = SOLVERS[sid][0]
    kind = SOLVERS[sid][1][0]
    A, b = make_problem(kind)
    x_star = torch.linalg.solve(A, b)
    sol = solver.solve(make_operator(A, "dense", kind), b, x0=x_star)
    assert sol.converged.all()
    assert (sol.stats["num_steps"] == 0).all()
    torch.testing.assert_close(sol.value, x_star)


@pytest.mark.parametrize("sid", ITERATIVE)
def test_steps_after_convergence_between_checks_are_harmless(sid):
    # n = 3: Krylov methods are exact after <= 3 steps, and the remaining steps of a
    # long check_every block run on a zero residual (exact Krylov breakdowns).
    solver = type(SOLVERS[sid][0])(check_every=32, max_steps=64)
    kind = SOLVERS[sid][1][-1]
    A, b = make_problem(kind, n=3)
    sol = solver.solve(make_operator(A, "dense", kind), b)
    assert sol.converged.all(), sol.status
    assert (sol.stats["num_steps"] == 32).all()
    torch.testing.assert_close(sol.value, torch.linalg.solve(A, b), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- per-sample status


def _bad_sample(name):
    """A batch whose sample 1 defeats the solver; returns (solver, A, b, operator, M, expected)."""
    M = None
    if name == "cg-indefinite":
        A, b = make_problem("spd")
        A[1] = -A[1]
        return CG(), A, b, DenseOperator(A, symmetric=True, positive_definite=True), M, {Status.BREAKDOWN}
    if name == "minres-indefinite-preconditioner":
        A, b = make_problem("sym")
        M = torch.eye(A.shape[-1], dtype=D).repeat(4, 1, 1)
        M[1] = -M[1]
        return MINRES(), A, b, DenseOperator(A, symmetric=True), DenseOperator(M), {Status.BREAKDOWN}
    if name in ("minres-singular", "gmres-singular"):
        A, b = make_problem("sym")
        Q = _orthogonal(1, A.shape[-1], 7)[0]
        ev = torch.linspace(-1.0, 1.0, A.shape[-1], dtype=D)
        ev[0] = 0.0  # singular, and b has a component along the null space
        A[1] = (Q * ev) @ Q.T
        solver = MINRES(max_steps=100) if name == "minres-singular" else GMRES(max_steps=100)
        return solver, A, b, DenseOperator(A, symmetric=True), M, {Status.MAX_STEPS, Status.BREAKDOWN}
    if name in ("gmres-zero", "bicgstab-zero"):
        A, b = make_problem("nonsym")
        A[1] = 0.0
        solver = GMRES() if name == "gmres-zero" else BiCGStab()
        return solver, A, b, DenseOperator(A), M, {Status.BREAKDOWN}
    if name == "lu-singular":
        A, b = make_problem("nonsym")
        A[1, :, 0] = 0.0  # an exactly zero pivot
        return LU(), A, b, DenseOperator(A), M, {Status.BREAKDOWN}
    if name == "cholesky-indefinite":
        A, b = make_problem("spd")
        A[1] = make_problem("sym")[0][1]
        return Cholesky(), A, b, DenseOperator(A, symmetric=True, positive_definite=True), M, {Status.BREAKDOWN}
    if name == "neumann-divergent":
        A, b = make_problem("spd")
        A[1] = 3.0 * A[1]  # I - A has eigenvalues down to -3.5
        return Neumann(max_steps=100), A, b, DenseOperator(A), M, {Status.MAX_STEPS, Status.NONFINITE}
    raise AssertionError(name)


BAD = [
    "cg-indefinite",
    "minres-indefinite-preconditioner",
    "minres-singular",
    "gmres-zero",
    "gmres-singular",
    "bicgstab-zero",
    "lu-singular",
    "cholesky-indefinite",
    "neumann-divergent",
]


@pytest.mark.parametrize("name", BAD)
def test_one_bad_sample_fails_alone(name):
    solver, A, b, op, M, expected = _bad_sample(name)
    sol = solver.solve(op, b, preconditioner=M)
    assert Status(int(sol.status[1])) in expected, sol.status
    good = [0, 2, 3]
    assert (sol.status[good] == Status.SUCCESS).all(), sol.status
    torch.testing.assert_close(sol.value[good], torch.linalg.solve(A[good], b[good]), rtol=0, atol=1e-8)
    with pytest.raises(ConvergenceError) as info:
        linear_solve(op, b, solver, preconditioner=M)
    assert info.value.indices == [1]


def test_max_steps_and_convergence_error_names_the_sample():
    A, b = make_problem("spd")
    A[0] = A[1] = A[3] = torch.eye(A.shape[-1], dtype=D)  # CG solves these in one step
    D2 = torch.logspace(0, 2, A.shape[-1], dtype=D)
    A[2] = D2[:, None] * A[2] * D2[None, :]  # badly conditioned
    solver = CG(max_steps=3, check_every=1)
    sol = linear_solve(A, b, solver, symmetric=True, positive_definite=True, throw=False)
    assert sol.status.tolist() == [Status.SUCCESS, Status.SUCCESS, Status.MAX_STEPS, Status.SUCCESS]
    assert sol.stats["num_steps"].tolist() == [1, 1, 3, 1]
    with pytest.raises(ConvergenceError, match="sample 2: MAX_STEPS") as info:
        linear_solve(A, b, solver, symmetric=True, positive_definite=True)
    assert info.value.indices == [2] and info.value.statuses == [Status.MAX_STEPS]


# ----------------------------------------------------------------------------- linear_solve checks


def test_nan_inputs_are_rejected():
    A, b = make_problem("nonsym")
    with pytest.raises(ValueError, match="b contains NaN"):
        linear_solve(A, torch.where(b > 1, float("nan"), b))
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        linear_solve(torch.where(A > 0.5, float("inf"), A), b)


def test_shape_dtype_device_errors():
    A, b = make_problem("nonsym")
    with pytest.raises(ValueError, match=r"size 25.*size 24|acts on vectors of size 24"):
        linear_solve(A, torch.randn(4, 25, dtype=D))
    with pytest.raises(ValueError, match="batch size 3 but b has batch size 4"):
        linear_solve(A[:3], b)
    with pytest.raises(ValueError, match=r"shape \[B, n\]"):
        linear_solve(A, b[0])
    with pytest.raises(ValueError, match="square matrix"):
        linear_solve(A[:, :, :-1], b)
    with pytest.raises(TypeError, match="dtype torch.float32 but b has dtype torch.float64"):
        linear_solve(A.float(), b)
    with pytest.raises(ValueError, match="device meta but b is on cpu"):
        linear_solve(A.to("meta"), b)
    with pytest.raises(ValueError, match="device cpu but b is on meta"):
        linear_solve(A, b.to("meta"))
    with pytest.raises(ValueError, match="preconditioner has shape"):
        linear_solve(A, b, GMRES(), preconditioner=torch.eye(3, dtype=D))
    with pytest.raises(TypeError, match="x0 has dtype torch.float32 but b has dtype torch.float64"):
        linear_solve(A, b, x0=b.float())
    with pytest.raises(ValueError, match="x0 must match b in shape"):
        linear_solve(A, b, x0=b[:, :-1])


def test_type_errors():
    A, b = make_problem("nonsym")
    with pytest.raises(TypeError, match="callable matvec"):
        linear_solve(3.0, b)
    with pytest.raises(TypeError, match=r"solver=CG\(\)"):
        linear_solve(A, b, CG)
    with pytest.raises(TypeError, match="b must be a tensor"):
        linear_solve(A, b.tolist())


def test_unbatched_matrix_broadcasts():
    A, b = make_problem("nonsym")
    expected = torch.linalg.solve(A[0], b.T).T
    for matrix in (A[0], A[:1]):
        torch.testing.assert_close(linear_solve(matrix, b).value, expected)
        torch.testing.assert_close(linear_solve(matrix, b, GMRES()).value, expected, rtol=0, atol=1e-9)


def test_hyperparameters_are_validated():
    with pytest.raises(ValueError, match="restart"):
        GMRES(restart=0)
    with pytest.raises(ValueError, match="max_steps"):
        MINRES(max_steps=-1)
    with pytest.raises(ValueError, match="rtol"):
        BiCGStab(rtol=float("nan"))
    with pytest.raises(ValueError, match="rcond"):
        LSTSQ(rcond=2.0)


# ----------------------------------------------------------------------------- specifics


def _badly_scaled_spd(B=3, n=40):
    A, b = make_problem("spd", B=B, n=n)
    scale = torch.logspace(0, 3, n, dtype=D)
    return scale[:, None] * A * scale[None, :], b


@pytest.mark.parametrize("solver", [CG(max_steps=2000), MINRES(max_steps=2000), GMRES(restart=10, max_steps=2000),
                                    BiCGStab(max_steps=2000)], ids=["cg", "minres", "gmres", "bicgstab"])
def test_jacobi_preconditioner_reduces_steps(solver):
    A, b = _badly_scaled_spd()
    diag = torch.diagonal(A, dim1=1, dim2=2)
    flags = dict(symmetric=True, positive_definite=True)
    plain = linear_solve(A, b, solver, throw=False, **flags)
    pre = linear_solve(A, b, solver, preconditioner=lambda r: r / diag, **flags)
    assert (pre.stats["num_steps"] * 2 < plain.stats["num_steps"]).all()
    torch.testing.assert_close(pre.value, torch.linalg.solve(A, b), rtol=1e-7, atol=0)
    assert (true_residual(A, b, pre.value) <= 2e-10 * b.norm(dim=1)).all()


def test_minres_solves_indefinite_where_cg_breaks_down():
    A, b = make_problem("sym")
    op = DenseOperator(A, symmetric=True)
    cg = CG().solve(op, b)
    assert (cg.status == Status.BREAKDOWN).all()
    sol = linear_solve(op, b, MINRES())
    torch.testing.assert_close(sol.value, torch.linalg.solve(A, b), rtol=0, atol=1e-9)


def test_auto_picks_from_declared_structure():
    A, b = make_problem("spd")

    def mv(x):
        return torch.einsum("bij,bj->bi", A, x)

    auto = Auto(max_steps=77)
    assert auto.select(DenseOperator(A, symmetric=True, positive_definite=True)) == Cholesky()
    assert auto.select(DenseOperator(A, symmetric=True)) == LU()
    assert auto.select(DenseOperator(A)) == LU()
    assert auto.select(MatvecOperator(mv, symmetric=True, positive_definite=True)) == CG(max_steps=77)
    assert auto.select(MatvecOperator(mv, symmetric=True)) == MINRES(max_steps=77)
    assert auto.select(MatvecOperator(mv)) == GMRES(max_steps=77)
    assert auto.select(JacobianOperator(mv, b)) == GMRES(max_steps=77)
    expected = torch.linalg.solve(A, b)
    for a, flags in [(A, {}), (A, dict(symmetric=True, positive_definite=True)), (mv, {}),
                     (mv, dict(symmetric=True)), (mv, dict(symmetric=True, positive_definite=True))]:
        torch.testing.assert_close(linear_solve(a, b, **flags).value, expected, rtol=0, atol=1e-9)


def test_neumann_converges_below_one_and_never_claims_success_above():
    A, b = make_problem("spd")
    eye = torch.eye(A.shape[-1], dtype=D)
    for rho in (0.5, 0.9):  # I - M has eigenvalues in [-rho, rho]
        M = eye - rho * (eye - A) / 0.5
        sol = Neumann(max_steps=1000).solve(DenseOperator(M), b)
        assert sol.converged.all()
        torch.testing.assert_close(sol.value, torch.linalg.solve(M, b), rtol=0, atol=1e-8)
    # I - (A + 2 I) has eigenvalues in [-2.5, -1.5]: spectral radius 2.5.
    divergent = DenseOperator(A + 2.0 * eye)
    short = Neumann(max_steps=50).solve(divergent, b)
    assert (short.status == Status.MAX_STEPS).all()
    long = Neumann(max_steps=2000, check_every=16).solve(divergent, b)
    assert (long.status == Status.NONFINITE).all()


def test_factorizations_solve_the_transposed_system():
    A, b = make_problem("nonsym")
    factors = LU().factorize(DenseOperator(A), b)
    torch.testing.assert_close(factors.solve(b).value, torch.linalg.solve(A, b))
    sol = factors.solve(b, transpose=True)
    assert sol.converged.all()
    torch.testing.assert_close(sol.value, torch.linalg.solve(A.transpose(1, 2), b))
    torch.testing.assert_close(sol.stats["residual"], true_residual(A.transpose(1, 2), b, sol.value))
    S, _ = make_problem("spd")
    chol = Cholesky().factorize(lambda x: torch.einsum("bij,bj->bi", S, x), b)
    torch.testing.assert_close(chol.solve(b, transpose=True).value, torch.linalg.solve(S, b))


def test_lstsq_on_singular_system_reports_its_residual():
    A, b = make_problem("nonsym")
    A[1, :, 0] = 0.0
    sol = LSTSQ().solve(DenseOperator(A), b)
    assert sol.converged.all()
    torch.testing.assert_close(sol.stats["residual"], true_residual(A, b, sol.value))
    assert sol.stats["residual"][1] > 1e-3  # inconsistent: the residual says so


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", [CG(), MINRES(), GMRES(), BiCGStab(), Cholesky()],
                         ids=["cg", "minres", "gmres", "bicgstab", "cholesky"])
def test_cuda_float32(solver):
    A, b = make_problem("spd")
    A32, b32 = A.float().cuda(), b.float().cuda()
    sol = linear_solve(A32, b32, solver, symmetric=True, positive_definite=True)
    assert sol.value.device.type == "cuda" and sol.status.device.type == "cuda"
    torch.testing.assert_close(sol.value.cpu().double(), torch.linalg.solve(A, b), rtol=0, atol=1e-3)
