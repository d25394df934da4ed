"""The host reads of difflayers, and what replaces them while ``torch.compile`` traces.

Eager code reads a boolean from the device in three kinds of places: a convergence
check (the driver, every ``check_every`` steps), a validation of the data at a public
boundary (NaN/Inf, negative weights), and a guard that skips rare work which is masked
by ``torch.where`` anyway (certificates of infeasibility, a fallback factorization).
A traced graph cannot branch on data, so while ``torch.compile`` traces:

* a convergence check reads nothing when the whole budget is one block
  (``check_every >= max_steps``, see ``iterate``);
* ``check_all`` turns a validation into ``torch._assert_async``: the same condition,
  checked on the device without a host read (a ``RuntimeError`` carrying the same
  message; on CUDA a device-side assertion);
* ``host_any`` answers ``True``: the guarded work runs for every sample, and changes
  nothing where the mask is ``False``, so the result is the eager one.

Eager behaviour is unchanged by all three.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["compiling", "check_all", "host_any"]


def compiling() -> bool:
    """Whether ``torch.compile`` (Dynamo) is tracing the calling code."""
    return torch.compiler.is_compiling()


def check_all(condition: torch.Tensor, error: Callable[[list[int] | None], Exception]) -> None:
    """Raise ``error(failed)`` unless every entry of the bool tensor ``condition`` holds.

    Eager: one host read; on failure ``failed`` lists the indices (along the first
    dimension) where ``condition`` does not hold everywhere, for the message. Traced:
    ``torch._assert_async`` with the message of ``error(None)``, so that the graph
    stays whole and the data is still checked.
    """
    if compiling():
        torch._assert_async(condition.all(), str(error(None)))
        return
    ok = condition.flatten(1).all(1) if condition.dim() > 1 else condition.reshape(-1)
    if not bool(ok.all()):
        raise error((~ok).nonzero().flatten().tolist())


def host_any(mask: torch.Tensor) -> bool:
    """``bool(mask.any())`` eagerly (one host read); ``True`` while traced.

    For guards of work whose effect is masked by ``mask`` (``torch.where``): skipping
    it where no entry is set saves time eagerly, running it changes nothing.
    """
    return True if compiling() else bool(mask.any())
