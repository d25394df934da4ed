"""A small outer loop for hyperparameter learning with any ``torch.optim`` optimizer."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, TextIO

import torch

from ._estimators import Estimator
from ._hypergradient import hypergradient
from ._info import HypergradientInfo, WarmStart
from ._problem import FixedPoint, Objective, Root
from ._tree import Tree, leaves

__all__ = ["learn_hyperparameters", "History", "ProgressBar"]


class ProgressBar:
    """A one-line text progress bar redrawn in place on a text stream (stderr by default).

    Args:
        total: number of steps.
        stream: a writable text stream.
        width: characters of the bar itself.
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24):
        self.total = max(int(total), 1)
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.start = time.perf_counter()

    def update(self, step: int, message: str = "") -> None:
        done = min(max(step, 0), self.total)
        filled = round(self.width * done / self.total)
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done}/{self.total} {elapsed:6.1f}s {message}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


@dataclasses.dataclass
class History:
    """What ``learn_hyperparameters`` recorded, one entry per outer step.

    Attributes:
        outer_loss: outer objective at the inner solution, before the step's update.
        grad_norm: norm of the hypergradient.
        inner_residual: worst inner optimality residual of the step.
        linear_residual: worst adjoint residual (``nan`` for estimators without one).
        inner_steps: most inner iterations of the step.
        converged: whether the step's inner (and adjoint) solves succeeded.
        seconds: wall time of each step.
        info: the last ``HypergradientInfo``.
    """

    outer_loss: list[float] = dataclasses.field(default_factory=list)
    grad_norm: list[float] = dataclasses.field(default_factory=list)
    inner_residual: list[float] = dataclasses.field(default_factory=list)
    linear_residual: list[float] = dataclasses.field(default_factory=list)
    inner_steps: list[int] = dataclasses.field(default_factory=list)
    converged: list[bool] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    info: HypergradientInfo | None = None

    def record(self, info: HypergradientInfo, grad_norm: torch.Tensor, seconds: float) -> None:
        # One host read per outer step: the inner and adjoint solves synchronize anyway.
        numbers = torch.stack([
            info.value.detach().sum(),
            grad_norm,
            info.inner_residual.max(),
            info.linear_residual.max() if info.linear_residual is not None else torch.tensor(float("nan")).to(grad_norm),
            info.inner_steps.max().to(grad_norm.dtype),
            info.converged.all().to(grad_norm.dtype),
        ]).tolist()
        self.outer_loss.append(numbers[0])
        self.grad_norm.append(numbers[1])
        self.inner_residual.append(numbers[2])
        self.linear_residual.append(numbers[3])
        self.inner_steps.append(int(numbers[4]))
        self.converged.append(bool(numbers[5]))
        self.seconds.append(seconds)
        self.info = info


def learn_hyperparameters(
    outer: Callable,
    inner: Callable | Objective | FixedPoint | Root,
    w0: Tree,
    lam: Tree,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    estimator: Estimator | None = None,
    batched: bool = False,
    on_unconverged: str = "warn",
    progress: bool = True,
    stream: TextIO | None = None,
    callback: Callable[[int, Tree, HypergradientInfo], None] | None = None,
) -> tuple[Tree, History]:
    """Minimize ``F(lam) = f(w*(lam), lam)`` with a ``torch.optim`` optimizer on ``lam``.

    Each outer step computes ``grad, info = hypergradient(...)`` warm-started from the
    previous step's inner solution and adjoint (``info.state``), writes ``grad`` into
    ``lam.grad`` and calls ``optimizer.step()``.

    Args:
        outer, inner, batched, on_unconverged, estimator: as for ``hypergradient``.
        w0: the first inner starting point.
        lam: the hyperparameters: leaf tensors (or a dict of them) with
            ``requires_grad=True`` that ``optimizer`` updates.
        optimizer: any ``torch.optim.Optimizer`` over the tensors of ``lam``.
        steps: outer steps.
        progress: draw a progress bar with the outer loss.
        stream: where the progress bar goes (default ``sys.stderr``).
        callback: called as ``callback(step, lam, info)`` after each update (e.g. to
            project ``lam`` onto its feasible set under ``torch.no_grad()``).

    Returns:
        ``(w, history)``: the last inner solution and a ``History``.

    Raises:
        TypeError, ValueError: ``optimizer`` is not a ``torch.optim.Optimizer`` or does
            not hold the tensors of ``lam``; ``steps < 1``; an empty batch (``B = 0``).

    Example:
        >>> X = torch.randn(40, 3, dtype=torch.float64); y = X.sum(1)
        >>> inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * lam * (w**2).sum()
        >>> outer = lambda w, lam: 0.5 * ((X @ w - 0.9 * y) ** 2).mean()
        >>> lam = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        >>> w, hist = dl.bilevel.learn_hyperparameters(outer, inner, torch.zeros(3, dtype=torch.float64), lam,
        ...     torch.optim.SGD([lam], lr=0.5), steps=5, progress=False)
        >>> hist.outer_loss[-1] < hist.outer_loss[0]
        True
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"learn_hyperparameters: optimizer must be a torch.optim.Optimizer over lam, e.g. "
            f"torch.optim.Adam([lam], lr=1e-2); got {type(optimizer).__name__}."
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"learn_hyperparameters: steps must be an int >= 1; got {steps!r}.")
    lam_leaves = leaves(lam) if isinstance(lam, (torch.Tensor, dict)) else None
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if lam_leaves is None or any(id(t) not in held for t in lam_leaves):
        raise ValueError(
            "learn_hyperparameters: the optimizer must hold the very tensors of lam (leaf tensors with "
            "requires_grad=True); expected e.g. lam = torch.tensor(..., requires_grad=True) and "
            "torch.optim.Adam([lam], ...) (or list(lam.values()) for a dict)."
        )
    if batched and any(t.dim() > 0 and t.shape[0] == 0 for t in lam_leaves):
        raise ValueError(
            "learn_hyperparameters: lam has an empty batch (B = 0) with batched=True; expected at least one "
            "problem to learn from. Skip the call for an empty batch."
        )
    history = History()
    bar = ProgressBar(steps, stream) if progress else None
    state: WarmStart | None = None
    w = w0
    for step in range(steps):
        start = time.perf_counter()
        grad, info = hypergradient(
            outer, inner, w0, lam, estimator=estimator, batched=batched, state=state, on_unconverged=on_unconverged
        )
        grads = leaves(grad)
        with torch.no_grad():
            for t, g in zip(lam_leaves, grads):
                t.grad = g.to(t.dtype).clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state, w = info.state, info.w
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        history.record(info, norm, time.perf_counter() - start)
        if callback is not None:
            callback(step, lam, info)
        if bar is not None:
            bar.update(step + 1, f"outer {history.outer_loss[-1]:.4e} |grad| {history.grad_norm[-1]:.2e}")
    if bar is not None:
        bar.close()
    return w, history
