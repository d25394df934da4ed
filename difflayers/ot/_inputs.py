"""Validation of the inputs shared by the transport solvers: costs or point clouds,
weights, dtypes and devices."""

from __future__ import annotations

import torch

from ..solvers._precision import compute_dtype, to_compute
from ..solvers._tracing import check_all
from ._geometry import COSTS, Geometry

__all__ = ["prepare_problem", "as_batched"]


def as_batched(t, core: int, what: str, name: str = "sinkhorn"):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() == core:
        return t.unsqueeze(0)
    if t.dim() != core + 1:
        raise ValueError(f"{name}: {what} must have {core} dimensions (or {core + 1} with a batch), got {list(t.shape)}.")
    return t


def _check(what, t, ref, name="sinkhorn"):
    if t.dtype != ref.dtype or t.device != ref.device:
        raise TypeError(
            f"{name}: {what} has dtype {t.dtype} on {t.device} but the cost has {ref.dtype} on {ref.device}; "
            "pass every tensor with one dtype and device."
        )
    if not t.is_floating_point():
        raise TypeError(f"{name}: {what} must be floating point, got {t.dtype}.")
    check_all(torch.isfinite(t.detach()), lambda _: ValueError(f"{name}: {what} contains NaN or Inf."))


def prepare_problem(name, cost, x, y, a, b, cost_fn, tile, *, balanced: bool):
    """Validate the inputs of a transport solve; returns ``(geometry, a, b, batched, ref)``
    with batched ``a [B, n]``, ``b [B, m]`` (uniform when ``None``).

    The geometry and the weights are in the compute dtype (float32 for float16 and
    bfloat16 inputs, see ``solvers.compute_dtype``); ``ref`` is the caller's cost or
    ``x``, whose dtype the results are returned in."""
    if (cost is None) == (x is None or y is None):
        raise ValueError(f"{name}: pass either cost=[B, n, m] or both point clouds x=[B, n, d] and y=[B, m, d].")
    batched = (cost.dim() == 3) if cost is not None else (x.dim() == 3 or y.dim() == 3)
    if cost is not None:
        cost = as_batched(cost, 2, "cost", name)
        ref = cost
        _check("cost", cost, ref, name)
        geom = Geometry(cost=to_compute(cost))
    else:
        if isinstance(cost_fn, str):
            if cost_fn not in COSTS:
                raise ValueError(f"{name}: cost_fn must be one of {sorted(COSTS)} or a callable, got {cost_fn!r}.")
            fn = COSTS[cost_fn]
        elif callable(cost_fn):
            fn = cost_fn
        else:
            raise TypeError(f"{name}: cost_fn must be a name or a callable, got {type(cost_fn).__name__}.")
        x, y = as_batched(x, 2, "x", name), as_batched(y, 2, "y", name)
        if x.shape[0] != y.shape[0] and x.shape[0] == 1:
            x = x.expand(y.shape[0], -1, -1)  # an unbatched cloud broadcasts
        elif x.shape[0] != y.shape[0] and y.shape[0] == 1:
            y = y.expand(x.shape[0], -1, -1)
        if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
            raise ValueError(f"{name}: x {list(x.shape)} and y {list(y.shape)} must share batch size and dimension d.")
        ref = x
        _check("x", x, ref, name)
        _check("y", y, ref, name)
        geom = Geometry(x=to_compute(x), y=to_compute(y), cost_fn=fn, tile=tile)
    B, n, m = geom.batch, geom.n, geom.m
    if n == 0 or m == 0:
        raise ValueError(f"{name}: each measure needs at least one point; got n = {n}, m = {m}.")
    dtype = compute_dtype(ref.dtype)
    weights = []
    for wname, w, size in (("a", a, n), ("b", b, m)):
        if w is None:
            w = torch.full((B, size), 1.0 / size, dtype=dtype, device=ref.device)
        else:
            w = as_batched(w, 1, wname, name)
            _check(wname, w, ref, name)
            w = to_compute(w)
        if w.shape[-1] != size:
            raise ValueError(f"{name}: {wname} must have {size} entries, got {list(w.shape)}.")
        check_all(w.detach() >= 0, lambda _, wname=wname: ValueError(f"{name}: {wname} has negative weights."))
        weights.append(w.expand(B, size))
    a, b = weights
    if balanced:
        mass_a, mass_b = a.detach().sum(1), b.detach().sum(1)
        # 16-bit weights: each mass carries a relative rounding error up to eps / 2
        low = dtype != ref.dtype
        tol = torch.finfo(ref.dtype).eps if low else 1e-6
        check_all((mass_a - mass_b).abs() <= tol * torch.maximum(mass_a, mass_b), lambda _: ValueError(
            f"{name}: a and b must have the same total mass in the balanced problem; normalize them, "
            "or pass rho_a/rho_b for unbalanced transport."
        ))
        check_all(mass_a > 0, lambda _: ValueError(f"{name}: a and b must have positive mass."))
        if low:  # equal up to the inputs' rounding: made exactly equal in the compute dtype
            b = b * (mass_a / mass_b)[:, None]
    return geom, a, b, batched, ref
