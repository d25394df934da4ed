"""How gradients flow through a solve: differentiation strategies and the
differentiable entry points built on ``difflayers.solvers``; ``shard_batch`` splits a
batch of solves across the ranks of a process group with gradients through the gather."""

from ._adjoint import Adjoint, CheckpointedUnroll, Implicit, OneStep, Truncated, Unroll
from ._api import argmin, custom_root, fixed_point, least_squares, root_find
from ._function import ImplicitSpec, implicit_solution
from ._sharding import shard_batch

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
    "shard_batch",
]
