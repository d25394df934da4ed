"""``hypergradient``: the one entry point of every estimator."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..solvers import ConvergenceError, Solution
from ..solvers._precision import to_compute, to_output, without_autocast
from ._estimators import Estimator, ImplicitCG, ImplicitGMRES, _Unrolled
from ._implicit import implicit_estimate
from ._info import HypergradientInfo, WarmStart
from ._problem import BilevelProblem, FixedPoint, Objective, Root
from ._tree import Layout, Tree, check_tree, leaves
from ._unrolled import unrolled_estimate

__all__ = ["hypergradient"]

_POLICIES = ("warn", "raise")


def _check_estimator(estimator) -> None:
    if isinstance(estimator, type) and issubclass(estimator, Estimator):
        raise TypeError(f"hypergradient: estimator must be an instance; pass estimator={estimator.__name__}(...).")
    if not isinstance(estimator, Estimator):
        raise TypeError(
            "hypergradient: estimator must be a dl.bilevel estimator such as ImplicitCG(), ImplicitGMRES(), "
            f"Unrolled(optimizer=SGD(lr=0.1)) or Penalty(); got {type(estimator).__name__}."
        )


def _start(problem: BilevelProblem, w0: Tree, state: WarmStart | None):
    """Flat starting point and adjoint guess, from ``w0`` or a ``WarmStart``."""
    adjoint = None
    start = w0
    if state is not None:
        if not isinstance(state, WarmStart):
            raise TypeError(f"hypergradient: state must be the WarmStart of a previous info.state; got {type(state).__name__}.")
        check_tree("state.w", state.w, "the inner variables")
        if Layout.of(state.w, problem.batched, "state.w") != problem.w_layout:
            raise ValueError(
                "hypergradient: state.w does not have the structure of w0 (keys, shapes, batch); expected the "
                "WarmStart returned for this same problem. Pass state=None to start from w0."
            )
        start = state.w
        adjoint = state.adjoint
    x0 = problem.w_layout.flatten(start).detach().to(problem.dtype)
    if adjoint is not None:
        if adjoint.shape != x0.shape or adjoint.dtype != x0.dtype or adjoint.device != x0.device:
            raise ValueError(
                f"hypergradient: state.adjoint has shape {tuple(adjoint.shape)} {adjoint.dtype} {adjoint.device}; "
                f"expected {tuple(x0.shape)} {x0.dtype} {x0.device}, the flat inner variables. Pass state=None."
            )
        adjoint = adjoint.detach()
    return x0, adjoint


def _check_finite(results: dict, estimator: Estimator) -> None:
    grads = leaves(results["grad"])
    if bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # one host sync
        return
    residual = float(results["inner_residual"].max())
    raise ValueError(
        f"hypergradient ({type(estimator).__name__}): the hypergradient is not finite (NaN or Inf); expected finite "
        f"values. The inner residual is {residual:.3e}: "
        + (
            "the inner optimizer diverged; lower its learning rate (below 2 / L for gradient descent)."
            if not residual < float("inf") or residual > 1e3
            else "check inner and outer for operations whose derivatives are not finite here (sqrt or log at 0)."
        )
    )


def _enforce(results: dict, estimator: Estimator, policy: str, problem: BilevelProblem) -> None:
    failed = [(what, sol) for what, sol in results["statuses"] if not bool(sol.converged.all())]
    if not failed:
        return
    what, sol = failed[0]
    name = type(estimator).__name__
    fix = (
        "Raise max_steps or loosen rtol of the inner_solver, start from a better w0 (warm start), or pass "
        "inner_solver=AsGiven() if w0 already solves the inner problem to the accuracy you need."
        if "inner" in what
        else "Raise max_steps, use a better-suited method (ImplicitGMRES for nonsymmetric or indefinite "
        "Jacobians, ImplicitDense for small problems) or check that dG/dw is nonsingular at the solution."
    )
    if policy == "raise":
        shaped = Solution(problem.w_layout.unflatten(sol.value) if sol.value.shape[-1] == problem.w_layout.size
                          else sol.value, sol.status, sol.stats)
        raise ConvergenceError(f"hypergradient ({name}): {what}", shaped,
                               hint=f"{fix} Pass on_unconverged='warn' to get the estimate with a warning.")
    bad = (~sol.converged).nonzero().flatten().tolist()
    warnings.warn(
        f"hypergradient ({name}): the {what} did not converge for problems {bad[:8]}"
        f"{' ...' if len(bad) > 8 else ''} (max residual {float(sol.stats['residual'].max()):.3e}); the "
        f"hypergradient is inaccurate there. {fix}",
        RuntimeWarning,
        stacklevel=4,  # past hypergradient and without_autocast's frame
    )


@without_autocast
def hypergradient(
    outer: Callable,
    inner: Callable | Objective | FixedPoint | Root,
    w0: Tree,
    lam: Tree,
    *,
    estimator: Estimator | None = None,
    batched: bool = False,
    state: WarmStart | None = None,
    on_unconverged: str = "warn",
) -> tuple[Tree, HypergradientInfo]:
    """Gradient of the outer objective at the inner solution with respect to hyperparameters.

    Computes (an estimate of) ``dF/dlam`` for

        F(lam) = f(w*(lam), lam),    G(w*(lam), lam) = 0,

    where ``G`` is the inner optimality condition: ``grad_w g`` for an inner objective
    ``g`` (``inner`` a callable or ``Objective(g)``), ``w - T(w, lam)`` for
    ``FixedPoint(T)``, ``R(w, lam)`` for ``Root(R)``. By the implicit function theorem

        dF/dlam = df/dlam - (dG/dlam)^T (dG/dw)^-T df/dw.

    The estimator object chooses how this is computed: an implicit linear solve
    (``ImplicitCG``, the default for objectives; ``ImplicitGMRES``, the default for fixed
    points and nonsymmetric roots; ``ImplicitMINRES``, ``ImplicitNeumann``,
    ``ImplicitDense``), differentiation of a finite inner optimizer run (``Unrolled``,
    ``CheckpointedUnrolled``, ``TruncatedUnrolled``, ``ForwardMode``), or a first-order
    approximation (``OneStep``, ``FiniteDifference``, ``Penalty``).

    Args:
        outer: ``f(w, lam)``, a scalar (``[B]`` with ``batched=True``).
        inner: the inner problem: a callable ``g(w, lam)`` returning a scalar objective to
            minimize over ``w``, or ``FixedPoint(T)`` / ``Root(R)``.
        w0: the inner variables' starting point (or solution, for ``AsGiven()``): a tensor
            or a dict of tensors (``nn.Module`` parameters, used through
            ``torch.func.functional_call``).
        lam: the hyperparameters: a tensor of any shape (0-dim included) or a dict of tensors.
        estimator: an estimator object; ``None``: ``ImplicitCG()`` for objectives and
            symmetric roots, ``ImplicitGMRES()`` otherwise.
        batched: every tensor of ``w0`` and ``lam`` carries ``B`` independent problems along
            its leading dimension; ``inner``/``outer`` return ``[B]`` values, and each
            problem gets its own statuses and gradient.
        state: ``info.state`` of a previous call: its inner solution replaces ``w0`` as the
            starting point, its adjoint vector starts the Krylov solve.
        on_unconverged: ``"warn"`` (a ``RuntimeWarning``) or ``"raise"`` (a
            ``ConvergenceError``) when an inner or adjoint solve that the estimator relies
            on did not converge.

    Returns:
        ``(grad, info)``: ``grad`` shaped like ``lam`` (detached) and a
        ``HypergradientInfo`` with the outer value, the inner solution, residuals,
        iterations, statuses and the ``WarmStart`` for the next call. With
        ``batched=True`` and an empty batch (``B = 0``) both are empty.

    Precision: ``grad``, ``info.value`` and ``info.w`` have the dtype of ``w0`` and
    ``lam`` (one floating dtype for all their tensors). float64 and float32 are solved
    as given; float16 and bfloat16 trees are cast to float32, ``inner`` and ``outer``
    are evaluated on float32 tensors (cast captured 16-bit data with ``.float()`` for
    matrix products) and the results are cast back. ``info.state`` keeps float32, so
    warm starts lose nothing.

    Raises:
        TypeError, ValueError: malformed inputs (not a scalar inner objective, a
            hyperparameter that does not reach the inner problem, dtype/device/shape
            mismatches, NaN/Inf); the message says what was expected and the fix.
        ConvergenceError: with ``on_unconverged="raise"``.

    Example:
        >>> X = torch.randn(50, 5, dtype=torch.float64); y = X @ torch.ones(5, dtype=torch.float64)
        >>> inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam * w**2).sum()
        >>> outer = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean()
        >>> lam = torch.full((5,), 0.1, dtype=torch.float64)
        >>> g, info = dl.bilevel.hypergradient(outer, inner, torch.zeros(5, dtype=torch.float64), lam)
        >>> g.shape, bool(info.converged.all())
        (torch.Size([5]), True)

    References:
        Bengio, Gradient-Based Optimization of Hyperparameters (2000), DOI 10.1162/089976600300015187.
        Pedregosa, Hyperparameter optimization with approximate gradient (2016), arXiv:1602.02355.
        Blondel et al., Efficient and Modular Implicit Differentiation (2022), arXiv:2105.15183.
    """
    if on_unconverged not in _POLICIES:
        raise ValueError(f"hypergradient: on_unconverged must be one of {_POLICIES}; got {on_unconverged!r}.")
    problem = BilevelProblem(outer, inner, w0, lam, batched)
    if estimator is None:
        estimator = ImplicitCG() if problem.inner.symmetric else ImplicitGMRES()
    _check_estimator(estimator)
    # 16-bit trees are solved in float32 (problem.dtype) and the results cast back
    lam = problem.lam_layout.from_leaves(to_compute(t.detach()) for t in leaves(lam))
    x0, adjoint0 = _start(problem, w0, state)
    problem.check(problem.w_layout.unflatten(x0), lam)

    if isinstance(estimator, _Unrolled):
        results = unrolled_estimate(problem, estimator, x0, lam)
    else:
        results = implicit_estimate(problem, estimator, x0, lam, adjoint0)
    _check_finite(results, estimator)
    _enforce(results, estimator, on_unconverged, problem)

    x = results["x"]
    w = problem.w_layout.unflatten(x)
    values = results["values"]
    out = problem.input_dtype
    info = HypergradientInfo(
        estimator=estimator,
        value=to_output(values if problem.batched else values.reshape(()), out),
        w=problem.w_layout.unflatten(to_output(x, out)),
        inner_residual=results["inner_residual"],
        inner_steps=results["inner_steps"],
        inner_status=results["inner_status"],
        linear_residual=results.get("linear_residual"),
        linear_steps=results.get("linear_steps"),
        linear_status=results.get("linear_status"),
        state=WarmStart(w=w, adjoint=results.get("adjoint")),
        checked=bool(results["statuses"]),
        extra=results.get("extra", {}),
    )
    grad = results["grad"]
    if out != problem.dtype:
        grad = problem.lam_layout.from_leaves(to_output(g, out) for g in leaves(grad))
    return grad, info
