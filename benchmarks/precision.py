"""Accuracy of every layer in float32, bfloat16 and float16 against float64.

Each case is a representative, well-conditioned problem of one entry point. Its
inputs are drawn in float64, rounded once to the dtype under test, and the layer is
run twice: on the rounded inputs in that dtype, and on the *same* rounded values cast
to float64 (the reference). So the table measures what difflayers adds (the solve in
the compute dtype and the rounding of its outputs), not the rounding of the data,
which is the caller's choice of dtype.

Columns: the relative error of the output, ``||y - y64|| / ||y64||``, and the largest
relative error of the gradients of ``<w, y>`` (``w`` fixed and random) with respect to
the differentiable inputs, each gradient in its input's dtype. 16-bit inputs are
solved in float32 (``dl.solvers.compute_dtype``), so their errors are dominated by
the final rounding to 8 (bfloat16) or 11 (float16) significant bits: ``2^-9 ~ 2e-3``
and ``2^-12 ~ 2.4e-4`` relative per entry.

Run: ``python -m benchmarks.run precision``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable

import torch

import difflayers as dl
from difflayers.solvers import compute_dtype

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class Case:
    """``run(**inputs) -> output`` with inputs built by ``make(generator)`` in float64;
    ``grad`` names the differentiable inputs (none: the output is itself a gradient)."""

    name: str
    make: Callable[[torch.Generator], dict[str, torch.Tensor]]
    run: Callable[..., torch.Tensor]
    grad: tuple[str, ...]


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rand(gen, *shape):
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def _spd(gen, batch, n):
    M = _randn(gen, batch, n, n) / math.sqrt(n)
    return M @ M.transpose(1, 2) + torch.eye(n, dtype=torch.float64)


# ----------------------------------------------------------------------------- cases


def _fixed_point(W, x):
    return dl.fixed_point(lambda z, W, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), W, x)


def _root_find(A, c):
    return dl.root_find(lambda z, A, c: torch.einsum("bij,bj->bi", A, z) + 0.1 * z**3 - c, torch.zeros_like(c), A, c)


def _argmin(Q, c):
    f = lambda z, Q, c: 0.5 * ((z @ Q) * z).sum(1) - (c * z).sum(1) + 0.25 * (z**4).sum(1)  # noqa: E731
    return dl.argmin(f, torch.zeros_like(c), Q, c)


def _least_squares(t, y):
    r = lambda p, t, y: p[:, :1] * torch.exp(-p[:, 1:] * t) - y  # noqa: E731
    return dl.least_squares(r, torch.ones(y.shape[0], 2, dtype=y.dtype), t, y)


def _custom_root(c):
    def newton(z0, c):
        z = z0
        for _ in range(40):
            z = z - (z**3 + z - c) / (3 * z**2 + 1)
        return z

    return dl.custom_root(lambda z, c: z**3 + z - c)(newton)(torch.zeros_like(c), c)


def _linear_dense(A, b):
    return dl.linear_solve(A, b, symmetric=True, positive_definite=True).value


def _linear_cg(A, b):
    op = dl.solvers.DenseOperator(A, symmetric=True, positive_definite=True)
    return dl.linear_solve(op, b, dl.solvers.CG()).value


def _qp(P, q, G, h, A, b):
    return dl.QPLayer()(P, q, G, h, A, b)


@functools.lru_cache(maxsize=1)
def _conic_layer():  # canonicalized once per process
    import cvxpy as cp

    x, c = cp.Variable(8), cp.Parameter(8)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - c) + 0.3 * cp.sum(x)), [cp.sum(x) == 1, x >= 0])
    layer = dl.ConicLayer(problem, parameters=[c], variables=[x])
    return lambda c: layer(c)[0]


def _sinkhorn(x, y):
    return dl.ot.sinkhorn(x=x, y=y, epsilon=0.05).value


def _sinkhorn_plan(x, y):
    return dl.ot.SinkhornLayer(epsilon=0.1)(x, y)


def _divergence(x, y):
    return dl.ot.SinkhornDivergence(epsilon=0.1)(x, y)


def _soft_sort(x):
    return dl.ot.soft_sort(x, epsilon=0.05)


def _soft_rank(x):
    return dl.ot.soft_rank(x, epsilon=0.05)


def _quadratic_ot(x, y):
    return dl.ot.quadratic_ot(x=x, y=y, epsilon=0.1, adjoint=dl.Implicit()).plan


def _pde_linear(k, f):
    from difflayers.pde import Dirichlet, Grid, diffusion

    grid = Grid((16, 16))
    layer = dl.pde.PDELayer(lambda u, k, f: diffusion(u, k, grid, Dirichlet()) - f, grid=grid, symmetric=True,
                            linear=True, positive=(0,))
    return layer(k, f)


def _pde_nonlinear(k, f):
    from difflayers.pde import Dirichlet, Grid, diffusion

    grid = Grid((12, 12))
    layer = dl.pde.PDELayer(lambda u, k, f: diffusion(u, k, grid, Dirichlet()) + 50.0 * u**3 - f, grid=grid,
                            symmetric=True, positive=(0,))
    return layer(k, f)


def _hypergradient(X, y, Xv, yv, w0, lam):
    # the data are captured by inner/outer: they must be in the compute dtype
    X, y, Xv, yv = (t.to(compute_dtype(w0.dtype)) for t in (X, y, Xv, yv))
    inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w**2).sum()  # noqa: E731
    outer = lambda w, lam: 0.5 * ((Xv @ w - yv) ** 2).mean()  # noqa: E731
    return dl.bilevel.hypergradient(outer, inner, w0, lam)[0]


def _hyper_inputs(g):
    X, Xv = _randn(g, 40, 6), _randn(g, 30, 6)
    truth = _randn(g, 6)
    return {"X": X, "y": X @ truth + 0.3 * _randn(g, 40), "Xv": Xv, "yv": Xv @ truth,
            "w0": torch.zeros(6, dtype=torch.float64), "lam": 0.1 + _rand(g, 6)}


def _decay_inputs(g):
    t = torch.linspace(0, 1, 12, dtype=torch.float64)
    return {"t": t, "y": (1 + _rand(g, 4, 1)) * torch.exp(-(0.5 + _rand(g, 4, 1)) * t)}


def _qp_inputs(g, B=4, n=10):
    x_feas = _randn(g, B, n)
    G, A = _randn(g, B, 6, n), _randn(g, B, 2, n)
    return {"P": _spd(g, B, n), "q": _randn(g, B, n), "G": G, "h": (G @ x_feas[..., None])[..., 0] + _rand(g, B, 6),
            "A": A, "b": (A @ x_feas[..., None])[..., 0]}


CASES = [
    Case("dl.fixed_point (Anderson, implicit)", lambda g: {"W": 0.5 * _randn(g, 16, 16) / 4, "x": _randn(g, 4, 16)},
         _fixed_point, ("W", "x")),
    Case("dl.root_find (Newton)", lambda g: {"A": 2 * torch.eye(8, dtype=torch.float64) + 0.3 * _randn(g, 4, 8, 8) / 3,
                                              "c": _randn(g, 4, 8)}, _root_find, ("A", "c")),
    Case("dl.argmin (Newton-CG)", lambda g: {"Q": _spd(g, 1, 8)[0], "c": _randn(g, 4, 8)}, _argmin, ("Q", "c")),
    Case("dl.least_squares (Levenberg-Marquardt)", _decay_inputs, _least_squares, ("y",)),
    Case("dl.custom_root", lambda g: {"c": _randn(g, 4, 8)}, _custom_root, ("c",)),
    Case("dl.solvers.linear_solve (Cholesky)", lambda g: {"A": _spd(g, 4, 12), "b": _randn(g, 4, 12)},
         _linear_dense, ("A", "b")),
    Case("dl.solvers.linear_solve (CG, unrolled)", lambda g: {"A": _spd(g, 4, 12), "b": _randn(g, 4, 12)},
         _linear_cg, ("b",)),
    Case("dl.QPLayer", _qp_inputs, _qp, ("P", "q", "G", "h", "A", "b")),
    Case("dl.ConicLayer (cvxpy)", lambda g: {"c": _randn(g, 4, 8)}, None, ("c",)),
    Case("dl.ot.sinkhorn (value, envelope)", lambda g: {"x": _rand(g, 4, 20, 2), "y": _rand(g, 4, 25, 2)},
         _sinkhorn, ("x", "y")),
    Case("dl.ot.SinkhornLayer (plan, implicit)", lambda g: {"x": _rand(g, 4, 10, 2), "y": _rand(g, 4, 12, 2)},
         _sinkhorn_plan, ("x", "y")),
    Case("dl.ot.SinkhornDivergence", lambda g: {"x": _rand(g, 4, 20, 2), "y": _rand(g, 4, 25, 2)},
         _divergence, ("x", "y")),
    Case("dl.ot.soft_sort", lambda g: {"x": _randn(g, 4, 8)}, _soft_sort, ("x",)),
    Case("dl.ot.soft_rank", lambda g: {"x": _randn(g, 4, 8)}, _soft_rank, ("x",)),
    Case("dl.ot.quadratic_ot (plan, implicit)", lambda g: {"x": _rand(g, 4, 10, 2), "y": _rand(g, 4, 12, 2)},
         _quadratic_ot, ("x", "y")),
    Case("dl.pde.PDELayer (linear diffusion)", lambda g: {"k": 0.5 + _rand(g, 4, 16, 16),
                                                          "f": torch.ones(16, 16, dtype=torch.float64)},
         _pde_linear, ("k", "f")),
    Case("dl.pde.PDELayer (nonlinear, Newton-CG)", lambda g: {"k": 0.5 + _rand(g, 4, 12, 12),
                                                              "f": 10 * _rand(g, 12, 12)},
         _pde_nonlinear, ("k", "f")),
    Case("dl.bilevel.hypergradient (ImplicitCG)", _hyper_inputs, _hypergradient, ()),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def measure_case(case: Case, dtype: torch.dtype, seed: int = 0) -> dict:
    """Run ``case`` in ``dtype`` and in float64 on the same rounded inputs.

    Returns ``{"output": rel. error, "gradient": max rel. error or nan, "dtypes_ok": bool}``
    (``dtypes_ok``: the output and every gradient carry ``dtype``).
    """
    run = case.run if case.run is not None else _conic_layer()
    base = case.make(torch.Generator().manual_seed(seed))
    rounded = {k: v.to(dtype) for k, v in base.items()}

    def evaluate(inputs):
        inputs = {k: v.detach().requires_grad_(k in case.grad) for k, v in inputs.items()}
        out = run(**inputs)
        grads = {}
        if case.grad:
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
            (out.double() * w).sum().backward()
            grads = {k: inputs[k].grad for k in case.grad}
        return out.detach(), grads

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # unconverged or inaccurate solves
        out, grads = evaluate(rounded)
        ref, ref_grads = evaluate({k: v.double() for k, v in rounded.items()})
    return {
        "output": _rel(out, ref),
        "gradient": max((_rel(grads[k], ref_grads[k]) for k in case.grad), default=math.nan),
        "dtypes_ok": out.dtype == dtype and all(g is not None and g.dtype == dtype for g in grads.values()),
    }


def _fmt(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1e}"


def run(repeats: int = 1, device: str = "cpu", quick: bool = False) -> str:
    """The markdown table of docs/precision.md (``repeats`` and ``device`` unused: CPU)."""
    header = ("| entry point | float32 output | float32 gradient | bfloat16 output | bfloat16 gradient | "
              "float16 output | float16 gradient |")
    lines = [header, "|" + "---|" * 7]
    cases = CASES[:3] if quick else CASES
    for case in cases:
        cells = []
        for dtype in DTYPES:
            r = measure_case(case, dtype)
            if not r["dtypes_ok"]:
                raise AssertionError(f"{case.name}: output or gradient not in {dtype}")
            cells += [_fmt(r["output"]), _fmt(r["gradient"])]
        lines.append(f"| {case.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
