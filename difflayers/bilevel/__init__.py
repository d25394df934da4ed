"""Bilevel optimization: hypergradients of ``F(lam) = f(w*(lam), lam)``.

One entry point, ``hypergradient(outer, inner, w0, lam, estimator=...)``, and estimator
objects that say how the derivative through the inner solution is computed:

* implicit: ``ImplicitCG`` (default), ``ImplicitMINRES``, ``ImplicitGMRES``,
  ``ImplicitNeumann``, ``ImplicitDense`` -- one linear solve at the inner solution;
* unrolled: ``Unrolled``, ``CheckpointedUnrolled``, ``TruncatedUnrolled``,
  ``ForwardMode`` -- differentiate a run of a differentiable inner optimizer
  (``SGD``, ``Adam``, ``AdamW``, or a torchopt functional optimizer);
* first order: ``OneStep``, ``FiniteDifference`` (DARTS), ``Penalty`` (F2SA).

Inner problems are objectives (a callable ``g(w, lam)``), ``FixedPoint(T)`` or
``Root(R)``; ``w`` and ``lam`` are tensors or dicts of tensors (``nn.Module``
parameters through ``torch.func.functional_call``). ``learn_hyperparameters`` runs an
outer loop with any ``torch.optim`` optimizer. See ``docs/bilevel.md``.
"""

from ._estimators import (
    AsGiven,
    CheckpointedUnrolled,
    Estimator,
    FiniteDifference,
    ForwardMode,
    ImplicitCG,
    ImplicitDense,
    ImplicitGMRES,
    ImplicitMINRES,
    ImplicitNeumann,
    OneStep,
    Penalty,
    TruncatedUnrolled,
    Unrolled,
)
from ._hypergradient import hypergradient
from ._info import HypergradientInfo, WarmStart
from ._loop import History, ProgressBar, learn_hyperparameters
from ._optimizers import SGD, Adam, AdamW, InnerOptimizer, OptimizerSolver, TorchoptOptimizer, safe_sqrt
from ._problem import FixedPoint, Objective, Root

__all__ = [
    "hypergradient",
    "HypergradientInfo",
    "WarmStart",
    "learn_hyperparameters",
    "History",
    "ProgressBar",
    "Objective",
    "FixedPoint",
    "Root",
    "Estimator",
    "ImplicitCG",
    "ImplicitMINRES",
    "ImplicitGMRES",
    "ImplicitNeumann",
    "ImplicitDense",
    "Unrolled",
    "CheckpointedUnrolled",
    "TruncatedUnrolled",
    "ForwardMode",
    "OneStep",
    "FiniteDifference",
    "Penalty",
    "AsGiven",
    "InnerOptimizer",
    "SGD",
    "Adam",
    "AdamW",
    "TorchoptOptimizer",
    "OptimizerSolver",
    "safe_sqrt",
]
