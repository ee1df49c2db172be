"""Batches as a step sees them: micro-batches for accumulation, and the layout a step checks.

With ``accumulation=k`` a train step takes ``k`` micro-batches: tensors stacked along a leading
axis of size ``k`` (:func:`stack_micro_batches`), or a :class:`MicroBatches` that keeps them apart
(padded batches of different lengths). :func:`structure` is what must stay the same from one batch
to the next for a step (where the tensors are, not their sizes).

Example::

    >>> import torch, fbrain
    >>> stacked = fbrain.stack_micro_batches([(torch.ones(2), 0), (torch.zeros(2), 0)])
    >>> [mb[0].tolist() for mb in fbrain.micro_batches(stacked, 2)]
    [[1.0, 1.0], [0.0, 0.0]]
"""

from __future__ import annotations

from typing import Any

import torch

from fbrain.torch_compat import flatten_one_level, register_pytree_node
from fbrain.tree import tree_leaves, tree_map


class MicroBatches:
    """``k`` micro-batches kept apart, for ``accumulation=k`` when they cannot be stacked
    (padded batches of different lengths). A pytree node, so steps see the tensors inside.

    Example::

        step = fbrain.make_train_step(loss_fn, opt, accumulation=2)
        state, metrics = step(state, fbrain.MicroBatches([batch_a, batch_b]))
    """

    def __init__(self, batches):
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("MicroBatches: expected at least one batch")

    def __len__(self) -> int:
        return len(self.batches)

    def __repr__(self) -> str:
        return f"MicroBatches({len(self.batches)} batches)"


register_pytree_node(MicroBatches, lambda m: (m.batches, None), lambda children, _: MicroBatches(children),
                     "fbrain.MicroBatches")


def micro_batches(batch: Any, count: int) -> list[Any]:
    """The ``count`` micro-batches of ``batch``: a :class:`MicroBatches`, or tensors stacked along
    a leading axis of size ``count`` (split here)."""
    if isinstance(batch, MicroBatches):
        if len(batch) != count:
            raise ValueError(f"batch: accumulation={count} expects {count} micro-batches, got {len(batch)}")
        return batch.batches
    if count == 1:
        return [batch]
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and (leaf.ndim == 0 or leaf.shape[0] != count):
            raise ValueError(
                f"batch: accumulation={count} expects every tensor to have a leading micro-batch "
                f"axis of size {count}, got a tensor of shape {tuple(leaf.shape)} "
                "(build one with fbrain.stack_micro_batches, or pass fbrain.MicroBatches([...]))"
            )
    return [tree_map(lambda x, i=i: x[i] if isinstance(x, torch.Tensor) else x, batch) for i in range(count)]


def stack_micro_batches(batches: list[Any]) -> Any:
    """Stack ``k`` batches of one structure into the batch ``accumulation=k`` expects."""
    if not batches:
        raise ValueError("stack_micro_batches: expected at least one batch")
    return tree_map(
        lambda *xs: torch.stack(xs) if isinstance(xs[0], torch.Tensor) else xs[0], *batches
    )


def structure(batch: Any) -> Any:
    """What must stay the same from one batch to the next: where the tensors are.

    Sizes do not count, nor do plain values (a shorter last batch has fewer ids): a sequence
    holding no tensor is one opaque value.
    """
    if isinstance(batch, torch.Tensor):
        return "tensor"
    node = flatten_one_level(batch)
    if node is None:
        return None
    kind, children = node
    inner = tuple(structure(c) for c in children)
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields") and all(s is None for s in inner):
        return None
    keys = tuple(batch) if isinstance(batch, dict) else None
    return (kind, keys, inner)
