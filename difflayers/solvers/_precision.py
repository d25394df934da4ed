"""The floating-point type a solve computes in, and the casts at the public boundary.

One policy for every entry point of difflayers:

* float64 and float32 inputs are solved in their own dtype;
* floating types narrower than 32 bits (``float16``, ``bfloat16``) are cast to
  float32, the *compute dtype*, at the public boundary; the solve, its tolerances
  (``default_tolerances(float32)``) and its backward pass run in float32, and the
  outputs are cast back to the input dtype. The casts are ordinary autograd
  operations (``Tensor.to``), so gradients reach 16-bit inputs in their own dtype;
* integer, bool and complex inputs are rejected with a ``TypeError``;
* ``torch.autocast`` is turned off inside a solve (``without_autocast``): autocast would
  run the matrix products of the iterations in 16 bits whatever the inputs' dtype.

Sixteen-bit arithmetic cannot run these solvers: a residual evaluated in bfloat16
carries a relative rounding error of ``2^-8``, so a stopping test tighter than that
never passes, and the factorizations (LU, Cholesky) are not implemented for 16-bit
types on every device. Rounding the *result* to 16 bits keeps the accuracy the
caller's dtype can hold.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

__all__ = ["compute_dtype", "to_compute", "to_output", "common_dtype", "explain_upcast", "without_autocast"]

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype difflayers solves in for inputs of ``dtype``.

    float64 -> float64, float32 -> float32, any narrower floating type (float16,
    bfloat16) -> float32.

    Raises:
        TypeError: ``dtype`` is not a real floating-point type.

    Example:
        >>> compute_dtype(torch.bfloat16)
        torch.float32
    """
    if not dtype.is_floating_point:
        raise TypeError(f"expected a real floating-point dtype (float64, float32, float16, bfloat16); got {dtype}.")
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def to_compute(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` cast to its compute dtype (differentiable); ``None`` and non-floating
    tensors (indices, masks) pass through unchanged."""
    if t is None or not t.is_floating_point():
        return t
    dtype = compute_dtype(t.dtype)
    return t if t.dtype == dtype else t.to(dtype)


def to_output(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A floating-point result ``t`` cast back to the caller's ``dtype`` (differentiable);
    ``None`` and non-floating tensors (statuses, counts) pass through unchanged."""
    if t is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)


def common_dtype(name: str, tensors: dict[str, torch.Tensor | None]) -> torch.dtype:
    """The one floating dtype shared by ``tensors`` (``None`` entries skipped).

    Raises:
        TypeError: an entry is not a floating-point tensor, or two entries differ in
            dtype (mixed precision would silently change the result's dtype).
    """
    first = None
    for label, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor; got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {label} must be a real floating-point tensor; got dtype {t.dtype}.")
        if first is None:
            first = (label, t.dtype)
        elif t.dtype != first[1]:
            raise TypeError(
                f"{name}: {label} has dtype {t.dtype} but {first[0]} has {first[1]}; pass every tensor with one "
                f"dtype, e.g. {label}.to({first[1]})."
            )
    if first is None:
        raise TypeError(f"{name}: expected at least one floating-point tensor.")
    return first[1]


def explain_upcast(name: str, what: str, fn: Callable, dtype: torch.dtype) -> Callable:
    """``fn`` itself for float32/float64 callers. For 16-bit callers, ``fn`` with a dtype
    error it raises on compute-dtype tensors restated with its cause and fix: a 16-bit
    tensor captured by the user's function meets the float32 iterates in a matrix
    product (elementwise operations promote, matrix products do not)."""
    compute = compute_dtype(dtype)
    if compute == dtype:
        return fn

    @functools.wraps(fn)
    def evaluated(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as error:
            if "dtype" not in str(error) and "scalar type" not in str(error):
                raise
            raise TypeError(
                f"{name}: {what} failed on {compute} tensors: {error}. {dtype} inputs are solved in {compute}, so "
                f"{what} receives {compute} tensors; pass the {dtype} tensors it uses as explicit arguments, or "
                f"capture them cast with .to({compute})."
            ) from error

    return evaluated


def _autocast_on() -> list[str]:
    on = []
    for device in _AUTOCAST_DEVICES:
        try:
            if torch.is_autocast_enabled(device):
                on.append(device)
        except RuntimeError:  # a device type this build does not know
            pass
    return on


def without_autocast(fn: Callable) -> Callable:
    """``fn`` run with ``torch.autocast`` turned off (a decorator for entry points).

    Under ``torch.autocast(dtype=torch.bfloat16)`` every matrix product of a solve would
    run in bfloat16, whatever the inputs' dtype: residuals then carry a relative error
    of ``2^-8`` and iterations stopping at float32 tolerances never converge. The solve
    runs in its compute dtype instead; the rest of the model keeps autocast.
    """

    @functools.wraps(fn)
    def solve(*args, **kwargs):
        on = _autocast_on()
        if not on:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in on:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return solve
