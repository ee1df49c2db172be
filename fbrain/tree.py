"""Small pytree helpers on top of ``torch.utils._pytree``.

Everything fbrain passes around (a :class:`~fbrain.TrainState`, an optimizer
state, a batch) is a pytree: nested dicts, lists, tuples, named tuples and
registered dataclasses whose leaves are tensors or plain Python values.

Example::

    >>> import torch
    >>> from fbrain import tree
    >>> tree.select(torch.tensor(False), {"w": torch.ones(2)}, {"w": torch.zeros(2)})
    {'w': tensor([0., 0.])}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from fbrain.torch_compat import GetAttrKey, MappingKey, SequenceKey, pytree, register_pytree_node

tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves
tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_structure = pytree.tree_structure


def register_dataclass(cls: type) -> type:
    """Register a dataclass as a pytree node whose children are all its fields.

    Used as a class decorator. Fields are flattened in declaration order, so
    ``tree_map`` over an instance returns an instance of the same class.
    """
    names = tuple(f.name for f in dataclasses.fields(cls))

    def flatten(obj):
        return [getattr(obj, n) for n in names], None

    def unflatten(children, _context):
        return cls(**dict(zip(names, children)))

    def flatten_with_keys(obj):
        return [(GetAttrKey(n), getattr(obj, n)) for n in names], None

    register_pytree_node(cls, flatten, unflatten, f"{cls.__module__}.{cls.__qualname__}", flatten_with_keys)
    return cls


def select(pred: torch.Tensor, on_true: Any, on_false: Any) -> Any:
    """Leaf-wise ``torch.where(pred, a, b)`` over two trees of the same structure.

    ``pred`` is a 0-dim boolean tensor; the choice is made on the device, so no
    host synchronisation happens. A leaf that is the same object in both trees
    is kept without a copy; non-tensor leaves must be equal in both trees.
    """
    if type(on_true) is dict and type(on_false) is dict and on_true.keys() == on_false.keys():
        # The common case (params, buffers): a flat dict, without the pytree machinery.
        if all(isinstance(v, torch.Tensor) for v in on_true.values()):
            return {k: v if v is on_false[k] else torch.where(pred, v, on_false[k]) for k, v in on_true.items()}
    true_leaves, spec = tree_flatten(on_true)
    false_leaves = tree_leaves(on_false)
    if len(true_leaves) != len(false_leaves):
        raise ValueError(f"select: trees differ ({len(true_leaves)} vs {len(false_leaves)} leaves)")

    def pick(a, b):
        if a is b:
            return a
        if isinstance(a, torch.Tensor):
            return torch.where(pred, a, b)
        if a != b:
            raise ValueError(f"select: non-tensor leaves differ ({a!r} vs {b!r})")
        return a

    return tree_unflatten([pick(a, b) for a, b in zip(true_leaves, false_leaves)], spec)


def device_of(tree: dict[str, torch.Tensor]) -> torch.device:
    """The device of the first tensor of a flat dict such as ``state.params`` (the CPU if it is empty)."""
    for value in tree.values():
        return value.device
    return torch.device("cpu")


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf, leaving other leaves as they are.

    Plain dicts, lists and tuples (what a step's metrics and outputs mostly are) are walked here,
    at a tenth of the pytree machinery's cost per step; other containers go to torch's pytree."""
    kind = type(tree)
    if kind is dict:
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    if kind is list or kind is tuple:
        return kind(map_tensors(fn, v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if tree is None or kind in (bool, int, float, str):
        return tree
    return tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, tree)


def path_str(path) -> str:
    """Render a pytree key path the way users write it: ``opt_state.mu['fc.weight']``."""
    out = ""
    for key in path:
        if isinstance(key, GetAttrKey):
            out += f".{key.name}"
        elif isinstance(key, MappingKey):
            out += f"[{key.key!r}]"
        elif isinstance(key, SequenceKey):
            out += f"[{key.idx}]"
        else:
            out += str(key)
    return out.lstrip(".")
