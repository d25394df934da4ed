r"""Canonicalize a parametrized cvxpy problem once, into an affine map to a cone program.

A DPP-compliant ``cvxpy.Problem`` with parameters :math:`\theta` is, after cvxpy's
cone-program reduction, the cone program

.. math::

    \min_x \tfrac12 x^\top P(\theta) x + q(\theta)^\top x + d(\theta)
    \quad \text{s.t.} \quad A(\theta) x + s = b(\theta), \quad s \in \mathcal K,

where every entry of :math:`(P, q, d, A, b)` is an *affine* function of the flattened
parameter vector :math:`\theta` (that is what DPP guarantees). :func:`canonicalize` runs
cvxpy's reduction chain once and keeps that affine map as a matrix
:math:`M` acting on :math:`[\theta; 1]`; evaluating the program for new parameter values
is then one (batched) matrix product, which autograd differentiates like any other
torch op.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import torch

from ..solvers._tracing import check_all
from ._cones import Cones

__all__ = ["CanonicalProgram", "ConicData", "canonicalize"]

# A dense map is used when it is small or not very sparse; otherwise the map is applied as
# a gather / index_add over its nonzeros (memory ~ batch * nnz instead of batch * p * K).
_DENSE_MAP_MAX_ENTRIES = 1 << 16
_DENSE_MAP_MIN_DENSITY = 0.125


class ConicData(NamedTuple):
    """A batch of cone programs ``min 1/2 x'Px + q'x + offset  s.t.  A x + s = b, s in K``.

    Attributes:
        P: ``[B, n, n]`` symmetric quadratic term, or ``None`` for a linear objective.
        q: ``[B, n]`` linear term.
        offset: ``[B]`` constant term of the (minimized) canonical objective.
        A: ``[B, m, n]`` constraint matrix.
        b: ``[B, m]`` constraint right-hand side.
        batched: whether any parameter tensor carried a batch dimension.
    """

    P: torch.Tensor | None
    q: torch.Tensor
    offset: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    batched: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParameterSlot:
    """Where a cvxpy parameter sits in the flattened parameter vector ``theta``.

    Attributes:
        name: the parameter's cvxpy name (for error messages).
        shape: the parameter's shape; tensors are ``shape`` or ``(B, *shape)``.
        start: first column of ``theta`` (entries are in row-major order).
    """

    name: str
    shape: tuple[int, ...]
    start: int

    @property
    def size(self) -> int:
        """Number of entries of the parameter."""
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariableSlot:
    """How a requested cvxpy variable is read from the canonical solution ``x``.

    Attributes:
        name: the variable's cvxpy name.
        shape: the variable's shape.
        start: first entry of the variable in ``x``.
        symmetric: ``x`` holds the upper triangle (row-major) of a symmetric matrix.
    """

    name: str
    shape: tuple[int, ...]
    start: int
    symmetric: bool = False

    @property
    def stored_size(self) -> int:
        """Number of entries of ``x`` the variable occupies."""
        if self.symmetric:
            k = self.shape[0]
            return k * (k + 1) // 2
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class CanonicalProgram:
    r"""A cvxpy problem canonicalized once into an affine map ``theta -> (P, q, d, A, b)``.

    With :math:`\bar\theta = [\theta; 1]` (the parameters flattened in the order they were
    given, each in row-major order, then a constant one), the nonzero entries of the
    flattened data vector :math:`y = [\operatorname{vec} P; q; d; \operatorname{vec} A; b]`
    are :math:`y_{\mathcal I} = M \bar\theta`. ``M`` is stored either dense (``map_dense``,
    shape ``[p + 1, K]``) or as its nonzeros (``map_rows``, ``map_cols``, ``map_values``).

    Build it with :func:`canonicalize`; evaluate it with :meth:`evaluate` and read
    variables from a solution with :meth:`recover`.

    Attributes:
        n: number of canonical variables (columns of ``A``).
        m: number of canonical constraint rows.
        cones: the cone ``K`` (``{0}``, then ``R_+``, then second-order cones).
        quadratic: whether the canonical objective has a quadratic term ``P``.
        objective_sign: ``+1`` for ``Minimize``, ``-1`` for ``Maximize``; the problem's
            optimal value is ``objective_sign * (1/2 x'Px + q'x + offset)``.
        parameters: one :class:`ParameterSlot` per parameter, in the order given.
        variables: one :class:`VariableSlot` per requested variable, in the order given.
        data_index: ``[K]`` int64 positions in ``y`` of the entries the map produces.
        map_dense: ``[p + 1, K]`` float64 dense map, or ``None``.
        map_rows, map_cols, map_values: nonzeros of the map (``None`` when dense):
            ``y_K[map_rows] += theta_bar[map_cols] * map_values``.
    """

    n: int
    m: int
    cones: Cones
    quadratic: bool
    objective_sign: int
    parameters: tuple[ParameterSlot, ...]
    variables: tuple[VariableSlot, ...]
    data_index: torch.Tensor
    map_dense: torch.Tensor | None = None
    map_rows: torch.Tensor | None = None
    map_cols: torch.Tensor | None = None
    map_values: torch.Tensor | None = None

    @property
    def num_parameters(self) -> int:
        """Length ``p`` of the flattened parameter vector (without the constant one)."""
        return sum(slot.size for slot in self.parameters)

    @property
    def data_size(self) -> int:
        """Length of the flattened data vector ``y = [vec P; q; d; vec A; b]``."""
        return (self.n * self.n if self.quadratic else 0) + self.n + 1 + self.m * self.n + self.m

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The tensor fields by name (what a layer registers as buffers)."""
        return {name: getattr(self, name) for name in _TENSOR_FIELDS}

    def check_parameters(
        self, params: tuple[torch.Tensor, ...] | list[torch.Tensor], *, caller: str = "CanonicalProgram"
    ) -> int | None:
        """Validate parameter tensors; return the batch size, or ``None`` if unbatched.

        ``caller`` starts every error message (``"ConicLayer"`` for the layer).

        Raises:
            TypeError: a value is not a floating-point ``torch.Tensor``, or the tensors
                mix dtypes.
            ValueError: wrong number of tensors, wrong shapes, inconsistent batch sizes,
                mixed devices.
        """
        return check_parameter_tensors(self.parameters, params, caller=caller)

    def flatten_parameters(self, params: tuple[torch.Tensor, ...] | list[torch.Tensor], batch: int | None,
                           *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Stack the parameters into ``theta_bar = [theta; 1]`` of shape ``[B, p + 1]``.

        Unbatched parameters are expanded (a view), so autograd sums their gradients.
        """
        size = 1 if batch is None else batch
        columns = []
        for value, slot in zip(params, self.parameters):
            flat = value.reshape(-1, slot.size) if value.dim() > len(slot.shape) else value.reshape(1, slot.size)
            columns.append(flat.expand(size, slot.size))
        columns.append(torch.ones(size, 1, dtype=dtype, device=device))
        return torch.cat(columns, dim=1)

    def evaluate(self, *params: torch.Tensor, check_finite: bool = True, caller: str = "CanonicalProgram") -> ConicData:
        """Evaluate the cone-program data for the given parameter tensors.

        Args:
            *params: one tensor per parameter, of shape ``param.shape`` or
                ``(B, *param.shape)``; unbatched tensors are broadcast over the batch.
            check_finite: raise if a parameter holds NaN or Inf (one host sync).
            caller: the name that starts every error message.

        Returns:
            :class:`ConicData` with a leading batch dimension (``B = 1`` when unbatched),
            in the parameters' dtype and on their device.

        Raises:
            TypeError, ValueError: see :meth:`check_parameters`; ValueError also for NaN/Inf
                values and for parameters on another device than the map.
        """
        batch = self.check_parameters(params, caller=caller)
        ref = self.data_index
        if params:
            dtype, device = params[0].dtype, params[0].device
        else:
            dtype = self.map_dense.dtype if self.map_dense is not None else self.map_values.dtype
            device = ref.device
        if device != ref.device:
            raise ValueError(
                f"{caller}: the parameter tensors are on {device} but the canonical maps are on {ref.device}; "
                f"move the layer with layer.to({str(device)!r}) (or the tensors to {ref.device})."
            )
        theta = self.flatten_parameters(params, batch, dtype=dtype, device=device)
        if check_finite and params:

            def error(failed):
                if failed is None:  # traced: a device-side assertion, without names
                    names = " values"
                else:
                    bad = [slot.name for value, slot in zip(params, self.parameters)
                           if not bool(torch.isfinite(value).all())]
                    names = "(s) " + ", ".join(repr(b) for b in bad)
                return ValueError(
                    f"{caller}: parameter{names} contain NaN or Inf; "
                    "the cone program is only defined for finite parameter values."
                )

            check_all(torch.isfinite(theta.detach()), error)
        return self._apply(theta, batch is not None)

    def _apply(self, theta: torch.Tensor, batched: bool) -> ConicData:
        size = theta.shape[0]
        if self.map_dense is not None:
            reduced = theta @ self.map_dense.to(theta.dtype)
        else:
            gathered = theta[:, self.map_cols] * self.map_values.to(theta.dtype)
            reduced = theta.new_zeros(size, self.data_index.shape[0]).index_add(1, self.map_rows, gathered)
        y = theta.new_zeros(size, self.data_size).index_copy(1, self.data_index, reduced)
        n, m = self.n, self.m
        at = 0
        P = None
        if self.quadratic:
            P = y[:, : n * n].reshape(size, n, n)
            at = n * n
        q = y[:, at : at + n]
        offset = y[:, at + n]
        at += n + 1
        A = y[:, at : at + m * n].reshape(size, m, n)
        b = y[:, at + m * n :]
        return ConicData(P=P, q=q, offset=offset, A=A, b=b, batched=batched)

    def recover(self, x: torch.Tensor, batched: bool) -> tuple[torch.Tensor, ...]:
        """Read the requested variables from canonical solutions ``x`` of shape ``[B, n]``.

        cvxpy stores each variable column-major; symmetric matrix variables as their upper
        triangle (row-major). Returns one tensor per variable, of shape ``(B, *shape)``,
        or ``shape`` when ``batched`` is false.
        """
        size = x.shape[0]
        out = []
        for slot in self.variables:
            chunk = x[:, slot.start : slot.start + slot.stored_size]
            if slot.symmetric:
                k = slot.shape[0]
                # x holds X[i, j] for i <= j, row by row; gather both triangles from it.
                pos = np.zeros((k, k), dtype=np.int64)
                pos[np.triu_indices(k)] = np.arange(k * (k + 1) // 2)
                pos = np.maximum(pos, pos.T)
                index = torch.as_tensor(pos.ravel(), device=x.device)
                value = chunk[:, index].reshape(size, k, k)
            else:
                # Column-major reshape: reshape to the reversed shape, then reverse the axes.
                rev = tuple(reversed(slot.shape))
                value = chunk.reshape(size, *rev).permute(0, *range(len(rev), 0, -1))
            out.append(value if batched else value[0])
        return tuple(out)


def check_parameter_tensors(
    slots: tuple[ParameterSlot, ...], params: tuple[torch.Tensor, ...] | list[torch.Tensor], *,
    caller: str = "CanonicalProgram",
) -> int | None:
    """Validate one tensor per parameter slot; return the batch size, or ``None`` if unbatched.

    A tensor of shape ``slot.shape`` is unbatched (broadcast); one of shape
    ``(B, *slot.shape)`` is batched. All tensors must share dtype and device.

    Every message starts with ``caller``.

    Raises:
        TypeError: a value is not a real floating-point ``torch.Tensor``, or the
            tensors mix dtypes.
        ValueError: wrong number of tensors, wrong shapes, inconsistent batch sizes,
            mixed devices.
    """
    if len(params) != len(slots):
        names = ", ".join(slot.name for slot in slots)
        raise ValueError(
            f"{caller}: expected {len(slots)} parameter tensors (for {names or 'no parameters'}), "
            f"got {len(params)}; pass one tensor per cvxpy parameter, in the order of `parameters`."
        )
    batch: int | None = None
    batch_from = ""
    first: torch.Tensor | None = None
    for value, slot in zip(params, slots):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{caller}: parameter '{slot.name}' must be a torch.Tensor, got {type(value).__name__}; "
                "convert it with torch.as_tensor(value, dtype=torch.float64)."
            )
        if not value.is_floating_point():
            raise TypeError(
                f"{caller}: parameter '{slot.name}' must have a real floating dtype, got {value.dtype}; "
                "cast it with .to(torch.float64)."
            )
        if first is None:
            first = value
        elif value.dtype != first.dtype:
            raise TypeError(
                f"{caller}: parameter '{slot.name}' has dtype {value.dtype} but '{slots[0].name}' "
                f"has {first.dtype}; cast all parameter tensors to one dtype."
            )
        elif value.device != first.device:
            raise ValueError(
                f"{caller}: parameter '{slot.name}' is on {value.device} but '{slots[0].name}' is on "
                f"{first.device}; move all parameter tensors to one device."
            )
        shape = tuple(value.shape)
        if shape == slot.shape:
            continue
        if len(shape) == len(slot.shape) + 1 and shape[1:] == slot.shape:
            if batch is not None and shape[0] != batch:
                raise ValueError(
                    f"{caller}: parameter '{slot.name}' has batch size {shape[0]} but '{batch_from}' has "
                    f"batch size {batch}; batched parameters must share one batch size "
                    "(unbatched ones are broadcast)."
                )
            batch, batch_from = shape[0], slot.name
            continue
        raise ValueError(
            f"{caller}: parameter '{slot.name}' must have shape {slot.shape} or (batch, *{slot.shape}), "
            f"got {shape}."
        )
    return batch


_TENSOR_FIELDS = ("data_index", "map_dense", "map_rows", "map_cols", "map_values")


def _name(obj) -> str:
    try:
        return obj.name()
    except Exception:  # noqa: BLE001 - names are for messages only
        return repr(obj)


def _check_lists(problem, parameters, variables):
    import cvxpy as cp

    if not isinstance(problem, cp.Problem):
        raise TypeError(f"problem must be a cvxpy.Problem, got {type(problem).__name__}.")
    for label, items, kind in (("parameters", parameters, cp.Parameter), ("variables", variables, cp.Variable)):
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"{label} must be a list or tuple of cvxpy.{kind.__name__}, got {type(items).__name__}.")
        for item in items:
            if not isinstance(item, kind):
                raise TypeError(f"{label} must contain cvxpy.{kind.__name__} objects only, got {item!r}.")
        if len({item.id for item in items}) != len(items):
            raise ValueError(f"{label} lists the same cvxpy object twice; list each one once.")
    if problem.is_mixed_integer():
        raise ValueError("problem has integer or boolean variables; only convex (continuous) problems are supported.")
    if not problem.is_dcp():
        raise ValueError(
            "problem is not DCP (disciplined convex); check problem.is_dcp() and reformulate it as a convex "
            "problem (for quad_form(x, Q) with a parameter Q, declare Q = cp.Parameter(shape, PSD=True))."
        )
    wanted = {p.id for p in problem.parameters()}
    given = {p.id for p in parameters}
    if wanted != given:
        missing = [_name(p) for p in problem.parameters() if p.id not in given]
        extra = [_name(p) for p in parameters if p.id not in wanted]
        raise ValueError(
            "parameters must list exactly the problem's parameters (problem.parameters()); "
            f"missing: {missing or 'none'}, not in the problem: {extra or 'none'}."
        )
    in_problem = {v.id for v in problem.variables()}
    for v in variables:
        if v.id not in in_problem:
            raise ValueError(
                f"variable '{_name(v)}' does not appear in the problem; request only variables of "
                "problem.variables() (constraint duals are returned by forward(..., return_solution=True))."
            )


def canonicalize(problem, parameters, variables) -> CanonicalProgram:
    r"""Canonicalize a DPP cvxpy problem once into an affine map to a cone program.

    The result evaluates, for parameter values :math:`\theta`, the data of

    .. math::

        \min_x \tfrac12 x^\top P x + q^\top x + d \quad\text{s.t.}\quad A x + s = b,\ s \in
        \{0\}^{z} \times \mathbb R_+^{l} \times \mathcal Q^{d_1} \times \dots \times \mathcal Q^{d_k},

    with :math:`(P, q, d, A, b)` affine in :math:`\theta`. Quadratic objectives stay
    quadratic (``P``) instead of being lifted to second-order cones, and ``quad_form(x, Q)``
    with a parameter ``Q`` is accepted in the objective.

    Args:
        problem: a DPP-compliant ``cvxpy.Problem``.
        parameters: every parameter of ``problem``, in the order tensors will be passed.
        variables: the variables to recover from a solution, in the order returned.

    Returns:
        A :class:`CanonicalProgram` with float64 CPU maps.

    Raises:
        TypeError: ``problem``, ``parameters`` or ``variables`` have the wrong type.
        ValueError: the problem is not DCP or not DPP, the parameter list does not match
            ``problem.parameters()``, a variable is not in the problem, or the problem needs
            cones other than zero / nonnegative / second-order (exponential, PSD, power).

    Example:
        >>> import cvxpy as cp, torch
        >>> x, c = cp.Variable(2), cp.Parameter(2)
        >>> prog = canonicalize(cp.Problem(cp.Minimize(c @ x), [x >= 0, cp.sum(x) == 1]), [c], [x])
        >>> data = prog.evaluate(torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> data.A.shape[-1] == prog.n
        True

    References:
        Agrawal et al., "Differentiable Convex Optimization Layers", NeurIPS 2019,
        arXiv:1910.12430 (DPP and the affine parameter-to-data map).
    """
    import cvxpy as cp
    from cvxpy.utilities import scopes

    _check_lists(problem, parameters, variables)
    if problem.is_dpp():
        scope = None
    elif problem.is_dpp(quad_form_dpp="qp"):
        scope = scopes.quad_form_dpp_scope  # parametric quad_form in the objective -> P(theta)
    else:
        raise ValueError(
            "problem is not DPP (problem.is_dpp() is False): parameters must enter affinely, e.g. "
            "never multiply two parameters or a parameter by a nonlinear function of a variable; "
            "introduce a new parameter for such products (https://www.cvxpy.org/tutorial/dpp/)."
        )
    if cp.CLARABEL not in cp.installed_solvers():
        raise ImportError(
            "canonicalization uses cvxpy's CLARABEL target, which is not installed; "
            "run `pip install clarabel`."
        )
    if scope is None:
        data, chain, _ = problem.get_problem_data(solver=cp.CLARABEL)
    else:
        with scope():
            data, chain, _ = problem.get_problem_data(solver=cp.CLARABEL)
    prog = data[cp.settings.PARAM_PROB]
    dims = prog.cone_dims
    unsupported = [
        label
        for label, present in (
            ("exponential", dims.exp),
            ("positive semidefinite", dims.psd),
            ("3d power", dims.p3d),
            ("n-dimensional power", dims.pnd),
        )
        if present
    ]
    if unsupported:
        raise ValueError(
            f"problem needs {' and '.join(unsupported)} cone(s), which the native conic solver does not "
            "handle (it solves zero, nonnegative and second-order cones); pass "
            "solver=dl.conic.CvxpyLayersBackend() to solve it with cvxpylayers."
        )
    if prog.lower_bounds is not None or prog.upper_bounds is not None or getattr(prog, "dir_cones", None):
        raise ValueError(
            "cvxpy kept variable bounds outside the constraints; write them as constraints "
            "(x >= lb, x <= ub) instead of Variable(bounds=...)."
        )
    cones = Cones(zero=int(dims.zero), nonneg=int(dims.nonneg), soc=tuple(int(d) for d in dims.soc))
    n, m = int(prog.x.size), int(cones.dim)
    quadratic = prog.P is not None

    param_slots, col_of = _parameter_columns(parameters, prog, chain)
    var_slots = _variable_slots(variables, prog, chain)

    # Nonzeros of the map y = M [theta; 1] in the layout [vec P; q; d; vec A; b] (row-major).
    rows, cols, vals = [], [], []
    at = 0
    if quadratic:
        P = prog.P.tocoo()
        i, j = P.row % n, P.row // n  # cvxpy flattens column-major
        rows.append(i * n + j)
        cols.append(col_of[P.col])
        vals.append(P.data)
        at = n * n
    Q = prog.q.tocoo() if hasattr(prog.q, "tocoo") else _coo(prog.q)
    rows.append(at + Q.row)
    cols.append(col_of[Q.col])
    vals.append(Q.data)
    at += n + 1
    Ab = prog.A.tocoo()
    i, j = Ab.row % m, Ab.row // m
    is_A = j < n
    # cvxpy's cone rows read A_cvx x + b_cvx in K; ours read A x + s = b, so A = -A_cvx, b = b_cvx.
    rows.append(np.where(is_A, at + i * n + j, at + m * n + i))
    cols.append(col_of[Ab.col])
    vals.append(np.where(is_A, -Ab.data, Ab.data))

    rows_np = np.concatenate(rows).astype(np.int64)
    cols_np = np.concatenate(cols).astype(np.int64)
    vals_np = np.concatenate(vals).astype(np.float64)
    keep = (cols_np >= 0) & (vals_np != 0)
    rows_np, cols_np, vals_np = rows_np[keep], cols_np[keep], vals_np[keep]
    data_index, reduced_rows = np.unique(rows_np, return_inverse=True)
    p1 = sum(slot.size for slot in param_slots) + 1
    k = int(data_index.shape[0])
    fields: dict[str, torch.Tensor | None] = {"data_index": torch.as_tensor(data_index, dtype=torch.int64)}
    if p1 * k <= max(_DENSE_MAP_MAX_ENTRIES, len(vals_np) / _DENSE_MAP_MIN_DENSITY):
        dense = np.zeros((p1, k))
        np.add.at(dense, (cols_np, reduced_rows), vals_np)
        fields["map_dense"] = torch.as_tensor(dense, dtype=torch.float64)
    else:
        fields["map_rows"] = torch.as_tensor(reduced_rows.astype(np.int64))
        fields["map_cols"] = torch.as_tensor(cols_np)
        fields["map_values"] = torch.as_tensor(vals_np, dtype=torch.float64)
    return CanonicalProgram(
        n=n,
        m=m,
        cones=cones,
        quadratic=quadratic,
        objective_sign=-1 if isinstance(problem.objective, cp.Maximize) else 1,
        parameters=tuple(param_slots),
        variables=tuple(var_slots),
        **fields,
    )


def _coo(matrix):
    import scipy.sparse as sp

    return sp.coo_array(matrix)


def _parameter_columns(parameters, prog, chain):
    """User parameter slots, and for each column of cvxpy's map its column in ``theta_bar``.

    ``theta`` holds the user's tensors flattened row-major, in the user's order; cvxpy's
    columns hold each (possibly lowered) parameter column-major, then the constant one.
    Columns of cvxpy's map that no tensor entry feeds are marked ``-1`` (none in practice).
    """
    total = int(prog.total_param_size)
    col_of = np.full(total + 1, -1, dtype=np.int64)
    param_map = {k: v for k, v in chain.compose_param_id_map().items()}
    slots = []
    start = 0
    for param in parameters:
        shape = tuple(int(d) for d in param.shape)
        slot = ParameterSlot(name=_name(param), shape=shape, start=start)
        slots.append(slot)
        lowered = param_map.get(param.id, [param.id])
        if len(lowered) != 1:
            raise ValueError(f"parameter '{slot.name}' is complex; only real parameters are supported.")
        canon_id = lowered[0]
        if canon_id in prog.param_id_to_col:
            col = int(prog.param_id_to_col[canon_id])
            canon_size = int(prog.param_id_to_size[canon_id])
            if canon_size == slot.size:
                # column-major index -> row-major index within the parameter
                cm = np.arange(slot.size).reshape(shape, order="F").ravel() if shape else np.zeros(1, np.int64)
                row_major = np.empty(slot.size, dtype=np.int64)
                row_major[cm] = np.arange(slot.size)
                col_of[col : col + canon_size] = start + row_major
            elif (
                len(shape) == 2
                and shape[0] == shape[1]
                and any(param.attributes.get(a) for a in ("symmetric", "PSD", "NSD"))
                and canon_size == shape[0] * (shape[0] + 1) // 2
            ):
                # cvxpy keeps the upper triangle, row by row; read it from the full matrix.
                r, c = np.triu_indices(shape[0])
                col_of[col : col + canon_size] = start + r * shape[0] + c
            else:
                raise ValueError(
                    f"parameter '{slot.name}' has an attribute (diag, sparsity, ...) that changes how "
                    "cvxpy stores it; declare it without that attribute, or pass "
                    "solver=dl.conic.CvxpyLayersBackend()."
                )
        start += slot.size
    col_of[total] = start  # the constant one
    return slots, col_of


def _variable_slots(variables, prog, chain):
    var_map = {k: v for k, v in chain.compose_var_id_map().items()}
    slots = []
    for var in variables:
        shape = tuple(int(d) for d in var.shape)
        lowered = var_map.get(var.id, [var.id])
        if len(lowered) != 1:
            raise ValueError(f"variable '{_name(var)}' is complex; only real variables are supported.")
        canon_id = lowered[0]
        if canon_id not in prog.var_id_to_col:
            raise ValueError(
                f"variable '{_name(var)}' was eliminated by cvxpy's canonicalization (zero-sized?); "
                "do not request it."
            )
        start = int(prog.var_id_to_col[canon_id])
        stored = int(prog.id_to_var[canon_id].size)
        size = int(np.prod(shape, dtype=np.int64))
        symmetric = False
        if stored != size:
            if len(shape) == 2 and shape[0] == shape[1] and stored == shape[0] * (shape[0] + 1) // 2:
                symmetric = True
            else:
                raise ValueError(
                    f"variable '{_name(var)}' has an attribute (diag, sparsity, ...) that changes how cvxpy "
                    "stores it; declare it without that attribute and add the structure as constraints."
                )
        slots.append(VariableSlot(name=_name(var), shape=shape, start=start, symmetric=symmetric))
    return slots
