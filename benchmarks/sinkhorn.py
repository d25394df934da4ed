"""Entropic OT between point clouds: forward + backward of the value w.r.t. the points.

Problem: ``x``, ``y``: ``n = m`` points uniform in ``[0, 1]^2`` (fixed seed), uniform
weights, cost ``||x_i - y_j||^2`` (no 1/2), ``eps = 0.05``, a fixed budget of
Sinkhorn iterations (100; 20 with ``--quick``, where ``n = m = 200``), then
``d value / d x``. Value: ``<C, P> + eps KL(P | a b^T)``. The reference is difflayers
in float64 run to convergence (rtol 1e-11); each row's error is the relative 2-norm
error of its ``d value / d x`` against it (so it includes the truncation of the
iteration budget), the note gives the value's relative error.

Methods, all on the same data, float32 by default, one CPU thread:

* difflayers ``dl.ot.sinkhorn(x=..., y=...)``, envelope gradient (default adjoint),
  with the stabilized-kernel iterations (default) and in the log domain
  (``Sinkhorn(kernel=False)``);
* POT 0.9.7 ``ot.solve(ot.dist(x, y), reg=eps, reg_type="KL", method="sinkhorn_log",
  grad="envelope", max_iter=K, tol=0)``, torch backend;
* GeomLoss 0.3.1 ``SamplesLoss("sinkhorn", p=2, blur=sqrt(eps / 2), debias=False,
  backend="tensorized")`` times 2: GeomLoss's cost is ``||x - y||^p / p`` and its
  ``eps = blur^p``, so ``OT_{C/2, eps/2} = OT_{C, eps} / 2``. GeomLoss always anneals
  eps from ``diameter^p`` to ``blur^p``; ``scaling`` is chosen so that the schedule has
  about K iterations, and the count it ran is given in the note;
* OTT-JAX 0.6 ``PointCloud`` + ``Sinkhorn(min_iterations=K, max_iterations=K)``,
  ``jax.jit(jax.value_and_grad(reg_ot_cost))`` (Danskin; its default implicit
  differentiation), float32, XLA single-threaded when ``XLA_FLAGS`` is unset before
  the first jax import.

A missing anchor is listed as "n/a" with the reason.

Run: ``python -m benchmarks.run sinkhorn [--quick]`` or
``python -m benchmarks.sinkhorn [--quick] [--n N] [--iters K] [--dtype float64]``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from typing import Callable

import torch

from ._harness import Row, argument_parser, emit, environment, format_table, measure

EPSILON = 0.05

# (value, grad_x) for x: [n, d] requiring grad and y: [m, d]
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class Method:
    name: str
    step: Step | None  # None: unavailable, see ``reason``
    anchor: bool
    reason: str = ""
    note: str = ""


def _torch_step(value_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Step:
    def step(x, y):
        xr = x.detach().requires_grad_(True)
        value = value_fn(xr, y)
        (grad,) = torch.autograd.grad(value, xr)
        return value.detach(), grad

    return step


def _difflayers(iters: int, kernel: bool) -> Method:
    name = "difflayers (stabilized kernel, envelope)" if kernel else "difflayers (log domain, envelope)"
    try:
        import difflayers as dl

        # absorption every 10 iterations, as by default
        solver = dl.ot.Sinkhorn(rtol=0.0, atol=0.0, max_steps=iters, check_every=min(10, iters), kernel=kernel)

        def value(x, y):
            # a fixed budget never meets tol 0: throw=False, and the warning about
            # differentiating an unconverged solution is expected here
            return dl.ot.sinkhorn(x=x, y=y, epsilon=EPSILON, solver=solver, throw=False).value

        return Method(name, _torch_step(value), anchor=False)
    except Exception as exc:  # noqa: BLE001 -- a missing method is reported, not fatal
        return Method(name, None, anchor=False, reason=f"{type(exc).__name__}: {exc}")


def _pot(iters: int) -> Method:
    name = "POT 0.9.7 (sinkhorn_log, envelope)"
    try:
        import ot

        def value(x, y):
            M = ot.dist(x, y)  # squared Euclidean, no 1/2
            return ot.solve(M, reg=EPSILON, reg_type="KL", method="sinkhorn_log", grad="envelope",
                            max_iter=iters, tol=0.0).value

        return Method(name, _torch_step(value), anchor=True)
    except Exception as exc:  # noqa: BLE001
        return Method(name, None, anchor=True, reason=f"{type(exc).__name__}: {exc}")


def _geomloss(iters: int, x: torch.Tensor, y: torch.Tensor) -> Method:
    name = "GeomLoss 0.3.1 (tensorized)"
    try:
        from geomloss import SamplesLoss
        from geomloss._legacy.sinkhorn_divergence import epsilon_schedule, max_diameter

        blur = math.sqrt(EPSILON / 2)
        diameter = max_diameter(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        # schedule: diameter^p, then exp(arange(p log diameter, p log blur, p log scaling)), then blur^p
        scaling = (blur / diameter) ** (1.0 / max(iters - 2, 1))
        count = len(epsilon_schedule(2, diameter, blur, scaling))
        loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, diameter=diameter, debias=False,
                           backend="tensorized")
        return Method(name, _torch_step(lambda x_, y_: 2 * loss(x_, y_)), anchor=True,
                      note=f"eps annealed, {count} iterations, scaling {scaling:.4f}")
    except Exception as exc:  # noqa: BLE001
        return Method(name, None, anchor=True, reason=f"{type(exc).__name__}: {exc}")


def _ott(iters: int, dtype: torch.dtype) -> Method:
    name = "OTT-JAX 0.6 (jit, Danskin)"
    try:
        import jax
        import numpy as np

        if dtype == torch.float64:
            jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn

        solver = sinkhorn.Sinkhorn(min_iterations=iters, max_iterations=iters, inner_iterations=min(10, iters),
                                   threshold=0.0)

        def value(xj, yj):
            geom = pointcloud.PointCloud(xj, yj, epsilon=EPSILON)  # SqEuclidean: ||x - y||^2
            return solver(linear_problem.LinearProblem(geom)).reg_ot_cost

        fn = jax.jit(jax.value_and_grad(value))

        def step(x, y):
            v, g = fn(jnp.asarray(x.detach().cpu().numpy()), jnp.asarray(y.detach().cpu().numpy()))
            g.block_until_ready()
            return torch.tensor(float(v), dtype=torch.float64), torch.from_numpy(np.asarray(g)).to(torch.float64)

        return Method(name, step, anchor=True, note=f"jax {jax.__version__}")
    except Exception as exc:  # noqa: BLE001
        return Method(name, None, anchor=True, reason=f"{type(exc).__name__}: {exc}")


def reference(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 difflayers value and ``d value / d x`` at convergence."""
    import difflayers as dl

    solver = dl.ot.Sinkhorn(rtol=1e-11, atol=0.0, max_steps=100_000)
    return _torch_step(lambda x_, y_: dl.ot.sinkhorn(x=x_, y=y_, epsilon=EPSILON, solver=solver).value)(
        x.double(), y.double())


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().to(b)
    return float((a - b).norm() / b.norm())


def _run_size(n: int, iters: int, device: torch.device, repeats: int, threads: int, dtype: torch.dtype) -> str:
    g = torch.Generator().manual_seed(0)
    x64 = torch.rand(n, 2, dtype=torch.float64, generator=g)
    y64 = torch.rand(n, 2, dtype=torch.float64, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # the reference is not timed
    try:
        v_ref, g_ref = reference(x64, y64)
    finally:
        torch.set_num_threads(previous)
    x, y = x64.to(device, dtype), y64.to(device, dtype)

    methods = [_difflayers(iters, True), _difflayers(iters, False), _pot(iters), _geomloss(iters, x, y), _ott(iters, dtype)]
    rows, missing = [], []
    for method in methods:
        if method.step is None:
            missing.append(f"- {method.name}: n/a ({method.reason})")
            continue
        step = method.step
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unconverged-budget warnings are expected; errors are measured
                value, grad = step(x, y)
                seconds, peak = measure(lambda: step(x, y), device, repeats)
        except Exception as exc:  # noqa: BLE001 -- an anchor failing here is a result
            missing.append(f"- {method.name}: n/a (failed: {type(exc).__name__}: {str(exc)[:160]})")
            continue
        note = f"value rel. err {abs(float(value) - float(v_ref)) / abs(float(v_ref)):.1e}"
        if method.note:
            note = f"{method.note}; {note}"
        rows.append(Row(method.name, seconds, peak, _relative(grad.cpu(), g_ref), note, method.anchor))

    title = (f"n = m = {n} points in [0,1]^2, eps = {EPSILON}, {iters} iterations, forward + backward "
             f"(d value / d x), {str(dtype).replace('torch.', '')}, {device.type}, {threads} thread(s)")
    parts = [format_table(title, rows, "float64 converged d value/dx")] if rows else [f"### {title}"]
    if missing:
        parts.append("\n".join(missing))
    return "\n\n".join(parts)


def run(repeats: int = 5, device: str = "cpu", quick: bool = False, threads: int = 1, n: int | None = None,
        iters: int | None = None, dtype: str = "float32") -> str:
    """Run the comparison and return the markdown table.

    Args:
        repeats: timed repetitions (median reported).
        device: torch device for difflayers, POT and GeomLoss (OTT-JAX runs on its default).
        quick: n = m = 200 and 20 iterations.
        threads: ``torch.set_num_threads`` (and XLA's, if jax is not yet imported).
        n, iters: override the sizes.
        dtype: "float32" or "float64" for the timed runs.
    """
    if threads == 1 and "jax" not in sys.modules and "XLA_FLAGS" not in os.environ:
        # before any import of jax (POT imports it for its jax backend)
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    n = n or (200 if quick else 1000)
    iters = iters or (20 if quick else 100)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        header = f"Entropic OT, point clouds (Sinkhorn). {environment()}"
        return header + "\n\n" + _run_size(n, iters, torch.device(device), repeats, threads, getattr(torch, dtype))
    finally:
        torch.set_num_threads(previous)


def main(argv=None) -> None:
    parser = argument_parser(__doc__, quick_help="n = m = 200, 20 iterations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int)
    parser.add_argument("--iters", type=int)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    table = run(repeats=args.repeats, device=args.device, quick=args.quick, threads=args.threads, n=args.n,
                iters=args.iters, dtype=args.dtype)
    emit(table, args.output)


if __name__ == "__main__":
    main()
