"""Entropic optimal transport as batched differentiable layers.

``sinkhorn`` solves batches of (balanced or unbalanced) entropic OT problems between
discrete measures, given a dense cost or two point clouds whose cost is computed in
tiles, with log-domain Sinkhorn iterations; gradients come from the envelope theorem
(``Envelope``, default), the implicit function theorem on the potentials
(``dl.Implicit()``) or unrolling (``dl.Unroll()``). ``SinkhornDivergence`` is the
debiased loss.
"""

from ._api import Envelope, SinkhornDivergence, SinkhornResult, sinkhorn
from ._geometry import Geometry
from ._sinkhorn import Sinkhorn

__all__ = ["sinkhorn", "Sinkhorn", "Envelope", "SinkhornResult", "SinkhornDivergence", "Geometry"]
