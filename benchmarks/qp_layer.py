"""Dense batched QP layer: forward, backward, memory and gradient accuracy.

Problem (``difflayers.testing.random_qp``, float64)::

    x*(q, h) = argmin 1/2 x'Px + q'x   s.t.  G x <= h,     P = L L'/n + 0.1 I,  m = n / 2

with ``h = G x0 + slack`` (feasible) and the loss ``sum(w * x*)`` for fixed random
``w``. References: Clarabel (``reference_solve``, tolerances 1e-10) for ``x*``, and
the active-set KKT oracle (``qp_kkt_gradients``) on Clarabel's primal-dual solution
for ``dL/dq`` and ``dL/dh``.

Methods, all on the same data, with ``q`` and ``h`` requiring grad:

* difflayers ``QPLayer`` (batched interior point, KKT adjoint);
* cvxpylayers 1.2.0 with its default backend (diffcp, LSQR derivative) and with
  ``solver_args={"mode": "dense"}`` (diffcp's dense derivative). The objective is
  written ``1/2 ||U x||^2 + q'x`` with ``U = chol(P)'`` as a parameter (DPP); ``U``
  is computed once, outside the timings. diffcp runs ``--threads`` worker threads;
* qpth 0.0.18 ``QPFunction`` (OptNet) with its defaults.

Each table row: median time over ``--repeats``; "forward" is one solve with inputs
that require grad (what a training step pays), "backward" is ``loss.backward()``
alone on a fresh forward, and its peak memory is that of forward + backward.
Error columns: relative 2-norm error of ``x*`` (forward) and the larger of the
relative errors of ``dL/dq`` and ``dL/dh`` (backward). A method that is missing or
skipped is listed below its table as "n/a" with the reason.

Run: ``python -m benchmarks.run qp_layer [--quick]`` (one thread, B=64, n=50 when
quick), or ``python -m benchmarks.qp_layer [--quick] [--threads T] [--all]`` for the
options ``run.py`` does not forward.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings
from typing import Callable

import torch

from difflayers.testing import qp_kkt_gradients, qp_to_conic, random_qp, reference_solve

from ._harness import Row, argument_parser, emit, environment, format_table, measure, peak_memory_mib

SIZES_FULL = [(B, n) for B in (64, 256, 1024) for n in (50, 100, 200)]
SIZES_QUICK = [(64, 50)]

Solve = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Method:
    name: str
    solve: Solve | None  # None: unavailable, see ``reason``
    anchor: bool
    reason: str = ""
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _difflayers() -> Method:
    name = "difflayers QPLayer"
    try:
        from difflayers.conic import QPLayer

        layer = QPLayer()
        return Method(name, lambda P, q, G, h: layer(P, q, G, h), anchor=False)
    except Exception as exc:  # noqa: BLE001 -- a missing method is reported, not fatal
        return Method(name, None, anchor=False, reason=f"{type(exc).__name__}: {exc}")


def _cvxpylayers(P, G, threads: int, mode: str | None) -> Method:
    name = "cvxpylayers (diffcp" + (f", mode={mode!r})" if mode else ", default)")
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        n, m = P.shape[-1], G.shape[-2]
        U = cp.Parameter((n, n))
        q = cp.Parameter(n)
        G_ = cp.Parameter((m, n))
        h = cp.Parameter(m)
        x = cp.Variable(n)
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(U @ x) + q @ x), [G_ @ x <= h])
        start = time.perf_counter()
        layer = CvxpyLayer(problem, parameters=[U, q, G_, h], variables=[x])
        build = time.perf_counter() - start
        args = {"n_jobs_forward": threads, "n_jobs_backward": threads}
        if mode is not None:
            args["mode"] = mode
        U_val = torch.linalg.cholesky(P).mT.contiguous()  # P = U'U, once, outside the timings

        def solve(P_, q_, G__, h_):
            return layer(U_val, q_, G__, h_, solver_args=args)[0]

        return Method(name, solve, anchor=True, note=f"layer built in {build:.2f} s")
    except Exception as exc:  # noqa: BLE001
        return Method(name, None, anchor=True, reason=f"{type(exc).__name__}: {exc}")


def _qpth() -> Method:
    name = "qpth 0.0.18 QPFunction"
    try:
        from qpth.qp import QPFunction

        function = QPFunction(verbose=-1)

        def solve(P, q, G, h):
            empty = q.new_zeros(0)
            return function(P, q, G, h, empty, empty)

        return Method(name, solve, anchor=True)
    except Exception as exc:  # noqa: BLE001
        return Method(name, None, anchor=True, reason=f"{type(exc).__name__}: {exc}")


def _time_backward(forward: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median time of ``loss.backward()`` alone, each on a fresh forward."""
    forward().backward()  # warm-up
    times = []
    for _ in range(repeats):
        loss = forward()
        _sync(device)
        start = time.perf_counter()
        loss.backward()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().to(b) - b).norm() / b.norm())


def _run_size(B: int, n: int, device: torch.device, repeats: int, threads: int, all_anchors: bool) -> str:
    m = n // 2
    dtype = torch.float64
    P, q, G, h, _, _ = random_qp(B, n, m, 0, seed=0, dtype=dtype)
    w = torch.randn(B, n, dtype=dtype, generator=torch.Generator().manual_seed(1))
    ref = reference_solve(*qp_to_conic(P, q, G, h), tol=1e-10)
    unsolved = [i for i, s in enumerate(ref.status) if s != "SUCCESS"]
    oracle = qp_kkt_gradients(P, q, G, h, None, None, ref.x, ref.z, None, w)
    x_ref, gq_ref, gh_ref = ref.x, oracle.q, oracle.h
    P, q, G, h, w = (t.to(device) for t in (P, q, G, h, w))

    methods = [_difflayers()]
    big = B >= 256 and n >= 100
    for mode in (None, "dense"):
        if big and not all_anchors:
            label = "cvxpylayers (diffcp" + (f", mode={mode!r})" if mode else ", default)")
            methods.append(Method(label, None, anchor=True, reason="skipped for B >= 256 and n >= 100 (pass --all)"))
        else:
            methods.append(_cvxpylayers(P.cpu(), G.cpu(), threads, mode))
    methods.append(_qpth())

    fwd_rows, bwd_rows, missing = [], [], []
    for method in methods:
        if method.solve is None:
            missing.append(f"- {method.name}: n/a ({method.reason})")
            continue
        solve = method.solve
        q_, h_ = q.clone().requires_grad_(True), h.clone().requires_grad_(True)

        def forward():
            return solve(P, q_, G, h_)

        def loss():
            return (w * forward()).sum()

        def loss_and_backward():
            loss().backward()

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # anchors' deprecation chatter; errors are measured
                x = forward()
                q_.grad = h_.grad = None
                (w * x).sum().backward()
                gq, gh = q_.grad.clone(), h_.grad.clone()
                t_fwd, mem_fwd = measure(forward, device, repeats)
                t_bwd = _time_backward(loss, device, repeats)
                mem_bwd = peak_memory_mib(loss_and_backward, device)
        except Exception as exc:  # noqa: BLE001 -- an anchor failing at this size is a result
            missing.append(f"- {method.name}: n/a (failed: {type(exc).__name__}: {str(exc)[:160]})")
            continue
        grad_err = max(_relative(gq, gq_ref), _relative(gh, gh_ref))
        fwd_rows.append(Row(method.name, t_fwd, mem_fwd, _relative(x, x_ref), method.note, method.anchor))
        bwd_rows.append(Row(method.name, t_bwd, mem_bwd, grad_err, "", method.anchor))

    title = f"B={B}, n={n}, m={m} inequalities, float64, {device.type}"
    parts = []
    for phase, rows, reference in (("forward", fwd_rows, "Clarabel x*"),
                                   ("backward (peak mem: forward + backward)", bwd_rows,
                                    "KKT oracle, max(dL/dq, dL/dh)")):
        if rows:
            parts.append(format_table(f"{title}: {phase}", rows, reference))
    if missing:
        parts.append("\n".join(missing))
    if unsolved:
        parts.append(f"(Clarabel did not report SUCCESS for elements {unsolved[:8]}: "
                     "errors there are measured against its best point)")
    return "\n\n".join(parts)


def run(repeats: int = 5, device: str = "cpu", quick: bool = False, threads: int = 1,
        all_anchors: bool = False, sizes: list[tuple[int, int]] | None = None) -> str:
    """Run the sweep and return the markdown tables.

    Args:
        repeats: timed repetitions per measurement (median reported).
        device: torch device for difflayers and qpth (cvxpylayers runs on the CPU).
        quick: only B=64, n=50.
        threads: ``torch.set_num_threads`` and diffcp's worker threads.
        all_anchors: also run cvxpylayers for B >= 256 and n >= 100 (slow).
        sizes: ``(B, n)`` pairs to run instead of the default sweep.
    """
    device = torch.device(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tables = [f"Dense batched QP layer. {environment()}"]
        for B, n in sizes or (SIZES_QUICK if quick else SIZES_FULL):
            tables.append(_run_size(B, n, device, repeats, threads, all_anchors))
        return "\n\n".join(tables)
    finally:
        torch.set_num_threads(previous)


def main(argv=None) -> None:
    parser = argument_parser(__doc__, quick_help="only B=64, n=50", output_help="also write the tables to this markdown file")
    parser.add_argument("--threads", type=int, default=1, help="torch and diffcp threads (default 1)")
    parser.add_argument("--all", action="store_true", help="run cvxpylayers at every size (slow)")
    parser.add_argument("--sizes", help="comma-separated BxN pairs, e.g. 64x50,256x100 (default: the full sweep)")
    args = parser.parse_args(argv)
    sizes = None
    if args.sizes:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in args.sizes.split(",")]
    table = run(repeats=args.repeats, device=args.device, quick=args.quick, threads=args.threads,
                all_anchors=args.all, sizes=sizes)
    emit(table, args.output)


if __name__ == "__main__":
    main()
