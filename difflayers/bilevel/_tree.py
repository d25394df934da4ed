"""Inner variables and hyperparameters as flat batched vectors.

``w`` and ``lam`` are a tensor or a ``dict`` of tensors (the parameters of an
``nn.Module``, for use with ``torch.func.functional_call``). The solvers of
``difflayers.solvers`` work on flat ``[B, n]`` iterates; a ``Layout`` records how a
tree maps to such a vector and back. Unbatched trees are one problem (``B = 1``);
batched trees carry ``B`` independent problems along the leading dimension of every
leaf.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Union

import torch

__all__ = ["Tree", "Layout", "leaves", "map_tree", "detach_tree"]

Tree = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def leaves(tree: Tree) -> list[torch.Tensor]:
    """The tensors of a tree, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [tree[k] for k in tree]


def map_tree(fn, tree: Tree) -> Tree:
    """Apply ``fn`` to every tensor of a tree, keeping its structure."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    return {k: fn(v) for k, v in tree.items()}


def detach_tree(tree: Tree) -> Tree:
    return map_tree(torch.Tensor.detach, tree)


def check_tree(name: str, tree, what: str) -> None:
    """Raise a clear error unless ``tree`` is a tensor or a dict of floating-point tensors."""
    if isinstance(tree, torch.Tensor):
        items = [(name, tree)]
    elif isinstance(tree, Mapping):
        if not tree:
            raise ValueError(f"hypergradient: {name} is an empty dict; it must hold at least one tensor ({what}).")
        items = []
        for k, v in tree.items():
            if not isinstance(k, str):
                raise TypeError(f"hypergradient: the keys of {name} must be strings; got {k!r}.")
            items.append((f"{name}[{k!r}]", v))
    else:
        raise TypeError(
            f"hypergradient: {name} must be a tensor or a dict of tensors ({what}); got {type(tree).__name__}. "
            "For an nn.Module pass {k: p.detach() for k, p in module.named_parameters()} and evaluate the "
            "module with torch.func.functional_call."
        )
    for label, v in items:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"hypergradient: {label} must be a tensor; got {type(v).__name__}.")
        if not v.is_floating_point():
            raise TypeError(
                f"hypergradient: {label} must be a real floating-point tensor; got dtype {v.dtype}. "
                f"Convert it, e.g. {label}.double()."
            )


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tree is laid out in a flat ``[B, n]`` vector.

    Attributes:
        keys: the dict keys in order, or ``None`` for a bare tensor.
        shapes: the per-problem (event) shape of each leaf.
        batch: the number of problems ``B``.
        batched: whether the leaves carry the batch as their leading dimension.
    """

    keys: tuple[str, ...] | None
    shapes: tuple[tuple[int, ...], ...]
    batch: int
    batched: bool

    @staticmethod
    def of(tree: Tree, batched: bool, name: str) -> Layout:
        items = leaves(tree)
        keys = None if isinstance(tree, torch.Tensor) else tuple(tree.keys())
        if batched:
            for i, t in enumerate(items):
                if t.dim() == 0:
                    label = name if keys is None else f"{name}[{keys[i]!r}]"
                    raise ValueError(
                        f"hypergradient: with batched=True every tensor of {name} needs a leading batch dimension; "
                        f"{label} is 0-dim. Pass batched=False for a single problem."
                    )
            sizes = {t.shape[0] for t in items}
            if len(sizes) != 1:
                raise ValueError(
                    f"hypergradient: with batched=True every tensor of {name} must have the same leading (batch) "
                    f"size; got {sorted(sizes)}."
                )
            batch = sizes.pop()
            shapes = tuple(tuple(t.shape[1:]) for t in items)
        else:
            batch = 1
            shapes = tuple(tuple(t.shape) for t in items)
        return Layout(keys, shapes, batch, batched)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def size(self) -> int:
        """Number of scalars per problem, ``n``."""
        return sum(self.sizes)

    def flatten(self, tree: Tree) -> torch.Tensor:
        """The tree as a ``[B, n]`` tensor."""
        # explicit sizes: reshape(B, -1) is ambiguous for an empty batch
        parts = [t.reshape(self.batch, size) for t, size in zip(leaves(tree), self.sizes)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def unflatten(self, x: torch.Tensor) -> Tree:
        """The ``[B, n]`` tensor ``x`` as a tree of this layout."""
        parts = torch.split(x, self.sizes, dim=1) if len(self.sizes) > 1 else (x,)
        lead = (x.shape[0],) if self.batched else ()
        if not self.batched and x.shape[0] != 1:
            raise ValueError(f"internal: unbatched layout got a batch of {x.shape[0]}")
        out = [p.reshape(lead + s) for p, s in zip(parts, self.shapes)]
        if self.keys is None:
            return out[0]
        return dict(zip(self.keys, out))

    def from_leaves(self, values) -> Tree:
        values = list(values)
        return values[0] if self.keys is None else dict(zip(self.keys, values))
