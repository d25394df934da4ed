"""Cone programs as batched differentiable layers: LP, QP and SOCP.

``solve_conic`` solves ``minimize 1/2 x'Px + q'x  s.t.  A x + s = b, s in K`` for a
batch with a pure-torch interior point (CPU and CUDA, float32 and float64) and
differentiates the KKT conditions reusing the final factorization. ``QPLayer`` is
the QP front end, ``ConicLayer`` the cvxpy front end, ``spo_plus_loss`` the SPO+
loss for predict-then-optimize.
"""

from ._cones import Cones
from ._interior_point import InteriorPoint
from ._canonical import CanonicalProgram, ConicData, canonicalize
from ._cvxpy_layer import ConicLayer, CvxpyLayersBackend
from ._qp import QPLayer, solve_qp
from ._solve import ConicSolution, Smoothed, solve_conic
from ._spo import spo_plus_loss

__all__ = [
    "Cones",
    "InteriorPoint",
    "ConicSolution",
    "Smoothed",
    "solve_conic",
    "solve_qp",
    "spo_plus_loss",
    "QPLayer",
    "ConicLayer",
    "CvxpyLayersBackend",
    "canonicalize",
    "CanonicalProgram",
    "ConicData",
]
