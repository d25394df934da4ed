r"""``ConicLayer``: a parametrized cvxpy problem as a batched, differentiable ``nn.Module``.

The problem is canonicalized once (:func:`~difflayers.conic._canonical.canonicalize`)
into an affine map :math:`\theta \mapsto (P, q, A, b)`. A forward pass evaluates that map
with plain torch ops, solves the batch of cone programs with ``solve_conic`` and reads
the requested variables from the solution. Gradients flow through ``solve_conic``'s own
adjoint and then through the affine map by ordinary autograd (so gradients of broadcast,
unbatched parameters are summed over the batch automatically).
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..solvers._precision import to_compute, to_output, without_autocast
from ._canonical import (
    CanonicalProgram,
    ParameterSlot,
    _check_lists,
    _name,
    canonicalize,
    check_parameter_tensors,
)

__all__ = ["ConicLayer", "CvxpyLayersBackend"]

_ON_FAILURE = ("raise", "nan", "mask")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CvxpyLayersBackend:
    """Delegate a :class:`ConicLayer` to ``cvxpylayers.torch.CvxpyLayer``.

    Use it for problems whose cones the native solver does not handle (exponential,
    positive semidefinite, power cones): ``ConicLayer(problem, ..., solver=CvxpyLayersBackend())``.
    The layer keeps its call convention; canonicalization, the solve and the
    differentiation are then cvxpylayers' (Agrawal et al., arXiv:1910.12430).

    Args:
        solver: cvxpylayers' solver name (e.g. ``"DIFFCP"``), or ``None`` for its default.
        solver_args: keyword arguments for that solver (e.g. ``{"eps": 1e-10}``),
            passed as cvxpylayers' ``solver_args``.

    Example:
        >>> backend = CvxpyLayersBackend(solver_args={"eps": 1e-9})
        >>> backend.solver is None
        True
    """

    solver: str | None = None
    solver_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.solver is not None and not isinstance(self.solver, str):
            raise TypeError(
                f"CvxpyLayersBackend: solver must be a cvxpylayers solver name (str) or None, got {self.solver!r}."
            )
        if not isinstance(self.solver_args, Mapping) or not all(isinstance(k, str) for k in self.solver_args):
            raise TypeError(
                "CvxpyLayersBackend: solver_args must be a mapping from option names (str) to values, "
                f"got {self.solver_args!r}."
            )
        object.__setattr__(self, "solver_args", types.MappingProxyType(dict(self.solver_args)))

    def build(self, problem, parameters, variables) -> torch.nn.Module:
        """Construct the ``cvxpylayers.torch.CvxpyLayer`` for ``problem``.

        Raises:
            ImportError: cvxpylayers is not installed.
        """
        try:
            from cvxpylayers.torch import CvxpyLayer
        except ImportError as error:
            raise ImportError(
                "CvxpyLayersBackend needs cvxpylayers; install it with `pip install cvxpylayers`."
            ) from error
        return CvxpyLayer(
            problem,
            parameters=list(parameters),
            variables=list(variables),
            solver=self.solver,
            solver_args=dict(self.solver_args),
        )


class ConicLayer(torch.nn.Module):
    r"""A DPP cvxpy problem as a batched, differentiable layer.

    For parameter values :math:`\theta` the layer returns the requested variables of

    .. math::

        x^\star(\theta) = \arg\min_x \tfrac12 x^\top P(\theta) x + q(\theta)^\top x
        \quad\text{s.t.}\quad A(\theta) x + s = b(\theta),\ s \in \mathcal K,

    the cone program cvxpy's canonicalization gives (zero, nonnegative and second-order
    cones; quadratic objectives stay quadratic). The KKT conditions
    :math:`Px + q + A^\top z = 0`, :math:`Ax + s = b`, :math:`s \in \mathcal K`,
    :math:`z \in \mathcal K^*`, :math:`s^\top z = 0` are differentiated implicitly by
    ``solve_conic``; the affine map :math:`\theta \mapsto (P, q, A, b)` by autograd.

    Call it like ``cvxpylayers.torch.CvxpyLayer``: ``layer(*tensors)`` with one tensor per
    parameter, of shape ``param.shape`` or ``(B, *param.shape)`` (unbatched tensors are
    broadcast, and their gradients summed); it returns a tuple with one tensor per
    requested variable, batched if any input is.

    Args:
        problem: a DPP-compliant ``cvxpy.Problem``.
        parameters: every parameter of ``problem``, in the order tensors will be passed.
        variables: the variables to return, in order.
        solver: the conic solver passed to ``solve_conic`` (``None`` for its default), or
            a :class:`CvxpyLayersBackend` to delegate the whole problem to cvxpylayers.
        adjoint: the differentiation strategy passed to ``solve_conic`` (``None`` for its
            default).
        on_failure: ``"raise"``, ``"nan"`` or ``"mask"``: what ``solve_conic`` does with
            samples that did not converge.

    Raises:
        TypeError, ValueError: see :func:`~difflayers.conic._canonical.canonicalize`
            (problem not DCP/DPP, parameter list mismatch, unknown variable, unsupported
            cones), or a bad ``on_failure``.

    Example:
        >>> import cvxpy as cp, torch
        >>> x, c = cp.Variable(2), cp.Parameter(2)
        >>> problem = cp.Problem(cp.Minimize(c @ x + cp.sum_squares(x)), [x >= 0])
        >>> layer = ConicLayer(problem, parameters=[c], variables=[x])
        >>> c_t = torch.tensor([[-1.0, 1.0], [1.0, -2.0]], dtype=torch.float64, requires_grad=True)
        >>> (x_t,) = layer(c_t)                      # x_t: [2, 2]
        >>> x_t.sum().backward()                     # c_t.grad: [2, 2]

    References:
        Agrawal, Amos, Barratt, Boyd, Diamond, Kolter, "Differentiable Convex Optimization
        Layers", NeurIPS 2019, arXiv:1910.12430.
    """

    def __init__(self, problem, parameters, variables, *, solver=None, adjoint=None, on_failure: str = "raise"):
        super().__init__()
        if on_failure not in _ON_FAILURE:
            raise ValueError(f"ConicLayer: on_failure must be one of {_ON_FAILURE}, got {on_failure!r}.")
        self.solver = solver
        self.adjoint = adjoint
        self.on_failure = on_failure
        if isinstance(solver, CvxpyLayersBackend):
            if adjoint is not None:
                raise ValueError(
                    "ConicLayer: adjoint= is not used with solver=CvxpyLayersBackend() (cvxpylayers differentiates "
                    "its own solve); drop adjoint= or use the native solver."
                )
            if on_failure != "raise":
                raise ValueError(
                    "ConicLayer: on_failure= must be 'raise' with solver=CvxpyLayersBackend() (cvxpylayers raises on "
                    "failure); use the native solver for 'nan' or 'mask'."
                )
            _check_lists(problem, parameters, variables)
            slots, start = [], 0
            for param in parameters:
                slot = ParameterSlot(name=_name(param), shape=tuple(int(d) for d in param.shape), start=start)
                slots.append(slot)
                start += slot.size
            self._slots = tuple(slots)
            self._program = None
            self._cvxpylayer = solver.build(problem, parameters, variables)
            return
        program = canonicalize(problem, parameters, variables)
        self._slots = program.parameters
        # Tensors live as buffers (so .to(device) / .double() move them); the frozen
        # program keeps the structure and is rebuilt around the buffers at call time.
        for name, tensor in program.tensors().items():
            self.register_buffer("_" + name, tensor)
        self._program = dataclasses.replace(program, **{name: None for name in program.tensors()})
        self._cvxpylayer = None

    @property
    def program(self) -> CanonicalProgram | None:
        """The canonical program, with this layer's buffers (``None`` with CvxpyLayersBackend)."""
        if self._program is None:
            return None
        return dataclasses.replace(self._program, **{name: getattr(self, "_" + name) for name in self._program.tensors()})

    def extra_repr(self) -> str:
        if self._program is None:
            return "backend=cvxpylayers"
        p = self._program
        return f"n={p.n}, m={p.m}, cones={p.cones}, quadratic={p.quadratic}"

    @without_autocast
    def forward(self, *params: torch.Tensor, return_solution: bool = False):
        """Solve the problem for the given parameter values.

        Args:
            *params: one tensor per parameter (see the class docstring for shapes).
            return_solution: also return the ``ConicSolution`` (per-sample ``status``,
                canonical primal ``x``, duals ``z``, slacks ``s``, ``stats``) as the last
                element of the tuple. Not available with :class:`CvxpyLayersBackend`.

        Returns:
            ``(var_1, ..., var_k)`` or, with ``return_solution=True``,
            ``(var_1, ..., var_k, solution)``, in the parameters' dtype. float16 and
            bfloat16 parameters are cast to float32 before the affine map and the
            solve, and the variables cast back (gradients reach the parameters in
            their dtype). Keep the layer itself in float32 or float64: a module-wide
            ``.half()`` or ``.to(torch.bfloat16)`` rounds its canonical maps (the
            problem's constants), which warns.

        Raises:
            TypeError, ValueError: wrong number, shape, dtype or device of the tensors, or
                NaN/Inf values.
        """
        if self._program is None:
            if return_solution:
                raise ValueError(
                    "ConicLayer: return_solution=True needs the native solver; CvxpyLayersBackend returns variables only."
                )
            check_parameter_tensors(self._slots, params, caller="ConicLayer")
            dtype = params[0].dtype if params else torch.float64
            return tuple(to_output(v, dtype) for v in self._cvxpylayer(*(to_compute(p) for p in params)))

        from ._solve import solve_conic, to_dtype

        program = self.program
        # one dtype first (a mixed call is an error), then 16-bit parameters are cast to
        # float32 before the affine map, and the variables cast back (solvers._precision)
        program.check_parameters(params, caller="ConicLayer")
        maps = [t for t in (program.map_dense, program.map_values) if t is not None]
        if any(torch.finfo(t.dtype).bits < 32 for t in maps):
            warnings.warn(
                f"ConicLayer: the canonical maps are {maps[0].dtype} (the layer was cast with .half() or "
                ".to(torch.bfloat16)), so the problem's constants are rounded; cast the layer back with "
                ".double() or .float(). 16-bit parameters need no cast of the layer.",
                RuntimeWarning,
                stacklevel=3,
            )
        dtype = params[0].dtype if params else None
        data = program.evaluate(*(to_compute(p) for p in params), caller="ConicLayer")
        solution = solve_conic(
            data.P,
            data.q,
            data.A,
            data.b,
            program.cones,
            solver=self.solver,
            adjoint=self.adjoint,
            on_failure=self.on_failure,
        )
        values = program.recover(solution.x, data.batched)
        if dtype is not None and dtype != solution.x.dtype:
            values, solution = tuple(to_output(v, dtype) for v in values), to_dtype(solution, dtype)
        if return_solution:
            return (*values, solution)
        return values
