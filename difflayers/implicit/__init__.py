"""How gradients flow through a solve: differentiation strategies and the
differentiable entry points built on ``difflayers.solvers``."""

from ._adjoint import Adjoint, CheckpointedUnroll, Implicit, OneStep, Truncated, Unroll
from ._api import argmin, custom_root, fixed_point, least_squares, root_find
from ._function import ImplicitSpec, implicit_solution

__all__ = [
    "Adjoint",
    "Implicit",
    "Unroll",
    "CheckpointedUnroll",
    "Truncated",
    "OneStep",
    "fixed_point",
    "root_find",
    "argmin",
    "least_squares",
    "custom_root",
    "ImplicitSpec",
    "implicit_solution",
]
