"""``torch.compile`` against eager on the fixed-iteration paths, forward and forward + backward.

Every solve runs a fixed number of iterations with ``check_every = max_steps``, so it reads
nothing from the device and Dynamo captures it whole (``fullgraph=True``) where the table
of docs/compile.md says so. Cases (fixed seeds):

* fixed point: ``dl.fixed_point`` of ``T(z) = tanh(z W' + x)`` (``||W|| ~ 0.5``), ``B = 256``,
  ``n = 64``, ``Anderson(memory=5)``, 20 iterations, float32. Forward without gradients;
  forward + backward of ``sum(z^2)`` w.r.t. ``x`` and ``W`` with ``Unroll()`` (one graph)
  and with the default ``Implicit()`` (GMRES backward; compiled with ``fullgraph=False``:
  the implicit autograd Function and its backward run eagerly).
* Sinkhorn: ``dl.ot.sinkhorn``, one problem, ``n = m = 1000`` points uniform in
  ``[0, 1]^2``, squared Euclidean cost, ``eps = 0.05``, 50 log-domain iterations
  (``Sinkhorn(kernel=False)``), float32; a dense cost and point clouds (cost from
  ``x, y``). Forward: the value; forward + backward: the value and its envelope gradient
  (the default adjoint) w.r.t. the cost or ``x``. The note gives the eager time of the
  default stabilized-kernel iterations, which do not compile as one graph.
* QP: ``dl.QPLayer``, 64 problems with ``n = 10`` variables, 5 random inequalities and
  the box ``[-1, 1]^n`` (25 rows > n: the n x n KKT system in eager and compiled runs
  alike), ``InteriorPoint`` with 10 iterations (polished), float64,
  ``on_failure="mask"``. Forward; forward + backward of ``sum(x * c)`` w.r.t. ``q`` with the
  default ``Implicit()`` (``fullgraph=False``: the KKT autograd Function runs eagerly).

For 1 and 2 torch threads (CPU), each case is compiled afresh with inductor's default
mode and its caches off; "compile (s)" is the first call's time minus a steady call's.
Times are medians over ``repeats`` calls after ``WARMUP`` untimed ones; "max rel. diff."
compares the compiled outputs (values and gradients) with eager ones. With CUDA, a
CUDA-graph row per case (``mode="reduce-overhead"``) is added; without CUDA one row says
it was skipped.

Run: ``python -m benchmarks.run compile [--quick]`` or ``python -m benchmarks.compile``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable

import torch
import torch._dynamo

import difflayers as dl

from ._harness import argument_parser, emit, environment, measure

# untimed calls before the timed ones: eager runs that allocate large temporaries take a
# few calls to reach their steady speed (the C allocator's thresholds adapt)
WARMUP = 3


@dataclasses.dataclass
class Case:
    name: str
    pass_: str  # "forward" or "forward + backward"
    fn: Callable[..., torch.Tensor]  # the compiled function: tensors -> tensor
    inputs: tuple[torch.Tensor, ...]
    wrt: tuple[int, ...] = ()  # indices of the inputs differentiated (forward + backward)
    fullgraph: bool = True
    note: str = ""


@dataclasses.dataclass
class Result:
    case: Case
    threads: str
    eager: float
    compiled: float
    compile_s: float
    diff: float
    mode: str = "default"


def _call(case: Case, fn) -> tuple[torch.Tensor, ...]:
    """One call: the output (forward), or the output and the gradients (forward + backward)."""
    if not case.wrt:
        with torch.no_grad():
            return (fn(*case.inputs),)
    inputs = [t.detach().clone().requires_grad_(i in case.wrt) for i, t in enumerate(case.inputs)]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [inputs[i] for i in case.wrt])
    return (out.detach(), *grads)


def _rel_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((x - y).norm() / y.norm().clamp_min(torch.finfo(y.dtype).tiny)) for x, y in zip(a, b))


def _time_compiled(case: Case, device: torch.device, repeats: int, mode: str) -> tuple[float, float, float]:
    """``(steady seconds, compile seconds, max rel. diff.)`` of ``torch.compile(case.fn)``."""
    torch._dynamo.reset()
    compiled = torch.compile(case.fn, fullgraph=case.fullgraph, mode=None if mode == "default" else mode)
    start = time.perf_counter()
    out = _call(case, compiled)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    seconds, _ = measure(lambda: _call(case, compiled), device, repeats, warmup=WARMUP)
    diff = _rel_diff(_call(case, compiled), _call(case, case.fn))
    del out
    return seconds, max(first - seconds, 0.0), diff


def _fixed_point_cases(device, quick) -> list[Case]:
    g = torch.Generator().manual_seed(0)
    B, n, iters = (16, 8, 5) if quick else (256, 64, 20)
    W = (0.5 * torch.randn(n, n, generator=g) / n**0.5).to(device)
    x = torch.randn(B, n, generator=g).to(device)
    solver = dl.solvers.Anderson(memory=5, max_steps=iters, check_every=iters)

    def T(z, x, W):
        return torch.tanh(z @ W.T + x)

    def forward(x, W):
        return dl.fixed_point(T, torch.zeros_like(x), x, W, solver=solver, throw=False)

    def loss(adjoint):
        def fn(x, W):
            z = dl.fixed_point(T, torch.zeros_like(x), x, W, solver=solver, adjoint=adjoint, throw=False)
            return z.square().sum()

        return fn

    name = f"fixed point, Anderson, {iters} it., B={B}, n={n}"
    return [
        Case(name, "forward", forward, (x, W)),
        Case(name, "forward + backward, Unroll", loss(dl.Unroll()), (x, W), wrt=(0, 1)),
        Case(name, "forward + backward, Implicit", loss(dl.Implicit()), (x, W), wrt=(0, 1), fullgraph=False),
    ]


def _sinkhorn_cases(device, quick, repeats) -> list[Case]:
    g = torch.Generator().manual_seed(1)
    n, iters, eps = (100, 10, 0.05) if quick else (1000, 50, 0.05)
    x = torch.rand(1, n, 2, generator=g).to(device)
    y = torch.rand(1, n, 2, generator=g).to(device)
    C = torch.cdist(x, y) ** 2
    log_domain = dl.ot.Sinkhorn(max_steps=iters, check_every=iters, kernel=False)
    kernel = dl.ot.Sinkhorn(max_steps=iters, check_every=iters)

    def dense(solver):
        return lambda C: dl.ot.sinkhorn(cost=C, epsilon=eps, solver=solver, throw=False).value.sum()

    def clouds(solver):
        return lambda x, y: dl.ot.sinkhorn(x=x, y=y, epsilon=eps, solver=solver, throw=False).value.sum()

    cases = []
    for label, make, inputs in (("dense cost", dense, (C,)), ("point clouds", clouds, (x, y))):
        name = f"Sinkhorn, {label}, n=m={n}, {iters} it."
        for pass_, wrt in (("forward", ()), ("forward + backward", (0,))):
            reference = Case(name, pass_, make(kernel), inputs, wrt=wrt)
            kernel_s, _ = measure(lambda reference=reference: _call(reference, reference.fn), device, repeats,
                                  warmup=WARMUP)
            cases.append(Case(name, pass_, make(log_domain), inputs, wrt=wrt,
                              note=f"eager stabilized kernel: {1e3 * kernel_s:.1f} ms"))
    return cases


def _qp_cases(device, quick) -> list[Case]:
    g = torch.Generator().manual_seed(2)
    B, n, m, iters = (4, 4, 2, 4) if quick else (64, 10, 5, 10)
    dt = torch.float64
    L = torch.randn(B, n, n, generator=g, dtype=dt)
    P = (L @ L.mT / n + torch.eye(n, dtype=dt)).to(device)
    q = torch.randn(B, n, generator=g, dtype=dt).to(device)
    G = torch.randn(B, m, n, generator=g, dtype=dt).to(device)
    h = (torch.rand(B, m, generator=g, dtype=dt) + 0.5).to(device)
    lb, ub = -torch.ones(n, dtype=dt, device=device), torch.ones(n, dtype=dt, device=device)
    c = torch.linspace(-1.0, 1.0, n, dtype=dt, device=device)
    layer = dl.QPLayer(solver=dl.conic.InteriorPoint(max_steps=iters, check_every=iters), on_failure="mask")

    def forward(q, P, G, h):
        return layer(P, q, G, h, lb=lb, ub=ub)

    def loss(q, P, G, h):
        return (layer(P, q, G, h, lb=lb, ub=ub) * c).sum()

    name = f"QP, interior point, {iters} it., B={B}, n={n}, {m + 2 * n} rows"
    return [
        Case(name, "forward", forward, (q, P, G, h)),
        Case(name, "forward + backward, Implicit", loss, (q, P, G, h), wrt=(0,), fullgraph=False),
    ]


def _run_cases(cases: list[Case], device: torch.device, repeats: int, threads: str) -> list[Result]:
    results = []
    for case in cases:
        eager, _ = measure(lambda case=case: _call(case, case.fn), device, repeats, warmup=WARMUP)
        compiled, compile_s, diff = _time_compiled(case, device, repeats, "default")
        results.append(Result(case, threads, eager, compiled, compile_s, diff))
        if device.type == "cuda":
            compiled, compile_s, diff = _time_compiled(case, device, repeats, "reduce-overhead")
            results.append(Result(case, threads, eager, compiled, compile_s, diff, mode="reduce-overhead"))
    return results


def format_results(title: str, results: list[Result], cuda: bool) -> str:
    head = ["case", "pass", "threads", "mode", "fullgraph", "eager (ms)", "compiled (ms)", "speedup",
            "compile (s)", "max rel. diff.", "note"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        c = r.case
        cells = [c.name, c.pass_, r.threads, r.mode, "yes" if c.fullgraph else "no", f"{1e3 * r.eager:.2f}",
                 f"{1e3 * r.compiled:.2f}", f"{r.eager / r.compiled:.2f}x", f"{r.compile_s:.1f}",
                 f"{r.diff:.1e}", c.note]
        lines.append("| " + " | ".join(cells) + " |")
    if not cuda:
        lines.append("| every case | every pass | — | reduce-overhead | — | — | — | — | — | — | "
                     "skipped: CUDA graphs need a CUDA device |")
    return "\n".join(lines)


def run(repeats: int = 5, device: str = "cpu", quick: bool = False, threads: tuple[int, ...] = (1, 2)) -> str:
    """Run every case and return the markdown table.

    Args:
        repeats: timed repetitions (median reported).
        device: torch device; on CPU each case runs for every entry of ``threads``.
        quick: small sizes and few iterations, for a smoke test.
        threads: ``torch.set_num_threads`` values (CPU).
    """
    dev = torch.device(device)
    previous = torch.get_num_threads()
    results = []
    try:
        # cold compiles: inductor's on-disk caches would hide the compile time (and carry
        # kernels generated for another thread count)
        with torch._inductor.config.patch(force_disable_caches=True), warnings.catch_warnings():
            # fixed iterations are not converged to the default tolerances: no ConvergenceError
            # (throw=False) and no warning wanted in the timings
            warnings.simplefilter("ignore", RuntimeWarning)
            for t in threads if dev.type == "cpu" else (previous,):
                torch.set_num_threads(t)
                label = str(t) if dev.type == "cpu" else "—"
                cases = _fixed_point_cases(dev, quick) + _sinkhorn_cases(dev, quick, repeats) + _qp_cases(dev, quick)
                results += _run_cases(cases, dev, repeats, label)
    finally:
        torch.set_num_threads(previous)
        torch._dynamo.reset()
    header = f"torch.compile (inductor) against eager, fixed iterations. {environment()}"
    return header + "\n\n" + format_results("Time per call", results, dev.type == "cuda")


def main(argv=None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    table = run(repeats=args.repeats, device=args.device, quick=args.quick, threads=tuple(args.threads))
    emit(table, args.output)


if __name__ == "__main__":
    main()
