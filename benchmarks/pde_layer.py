"""PDELayer: batched forward + adjoint gradient against a loop over the batch and
against unrolled differentiation through the solver iterations.

Problems (float64, unit square, Dirichlet):

* variable-coefficient Poisson ``-div(k grad u) = f``, gradient of ``1/2 ||u||^2``
  with respect to ``k`` and ``f``: multigrid-preconditioned CG (forward and adjoint),
  against Jacobi-preconditioned CG, a Python loop over the batch, and unrolled
  backpropagation through the CG iterations;
* nonlinear diffusion ``-div((1 + u^2) grad u) = f`` (non-symmetric Jacobian),
  Newton-GMRES with a multigrid preconditioner, against the loop and unrolled
  backpropagation through Newton and GMRES;
* CPU only, one sample of ~250k unknowns (512 x 512): the Poisson forward solve and
  the gradient with respect to ``f`` (one adjoint solve) against SciPy's sparse direct
  solver (assembly of the same finite-volume matrix, SuperLU factorization reused for
  the transposed solve), where SciPy is installed;
* heat equation ``u_t = div(k grad u)`` by Crank-Nicolson (one multigrid-PCG solve
  per step), gradient of ``1/2 ||u(T)||^2`` with respect to ``k`` by the discrete
  adjoint in reverse time, with and without checkpointing, for growing step counts.

The error column is the relative difference of the gradient from the reference row
of its table (the first row; for the heat equation the uncheckpointed run with the
same number of steps). CPU peak memory is measured in a fresh process per row: one
warm-up run, then the peak resident set of a second forward + gradient above the
resident set before it, with glibc's mmap threshold fixed at 64 KiB so that freed
tensors return to the system (a long-lived process would otherwise reuse freed
memory without raising its resident set). CPU runs use one thread: small batched
kernels on a shared machine lose more to thread synchronization than they gain.

    python -m benchmarks.run pde_layer [--quick] [--device cuda]
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import torch

import difflayers as dl
from difflayers import pde
from difflayers.solvers import GMRES, Newton

from ._harness import Row, _rss_kib, environment, format_table, measure

D = torch.float64


def _poisson(grid: pde.Grid, preconditioner: str, adjoint=None) -> pde.PDELayer:
    bc = pde.Dirichlet()
    make = {"multigrid": pde.Multigrid, "jacobi": pde.Jacobi}[preconditioner]
    return pde.PDELayer(lambda u, k, f: pde.diffusion(u, k, grid, bc) - f, grid=grid, symmetric=True, linear=True,
                        adjoint=adjoint, preconditioner=lambda u, k, f: make(grid, k, bc))


def _nonlinear(grid: pde.Grid, adjoint=None) -> pde.PDELayer:
    bc = pde.Dirichlet()
    return pde.PDELayer(lambda u, f: pde.diffusion(u, 1.0 + u**2, grid, bc) - f, grid=grid, adjoint=adjoint,
                        solver=Newton(linear_solver=GMRES(restart=40, rtol=1e-8)),
                        preconditioner=lambda u, f: pde.Multigrid(grid, 1.0 + u**2, bc))


def _layer_gradient(layer, inputs, loop: bool):
    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        if loop:
            for i in range(leaves[0].shape[0]):
                u = layer(*[t[i : i + 1] for t in leaves])
                (0.5 * u.square().sum()).backward()
        else:
            (0.5 * layer(*leaves).square().sum()).backward()
        return [t.grad for t in leaves]

    return run


def _tables(quick: bool, device: torch.device):
    """``[(title, [(name, run, anchor, note), ...]), ...]``; deterministic, so a child process
    rebuilds exactly the same data."""
    gen = torch.Generator().manual_seed(0)
    tables = []

    batch, n = (4, 32) if quick else (8, 128)
    grid = pde.Grid((n, n))
    k = torch.exp(0.5 * torch.randn(batch, n, n, dtype=D, generator=gen)).to(device)
    f = torch.randn(batch, n, n, dtype=D, generator=gen).to(device)
    tables.append((
        f"Variable-coefficient Poisson, B = {batch}, {n} x {n} ({batch * n * n} unknowns), forward + gradient",
        [
            ("batched, multigrid-PCG, implicit adjoint", _layer_gradient(_poisson(grid, "multigrid"), [k, f], False),
             False, ""),
            ("batched, Jacobi-PCG, implicit adjoint", _layer_gradient(_poisson(grid, "jacobi"), [k, f], False),
             True, "eager reference"),
            ("loop over batch, multigrid-PCG", _layer_gradient(_poisson(grid, "multigrid"), [k, f], True), True, ""),
            ("batched, multigrid-PCG, unrolled", _layer_gradient(_poisson(grid, "multigrid", dl.Unroll()), [k, f],
                                                                 False), True, "backprop through CG"),
        ],
    ))

    batch, n = (2, 16) if quick else (4, 32)
    grid = pde.Grid((n, n))
    f = 10.0 * torch.rand(batch, n, n, dtype=D, generator=gen).to(device)
    tables.append((
        f"Nonlinear diffusion -div((1 + u^2) grad u) = f, B = {batch}, {n} x {n}, forward + gradient",
        [
            ("batched, Newton-GMRES + multigrid, implicit adjoint", _layer_gradient(_nonlinear(grid), [f], False),
             False, ""),
            ("loop over batch", _layer_gradient(_nonlinear(grid), [f], True), True, ""),
            ("batched, unrolled", _layer_gradient(_nonlinear(grid, dl.Unroll()), [f], False), True,
             "backprop through Newton + GMRES"),
        ],
    ))

    batch, n, step_counts = (2, 32, (8, 32)) if quick else (4, 64, (16, 64))
    grid = pde.Grid((n, n))
    bc = pde.Dirichlet()
    k = torch.exp(0.3 * torch.randn(batch, n, n, dtype=D, generator=gen)).to(device)
    u0 = torch.rand(batch, n, n, dtype=D, generator=gen).to(device)

    def heat(steps, every):
        def run():
            kk = k.detach().clone().requires_grad_(True)
            u = pde.integrate(lambda u, k: pde.diffusion(u, k, grid, bc), u0, kk, dt=1e-3, steps=steps,
                              symmetric=True, linear=True, checkpoint_every=every,
                              preconditioner=lambda u, u_prev, dt, k: pde.Multigrid(grid, 0.5 * dt * k, bc,
                                                                                     reaction=1.0))
            (0.5 * u.square().sum()).backward()
            return [kk.grad]

        return run

    cases = []
    for steps in step_counts:
        cases.append((f"{steps} steps, no checkpointing", heat(steps, 0), False, ""))
        cases.append((f"{steps} steps, checkpoints every ceil(sqrt(steps))", heat(steps, None), False, ""))
    tables.append((f"Heat equation, Crank-Nicolson, B = {batch}, {n} x {n}, forward + discrete adjoint", cases))
    return tables


def _fv_matrix(k, h):
    """SciPy CSR matrix of ``diffusion(., k, Grid(k.shape), Dirichlet())`` (cell-centred, harmonic faces)."""
    import numpy as np
    import scipy.sparse as sp

    ny, nx = k.shape
    index = np.arange(nx * ny).reshape(ny, nx)
    diag = np.zeros((ny, nx))
    rows, cols, vals = [], [], []
    for axis in (0, 1):
        a = np.take(k, range(k.shape[axis] - 1), axis=axis)
        b = np.take(k, range(1, k.shape[axis]), axis=axis)
        kf = 2 * a * b / (a + b) / h**2
        i = np.take(index, range(k.shape[axis] - 1), axis=axis).ravel()
        j = np.take(index, range(1, k.shape[axis]), axis=axis).ravel()
        rows += [i, j]
        cols += [j, i]
        vals += [-kf.ravel(), -kf.ravel()]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (1, 0)
        diag += np.pad(kf, pad)
        pad[axis] = (0, 1)
        diag += np.pad(kf, pad)
        lo = [slice(None), slice(None)]
        lo[axis] = 0
        hi = [slice(None), slice(None)]
        hi[axis] = -1
        diag[tuple(lo)] += 2 * k[tuple(lo)] / h**2  # Dirichlet half a cell away
        diag[tuple(hi)] += 2 * k[tuple(hi)] / h**2
    rows.append(index.ravel())
    cols.append(index.ravel())
    vals.append(diag.ravel())
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(nx * ny,) * 2)


def _scipy_table(quick: bool, repeats: int) -> str | None:
    try:
        import numpy as np
        import scipy.sparse.linalg as spla
    except ImportError:
        return None
    n = 64 if quick else 512
    gen = torch.Generator().manual_seed(1)
    grid = pde.Grid((n, n))
    k = torch.exp(0.5 * torch.randn(1, n, n, dtype=D, generator=gen))
    f = torch.randn(1, n, n, dtype=D, generator=gen)
    layer = _poisson(grid, "multigrid")

    def ours():
        ff = f.clone().requires_grad_(True)
        (0.5 * layer(k, ff).square().sum()).backward()
        return [ff.grad]

    def scipy_direct():
        A = _fv_matrix(k[0].numpy(), 1.0 / n)
        lu = spla.splu(A.tocsc())
        u = lu.solve(f[0].numpy().ravel())
        lam = lu.solve(u, trans="T")  # dR/df = -I: dL/df = A^-T u
        return [torch.from_numpy(np.asarray(lam)).reshape(1, n, n)]

    reference = scipy_direct()
    rows = []
    for name, fn, anchor in (("difflayers, multigrid-PCG + implicit adjoint", ours, False),
                             ("SciPy: assembly + SuperLU + transposed solve", scipy_direct, True)):
        seconds, peak = measure(fn, torch.device("cpu"), repeats)
        rows.append(Row(name, seconds, peak, _error(fn(), reference), "", anchor))
    return format_table(f"Poisson, one sample, {n} x {n} ({n * n} unknowns), forward + gradient w.r.t. f, CPU "
                        "(peak memory in-process, indicative only)", rows, "SciPy gradient")


def _error(grads, reference) -> float:
    num = sum(float((g - r).norm() ** 2) for g, r in zip(grads, reference)) ** 0.5
    return num / sum(float(r.norm() ** 2) for r in reference) ** 0.5


def _child_peak(table: int, case: int, quick: bool, device: str) -> None:
    """Run one case in this (fresh) process and print its peak memory in MiB."""
    torch.set_num_threads(1)
    run = _tables(quick, torch.device(device))[table][1][case][1]
    run()  # warm-up: lazy imports and one-time set-up are not the layer's memory
    gc.collect()
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    print(max(_rss_kib("VmHWM") - base, 0) / 1024)


def _peak(table: int, case: int, quick: bool, device: torch.device, fallback: float) -> float:
    if device.type == "cuda":
        return fallback
    code = f"from benchmarks.pde_layer import _child_peak; _child_peak({table}, {case}, {quick}, '{device}')"
    try:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800,
                             env=env)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return fallback


def run(repeats: int = 5, device: str = "cpu", quick: bool = False) -> str:
    device = torch.device(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    out = [f"Environment: {environment()}", ""]
    for t, (title, cases) in enumerate(_tables(quick, device)):
        rows = []
        for c, (name, fn, anchor, note) in enumerate(cases):
            if c == 0 or "no checkpointing" in name:
                reference = fn()
            seconds, peak = measure(fn, device, repeats)
            rows.append(Row(name, seconds, _peak(t, c, quick, device, peak), _error(fn(), reference), note, anchor))
        out += [format_table(title, rows, "reference gradient"), ""]
    if device.type == "cpu":
        table = _scipy_table(quick, repeats)
        if table is not None:
            out += [table, ""]
    return "\n".join(out)
