"""Nonlinear problems as the solvers see them: functions of a flat batched iterate.

Every problem acts on ``z`` of shape ``[B, n]`` and a tuple of explicit parameter
tensors; sample ``b`` of every output depends only on sample ``b`` of ``z``. Each
problem exposes the same three views so that any solver can work on any problem:

* ``root(z, params)``: ``F(z)``, zero at the solution (Newton and the implicit
  function theorem use it);
* ``map(z, params)``: a fixed-point map ``T(z)`` whose fixed point is the solution
  (Picard, Anderson use it);
* ``scale(z, f0_norm)``: the per-sample scale of the relative tolerance.

The entry points of ``difflayers.implicit`` reshape user functions to this form.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.func import grad, vjp

from ._driver import batch_norm

__all__ = ["FixedPointProblem", "RootProblem", "MinimizeProblem", "LeastSquaresProblem", "Problem",
           "first_evaluation"]

Params = tuple[torch.Tensor, ...]


def first_evaluation(fn: Callable, u: torch.Tensor, params: Params, *, owner: str, what: str, expects: str,
                     arg: str, params_name: str, each: str, batch: int | None, start: str) -> torch.Tensor:
    """``fn(u, *params)``, with a ``RuntimeError`` (a parameter whose shape does not fit
    ``u`` fails inside the user's function) restated as a ``ValueError`` that names the
    shapes of ``u`` and of the parameters. Entry points call it on the first
    evaluation of a user function only.

    Args:
        owner: the entry point, first word of the message.
        what: how the call is named ("F(z, *params)", "the residual").
        expects: what expects the shapes ("F", "the residual").
        arg, params_name, each: names of ``u``, of the parameters, and of one parameter.
        batch: the batch size a batched parameter needs, ``None`` when unbatched.
        start: the argument the batch size comes from ("z0", "u0").
    """
    try:
        return fn(u, *params)
    except RuntimeError as error:
        if isinstance(error, torch.OutOfMemoryError):
            raise
        shapes = ", ".join(str(tuple(p.shape)) for p in params)
        hint = (f" (a batched {each} needs the batch size {batch} of {start} as its leading dimension)."
                if batch is not None else ".")
        raise ValueError(
            f"{owner}: {what} failed on its first evaluation, with {arg} of shape {tuple(u.shape)} and "
            f"{params_name} of shapes [{shapes}]: {error}; check that every {each} has the shape (and dtype) "
            f"{expects} expects{hint}"
        ) from error


@dataclasses.dataclass(frozen=True)
class FixedPointProblem:
    """Find ``z = T(z, *params)``; ``F(z) = z - T(z)``; tolerance scale ``||z||``."""

    fn: Callable[..., torch.Tensor]
    symmetric: bool = False
    has_objective = False

    def map(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        return self.fn(z, *params)

    def root(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        return z - self.fn(z, *params)

    def scale(self, z: torch.Tensor, f0_norm: torch.Tensor) -> torch.Tensor:
        return batch_norm(z)


@dataclasses.dataclass(frozen=True)
class RootProblem:
    """Find ``F(z, *params) = 0``; fixed-point view ``T(z) = z - F(z)``.

    The tolerance scale is ``||F(z0)||``: a relative tolerance asks for that much
    reduction of the residual. ``symmetric`` declares ``dF/dz`` symmetric.
    """

    fn: Callable[..., torch.Tensor]
    symmetric: bool = False
    has_objective = False

    def map(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        return z - self.fn(z, *params)

    def root(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        return self.fn(z, *params)

    def scale(self, z: torch.Tensor, f0_norm: torch.Tensor) -> torch.Tensor:
        return f0_norm


@dataclasses.dataclass(frozen=True)
class MinimizeProblem:
    """Find a stationary point of ``f(z, *params)`` (per-sample values ``[B]``).

    ``F(z) = grad f(z)`` has a symmetric Jacobian (the Hessian).
    """

    fn: Callable[..., torch.Tensor]
    symmetric: bool = True
    has_objective = True

    def objective(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        return self.fn(z, *params)

    def root(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        return grad(lambda z: self.fn(z, *params).sum())(z)

    def map(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        return z - self.root(z, params)

    def scale(self, z: torch.Tensor, f0_norm: torch.Tensor) -> torch.Tensor:
        return f0_norm


@dataclasses.dataclass(frozen=True)
class LeastSquaresProblem:
    """Minimize ``1/2 ||r(z, *params)||^2`` with residuals ``r: [B, n] -> [B, m]``.

    ``F(z) = J(z)^T r(z)`` (the gradient), with symmetric Jacobian.
    """

    fn: Callable[..., torch.Tensor]
    symmetric: bool = True
    has_objective = True

    def residuals(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        return self.fn(z, *params)

    def objective(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        r = self.fn(z, *params)
        return 0.5 * r.reshape(r.shape[0], r.shape[1:].numel()).square().sum(dim=1)

    def root(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        r, pullback = vjp(lambda z: self.fn(z, *params), z)
        return pullback(r)[0]

    def map(self, z: torch.Tensor, params: Params) -> torch.Tensor:
        return z - self.root(z, params)

    def scale(self, z: torch.Tensor, f0_norm: torch.Tensor) -> torch.Tensor:
        return f0_norm


Problem = FixedPointProblem | RootProblem | MinimizeProblem | LeastSquaresProblem
