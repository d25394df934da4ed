"""Differentiable functional inner optimizers and the solver that runs them.

An inner optimizer is a frozen dataclass of hyperparameters with two pure methods on
flat batched tensors:

* ``init(x) -> state`` (a dict of ``[B, ...]`` tensors),
* ``update(x, d, state) -> (x_new, state_new)`` with ``d = G(x, lam)`` the inner
  optimality condition (the gradient of an inner objective; ``w - T(w)`` for a
  fixed-point map; ``R(w)`` for a root problem).

Every operation is differentiable, to any order: unrolled hypergradients
differentiate through the updates, forward mode pushes tangents through them. Adam's
square root is ``safe_sqrt``, whose derivatives are finite at zero, so second
derivatives through Adam never turn into NaN where a coordinate's gradient vanishes.

``OptimizerSolver`` runs an inner optimizer through the shared iteration driver
(``difflayers.solvers.iterate``), so unrolling, checkpointing and per-sample stopping
come from the same code as every other solver.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils import _pytree as pytree

from ..solvers import NonlinearSolver, batch_norm

__all__ = ["InnerOptimizer", "SGD", "Adam", "AdamW", "TorchoptOptimizer", "OptimizerSolver", "safe_sqrt",
           "as_inner_optimizer"]

State = dict[str, torch.Tensor]


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` with derivative 0 (instead of ``inf``) at ``x = 0``.

    ``d sqrt(x)/dx = 1 / (2 sqrt(x))`` is infinite at 0, and ``inf * 0`` is NaN in the
    chain rule: unrolled Adam would then produce NaN hypergradients as soon as one
    coordinate's gradient is exactly zero. Both branches of the ``where`` are finite, so
    every derivative is finite.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _check_number(owner: str, name: str, value, low: float, high: float = float("inf"), low_open=False, high_open=True):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name} must be a number in {interval}; got {value!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InnerOptimizer:
    """Base of the differentiable inner optimizers (see the module docstring)."""

    def init(self, x: torch.Tensor) -> State:
        raise NotImplementedError

    def update(self, x: torch.Tensor, d: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SGD(InnerOptimizer):
    """Gradient descent with optional heavy-ball or Nesterov momentum and weight decay.

    With ``d = G(x)`` (plus ``weight_decay * x``), momentum buffer ``b``:

        b <- momentum * b + d,     x <- x - lr * (d + momentum * b if nesterov else b).

    ``momentum = 0`` is plain gradient descent ``x <- x - lr * G(x)``; on a fixed-point
    map (``G = x - T(x)``) ``lr = 1`` is the Picard iteration ``x <- T(x)``.

    Args:
        lr: step size > 0.
        momentum: in [0, 1).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 coefficient >= 0 added to the direction.

    References:
        Polyak, Some methods of speeding up the convergence of iteration methods (1964),
        DOI 10.1016/0041-5553(64)90137-5.
    """

    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self):
        _check_number("SGD", "lr", self.lr, 0.0, low_open=True)
        _check_number("SGD", "momentum", self.momentum, 0.0, 1.0)
        _check_number("SGD", "weight_decay", self.weight_decay, 0.0)
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0.")

    def init(self, x):
        return {"buffer": torch.zeros_like(x)} if self.momentum else {}

    def update(self, x, d, state):
        if self.weight_decay:
            d = d + self.weight_decay * x
        if not self.momentum:
            return x - self.lr * d, state
        b = self.momentum * state["buffer"] + d
        step = d + self.momentum * b if self.nesterov else b
        return x - self.lr * step, {"buffer": b}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Adam(InnerOptimizer):
    """Adam, differentiable to any order (``safe_sqrt``), with L2 or decoupled weight decay.

        m <- b1 m + (1 - b1) d,   v <- b2 v + (1 - b2) d^2,
        x <- x - lr (m / (1 - b1^t)) / (safe_sqrt(v / (1 - b2^t)) + eps)  [- lr wd x if decoupled]

    Args:
        lr: step size > 0.
        betas: ``(b1, b2)`` in [0, 1).
        eps: > 0, added to the root.
        weight_decay: >= 0; added to ``d`` (L2) or, with ``decoupled=True``, applied to
            ``x`` directly (AdamW).
        decoupled: decoupled weight decay.

    References:
        Kingma & Ba, Adam (2015), arXiv:1412.6980.
        Loshchilov & Hutter, Decoupled Weight Decay Regularization (2019), arXiv:1711.05101.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    def __post_init__(self):
        name = type(self).__name__
        _check_number(name, "lr", self.lr, 0.0, low_open=True)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise ValueError(f"{name}: betas must be a pair (b1, b2); got {self.betas!r}.")
        for b in self.betas:
            _check_number(name, "betas[i]", b, 0.0, 1.0)
        _check_number(name, "eps", self.eps, 0.0, low_open=True)
        _check_number(name, "weight_decay", self.weight_decay, 0.0)

    def init(self, x):
        return {"m": torch.zeros_like(x), "v": torch.zeros_like(x),
                "t": torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)}

    def update(self, x, d, state):
        if self.weight_decay and not self.decoupled:
            d = d + self.weight_decay * x
        b1, b2 = self.betas
        t = state["t"] + 1
        m = b1 * state["m"] + (1 - b1) * d
        v = b2 * state["v"] + (1 - b2) * d * d
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        x_new = x - self.lr * m_hat / (safe_sqrt(v_hat) + self.eps)
        if self.weight_decay and self.decoupled:
            x_new = x_new - self.lr * self.weight_decay * x
        return x_new, {"m": m, "v": v, "t": t}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamW(Adam):
    """Adam with decoupled weight decay (default ``weight_decay = 1e-2``). See ``Adam``."""

    weight_decay: float = 1e-2
    decoupled: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class TorchoptOptimizer(InnerOptimizer):
    """A torchopt functional optimizer (``torchopt.sgd(...)``, ``torchopt.adam(...)``) as
    an inner optimizer. Its state (a pytree) is kept as flat tensors in the solver state.

    Args:
        transform: a ``torchopt`` ``GradientTransformation`` (has ``init`` and ``update``).
    """

    transform: object

    def __post_init__(self):
        if not (callable(getattr(self.transform, "init", None)) and callable(getattr(self.transform, "update", None))):
            raise TypeError(
                "TorchoptOptimizer: transform must be a torchopt GradientTransformation such as torchopt.adam(1e-2); "
                f"got {type(self.transform).__name__}."
            )

    def init(self, x):
        state_leaves, _ = pytree.tree_flatten(self.transform.init(x))
        return {f"opt{i}": s for i, s in enumerate(state_leaves)}

    def update(self, x, d, state):
        spec = pytree.tree_flatten(self.transform.init(x))[1]
        opt_state = pytree.tree_unflatten([state[f"opt{i}"] for i in range(len(state))], spec)
        updates, opt_state = self.transform.update(d, opt_state, params=x, inplace=False)
        new_leaves = pytree.tree_flatten(opt_state)[0]
        return x + updates, {f"opt{i}": s for i, s in enumerate(new_leaves)}


def as_inner_optimizer(optimizer, owner: str) -> InnerOptimizer:
    """Accept an ``InnerOptimizer`` or a torchopt ``GradientTransformation``."""
    if isinstance(optimizer, InnerOptimizer):
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, InnerOptimizer):
        raise TypeError(f"{owner}: optimizer must be an instance, e.g. optimizer={optimizer.__name__}(lr=0.1).")
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return TorchoptOptimizer(transform=optimizer)
    raise TypeError(
        f"{owner}: optimizer must be a differentiable inner optimizer such as dl.bilevel.SGD(lr=0.1) or "
        f"dl.bilevel.Adam(lr=1e-2), or a torchopt functional optimizer; got {type(optimizer).__name__}."
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSolver(NonlinearSolver):
    """Run an inner optimizer as a solver of ``G(x) = 0`` through the shared driver.

    Each step updates ``x`` with the stored ``G(x)`` and evaluates ``G`` at the new
    iterate, so the residual ``||G||`` is that of the current iterate at no extra cost;
    tolerances as in ``IterativeSolver``. With
    ``rtol = atol = 0`` it runs exactly ``max_steps`` steps (unless ``G`` is exactly 0).

    Args:
        optimizer: the ``InnerOptimizer``.
        rtol, atol, max_steps, check_every: see ``IterativeSolver``.
    """

    optimizer: InnerOptimizer
    max_steps: int = 100

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "optimizer", as_inner_optimizer(self.optimizer, "OptimizerSolver"))

    def init(self, problem, z0, params):
        d = problem.root(z0, params)
        opt = self.optimizer.init(z0)
        return {"z": z0, "d": d, "f0_norm": batch_norm(d), **{"opt_" + k: v for k, v in opt.items()}}

    def step(self, problem, state, params):
        opt = {k[4:]: v for k, v in state.items() if k.startswith("opt_")}
        z, opt = self.optimizer.update(state["z"], state["d"], opt)
        return {"z": z, "d": problem.root(z, params), "f0_norm": state["f0_norm"],
                **{"opt_" + k: v for k, v in opt.items()}}

    def residual(self, problem, state, params):
        return batch_norm(state["d"]), state["f0_norm"]
