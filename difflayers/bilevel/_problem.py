"""The bilevel problem: inner problem kinds and their flat, validated form.

A bilevel problem is

    min_lam  F(lam) = f(w*(lam), lam),      w*(lam) solves the inner problem,

where the inner problem is one of

* ``Objective(g)`` (or a plain callable ``g``): ``w* = argmin_w g(w, lam)``, optimality
  condition ``grad_w g(w*, lam) = 0`` with a symmetric Jacobian (the Hessian);
* ``FixedPoint(T)``: ``w* = T(w*, lam)``, condition ``w* - T(w*, lam) = 0``;
* ``Root(R)``: ``R(w*, lam) = 0``.

Every estimator sees the same *optimality condition* ``G(w, lam) = 0`` on flat
``[B, n]`` iterates, through ``BilevelProblem``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.func import grad, grad_and_value, vjp

from ..solvers import FixedPointProblem, MinimizeProblem, RootProblem, compute_dtype
from ..solvers._tracing import check_all
from ._tree import Layout, Tree, check_tree, leaves

__all__ = ["Objective", "FixedPoint", "Root", "BilevelProblem", "as_inner"]


@dataclasses.dataclass(frozen=True)
class Objective:
    """Inner problem ``w* = argmin_w g(w, lam)``; ``g`` returns a scalar (``[B]`` if batched).

    Optimality condition: ``grad_w g(w*, lam) = 0``; its Jacobian is the Hessian
    ``d^2 g / dw^2``, symmetric (positive definite at a strict minimum).
    """

    fn: Callable
    kind = "objective"
    symmetric = True


@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """Inner problem ``w* = T(w*, lam)``; ``T`` returns a tree shaped like ``w``.

    Optimality condition: ``w* - T(w*, lam) = 0``, Jacobian ``I - dT/dw`` (not symmetric
    in general).
    """

    fn: Callable
    kind = "fixed_point"
    symmetric = False


@dataclasses.dataclass(frozen=True)
class Root:
    """Inner problem ``R(w*, lam) = 0``; ``R`` returns a tree shaped like ``w``.

    Args:
        fn: the residual ``R(w, lam)``.
        symmetric: declare ``dR/dw`` symmetric (enables CG and MINRES).
    """

    fn: Callable
    symmetric: bool = False
    kind = "root"


def as_inner(inner) -> Objective | FixedPoint | Root:
    if isinstance(inner, (Objective, FixedPoint, Root)):
        if not callable(inner.fn):
            raise TypeError(f"hypergradient: {type(inner).__name__}(fn) needs a callable; got {type(inner.fn).__name__}.")
        return inner
    if callable(inner):
        return Objective(inner)
    raise TypeError(
        "hypergradient: inner must be a callable inner(w, lam) returning the inner objective, or "
        f"dl.bilevel.FixedPoint(T) / dl.bilevel.Root(R); got {type(inner).__name__}."
    )


class _GraphMinimizeProblem(MinimizeProblem):
    """``MinimizeProblem`` whose gradient is taken by ``torch.autograd.grad`` with
    ``create_graph=True``: usable inside ``torch.utils.checkpoint`` (``torch.func``
    transforms are not), so unrolled and checkpointed differentiation record it."""

    def root(self, z, params):
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            value = self.fn(z, *params).sum()
            return torch.autograd.grad(value, z, create_graph=True)[0]


class BilevelProblem:
    """Validated, flattened bilevel problem (internal).

    Holds the layouts of ``w`` and ``lam``; every method takes a flat ``x`` ``[B, n]``
    and a hyperparameter tree.
    """

    def __init__(self, outer, inner, w0: Tree, lam: Tree, batched: bool):
        if not callable(outer):
            raise TypeError(f"hypergradient: outer must be a callable outer(w, lam); got {type(outer).__name__}.")
        self.inner = as_inner(inner)
        self.outer = outer
        check_tree("w0", w0, "the inner variables")
        check_tree("lam", lam, "the hyperparameters")
        self.batched = bool(batched)
        self.w_layout = Layout.of(w0, self.batched, "w0")
        self.lam_layout = Layout.of(lam, self.batched, "lam")
        first = leaves(w0)[0]
        # the caller's dtype, and the one solves run in (float32 for 16-bit trees)
        self.input_dtype, self.device = first.dtype, first.device
        self.dtype = compute_dtype(first.dtype)
        for name, tree in (("w0", w0), ("lam", lam)):
            for i, t in enumerate(leaves(tree)):
                label = name if isinstance(tree, torch.Tensor) else f"{name}[{list(tree)[i]!r}]"
                if t.dtype != self.input_dtype:
                    raise TypeError(
                        f"hypergradient: {label} has dtype {t.dtype} but w0 has {self.input_dtype}; expected one dtype "
                        f"for all inner variables and hyperparameters. Cast it, e.g. .to({self.input_dtype})."
                    )
                if t.device != self.device:
                    raise ValueError(
                        f"hypergradient: {label} is on {t.device} but w0 is on {self.device}; expected one device. "
                        f"Move it, e.g. .to('{self.device}')."
                    )
                if t.device.type != "meta":  # one host read (a device-side assertion while compiled)
                    check_all(torch.isfinite(t.detach()), lambda _, label=label: ValueError(
                        f"hypergradient: {label} contains NaN or Inf; expected finite values. Check how it was "
                        "computed (a diverged previous step, a division by zero)."
                    ))
        if self.batched and self.w_layout.batch != self.lam_layout.batch:
            raise ValueError(
                f"hypergradient: batched=True but w0 has batch size {self.w_layout.batch} and lam "
                f"{self.lam_layout.batch}; expected the same leading size (one hyperparameter set per problem)."
            )
        self.batch = self.w_layout.batch

    # ------------------------------------------------------------------ evaluations

    def _values(self, fn, what: str, x: torch.Tensor, lam: Tree) -> torch.Tensor:
        out = fn(self.w_layout.unflatten(x), lam)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"hypergradient: {what} must return a tensor; got {type(out).__name__}.")
        expected = (self.batch,) if self.batched else ()
        if tuple(out.shape) != expected:
            raise ValueError(
                f"hypergradient: {what}(w, lam) returned shape {tuple(out.shape)}; expected "
                f"{'one value per problem, shape ' + str(expected) if self.batched else 'a scalar (0-dim tensor)'}. "
                f"{'Reduce with .sum() or .mean() over samples.' if not self.batched else 'Reduce over all but the batch dimension.'}"
            )
        return out.reshape(self.batch)

    def inner_value(self, x: torch.Tensor, lam: Tree) -> torch.Tensor:
        """The inner objective per problem, ``[B]``."""
        return self._values(self.inner.fn, "inner", x, lam)

    def outer_value(self, x: torch.Tensor, lam: Tree) -> torch.Tensor:
        """The outer objective per problem, ``[B]``."""
        return self._values(self.outer, "outer", x, lam)

    def _map_flat(self, x: torch.Tensor, lam: Tree) -> torch.Tensor:
        out = self.inner.fn(self.w_layout.unflatten(x), lam)
        what = "T" if self.inner.kind == "fixed_point" else "R"
        expected = self.w_layout.unflatten(x)
        if isinstance(expected, torch.Tensor):
            ok = isinstance(out, torch.Tensor) and out.shape == expected.shape
        else:
            ok = isinstance(out, dict) and out.keys() == expected.keys() and all(
                isinstance(out[k], torch.Tensor) and out[k].shape == expected[k].shape for k in expected
            )
        if not ok:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"hypergradient: the inner map {what}(w, lam) must return a tree shaped like w "
                f"(same keys and shapes); got {got}."
            )
        return self.w_layout.flatten(out)

    def root(self, x: torch.Tensor, lam: Tree) -> torch.Tensor:
        """The optimality condition ``G(x, lam)`` ``[B, n]`` (``torch.func``; composes with vjp/jvp)."""
        kind = self.inner.kind
        if kind == "objective":
            return grad(lambda x_: self.inner_value(x_, lam).sum())(x)
        if kind == "fixed_point":
            return x - self._map_flat(x, lam)
        return self._map_flat(x, lam)

    def root_graph(self, x: torch.Tensor, lam: Tree) -> torch.Tensor:
        """``G(x, lam)`` by ``torch.autograd`` with a recorded graph (for checkpointed regions)."""
        if self.inner.kind != "objective":
            return self.root(x, lam)
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            return torch.autograd.grad(self.inner_value(x, lam).sum(), x, create_graph=True)[0]

    def solver_problem(self, graph: bool = False):
        """The inner problem as ``difflayers.solvers`` sees it: ``fn(z, *lam_leaves)``."""
        lam_layout = self.lam_layout
        kind = self.inner.kind
        if kind == "objective":
            fn = lambda z, *ls: self.inner_value(z, lam_layout.from_leaves(ls))  # noqa: E731
            return _GraphMinimizeProblem(fn) if graph else MinimizeProblem(fn)
        fn = lambda z, *ls: self._map_flat(z, lam_layout.from_leaves(ls))  # noqa: E731
        if kind == "fixed_point":
            return FixedPointProblem(fn)
        return RootProblem(fn, symmetric=self.inner.symmetric)

    def outer_grads(self, x: torch.Tensor, lam: Tree):
        """``(df/dx [B, n], df/dlam tree, f [B])`` at ``(x, lam)``: the direct terms."""

        def total(x_, lam_):
            values = self.outer_value(x_, lam_)
            return values.sum(), values

        (f_x, f_lam), (_, values) = grad_and_value(total, argnums=(0, 1), has_aux=True)(x, lam)
        return f_x, f_lam, values

    def mixed_vjp(self, x: torch.Tensor, lam: Tree, v: torch.Tensor) -> Tree:
        """``(dG/dlam)^T v`` for ``v`` ``[B, n]``, as a tree shaped like ``lam``."""
        return vjp(lambda lam_: self.root(x, lam_), lam)[1](v)[0]

    # ------------------------------------------------------------------ boundary checks

    def _shapes(self, tree: Tree) -> str:
        if isinstance(tree, torch.Tensor):
            return str(tuple(tree.shape))
        return "{" + ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in tree.items()) + "}"

    def check(self, w0: Tree, lam: Tree) -> None:
        """Evaluate the problem once at ``(w0, lam)``: shapes, finiteness, and that every
        hyperparameter reaches the inner optimality condition. Errors raised by the user's
        functions on these inputs (typically a shape mismatch) are reported with the shapes."""
        try:
            self._check(w0, lam)
        except RuntimeError as error:
            upcast = (
                f" Note: {self.input_dtype} w0 and lam reach inner and outer as {self.dtype}; a {self.input_dtype} "
                f"tensor they capture (data) needs .to({self.dtype}) for matrix products."
                if self.dtype != self.input_dtype else ""
            )
            raise ValueError(
                f"hypergradient: evaluating the problem at (w0, lam) failed with: {error}. Expected w0 and lam "
                f"shaped as inner and outer use them; got w0 with shape {self._shapes(w0)} and lam with shape "
                f"{self._shapes(lam)}. Fix the shapes (or batched=) to match your functions.{upcast}"
            ) from error

    def _check(self, w0: Tree, lam: Tree) -> None:
        x0 = self.w_layout.flatten(w0).detach()
        lam_req = self.lam_layout.from_leaves(t.detach().requires_grad_(True) for t in leaves(lam))
        with torch.enable_grad():
            x_req = x0.clone().requires_grad_(True)
            if self.inner.kind == "objective":
                g = self.inner_value(x_req, lam_req)
                if not bool(torch.isfinite(g).all()):
                    raise ValueError(
                        "hypergradient: inner(w0, lam) is NaN or Inf; expected a finite value. Start from another w0 "
                        "or check the inner objective (log of zero, overflow)."
                    )
                if not g.requires_grad:
                    raise ValueError(
                        "hypergradient: inner(w, lam) does not depend on w or lam; expected a differentiable "
                        "function of both. Evaluate the model on w (e.g. torch.func.functional_call(model, w, x))."
                    )
                G = torch.autograd.grad(g.sum(), x_req, create_graph=True, allow_unused=True)[0]
                if G is None:
                    raise ValueError(
                        "hypergradient: inner(w, lam) does not depend on w; expected an objective of the inner "
                        "variables. Evaluate the model on w (e.g. torch.func.functional_call(model, w, x)), not "
                        "on the module's own parameters."
                    )
            else:
                G = self.root(x_req, lam_req)
            if not bool(torch.isfinite(G).all()):
                raise ValueError(
                    "hypergradient: the inner optimality condition (gradient, T(w) - w or R(w)) is NaN or Inf at "
                    "w0; expected finite values. Start from another w0 or check the inner problem."
                )
            gen = torch.Generator().manual_seed(0)
            probe = torch.rand(G.shape, generator=gen, dtype=G.dtype).to(G.device) + 0.5
            lam_leaves = leaves(lam_req)
            reached = (
                torch.autograd.grad((G * probe).sum(), lam_leaves, allow_unused=True)
                if G.requires_grad
                else [None] * len(lam_leaves)
            )
        for i, r in enumerate(reached):
            if r is None:
                keys = self.lam_layout.keys
                label = "lam" if keys is None else f"lam[{keys[i]!r}]"
                raise ValueError(
                    f"hypergradient: {label} does not reach the inner problem: the inner optimality condition "
                    "does not depend on it, so neither does w*(lam), and a hypergradient through w would be "
                    "silently zero. Expected every hyperparameter to enter inner(w, lam) together with w (e.g. "
                    "0.5 * (lam * w**2).sum()). Fix: use it in the inner problem, or drop it from lam and "
                    "differentiate a purely outer parameter with torch.autograd directly."
                )
        f = self.outer_value(x0, self.lam_layout.from_leaves(t.detach() for t in leaves(lam)))
        if not bool(torch.isfinite(f).all()):
            raise ValueError(
                "hypergradient: outer(w0, lam) is NaN or Inf; expected a finite value. Check the outer objective "
                "and the validation data."
            )
