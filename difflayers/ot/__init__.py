"""Entropic optimal transport as batched differentiable layers.

``sinkhorn`` solves batches of (balanced or unbalanced) entropic OT problems between
discrete measures, given a dense cost or two point clouds whose cost is computed in
tiles, with log-domain Sinkhorn iterations; gradients come from the envelope theorem
(``Envelope``, default), the implicit function theorem on the potentials
(``dl.Implicit()``) or unrolling (``dl.Unroll()``). ``SinkhornDivergence`` is the
debiased loss; ``soft_sort`` and ``soft_rank`` are differentiable sorting and ranking
through a plan to sorted anchors. ``quadratic_ot`` solves quadratically regularized OT
(sparse plans) by a semismooth Newton method, with envelope or implicit gradients.
"""

from ._api import Envelope, SinkhornDivergence, SinkhornLayer, SinkhornResult, sinkhorn
from ._geometry import Geometry, pnorm_cost
from ._quadratic import QuadraticOTResult, SemismoothNewton, quadratic_ot
from ._sinkhorn import Sinkhorn
from ._sinkhorn_newton import SinkhornNewton
from ._soft_sort import soft_rank, soft_sort

__all__ = [
    "sinkhorn",
    "Sinkhorn",
    "SinkhornNewton",
    "Envelope",
    "SinkhornResult",
    "SinkhornDivergence",
    "SinkhornLayer",
    "Geometry",
    "pnorm_cost",
    "quadratic_ot",
    "SemismoothNewton",
    "QuadraticOTResult",
    "soft_sort",
    "soft_rank",
]
