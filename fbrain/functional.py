"""Run an ``nn.Module`` as a pure function of (params, buffers, inputs).

``torch.func.functional_call`` swaps tensors into a module for one call, but a
module in training mode still updates its buffers in place (BatchNorm's
running statistics). :func:`apply_module` hands the module private copies of
the buffers and returns those copies as the new buffers, so the caller's
tensors are never written.

Example::

    >>> import torch
    >>> from fbrain.functional import apply_module
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> params = {k: v.detach() for k, v in bn.named_parameters()}
    >>> buffers = {k: v.detach() for k, v in bn.named_buffers()}
    >>> out, new_buffers = apply_module(bn, params, buffers, torch.randn(8, 2) + 3)
    >>> bool(buffers["running_mean"].eq(0).all()), bool(new_buffers["running_mean"].ne(0).all())
    (True, True)
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

import torch

from fbrain.torch_compat import reparametrize_module  # what functional_call itself uses


class _Slots:
    """Where a module keeps each of its tensors, found once and reused for every swap.

    ``torch.func.functional_call`` walks the module tree, unties shared tensors and checks names on
    every call: over 100 microseconds for a three-layer MLP, a tenth of a small model's training
    step. The walk's result only changes when the module's structure does, so it is kept here with
    a snapshot of the tree (every ``_parameters``, ``_buffers`` and ``_modules`` entry, by
    identity) that is checked before each use, and rebuilt when anything was reassigned.
    """

    def __init__(self, module: torch.nn.Module):
        # One entry per place a tensor sits, aliases (tied weights, shared submodules) included:
        # (the owning dict, the key in it, the canonical name: the first name the tensor has in
        # named_parameters()/named_buffers() order, which is the name a state uses).
        self.places: list[tuple[dict, str, str]] = []
        self.snapshot: list[tuple[dict, tuple]] = []
        canonical: dict[int, str] = {}
        visited: set[tuple[int, str]] = set()  # a shared submodule's dicts are one place, whatever its names
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for owner in (sub._parameters, sub._buffers):
                for key, tensor in owner.items():
                    if tensor is None:
                        continue
                    canonical.setdefault(id(tensor), f"{prefix}.{key}" if prefix else key)
                    if (id(owner), key) not in visited:
                        visited.add((id(owner), key))
                        self.places.append((owner, key, canonical[id(tensor)]))
        seen: set[int] = set()
        for sub in module.modules():
            for owner in (sub._parameters, sub._buffers, sub._modules):
                if id(owner) not in seen:
                    seen.add(id(owner))
                    self.snapshot.append((owner, tuple(owner.items())))
        self.names = frozenset(canonical.values())  # what a dict of tensors for this module must name
        self.active = 0  # swaps in progress

    def still_valid(self) -> bool:
        return all(len(owner) == len(items) and all(owner.get(k) is v for k, v in items)
                   for owner, items in self.snapshot)


_SLOTS: "weakref.WeakKeyDictionary[torch.nn.Module, _Slots]" = weakref.WeakKeyDictionary()


def _slots_of(module: torch.nn.Module) -> _Slots:
    slots = _SLOTS.get(module)
    if slots is None or not slots.still_valid():
        slots = _SLOTS[module] = _Slots(module)
    return slots


@contextlib.contextmanager
def swapped(module: torch.nn.Module, tensors: dict[str, torch.Tensor], strict: bool = True) -> Iterator[None]:
    """Run a block with ``module``'s parameters and buffers replaced by ``tensors`` (by name).

    Semantics of ``torch.func.functional_call(..., tie_weights=True)``: tied weights follow their
    canonical name (the first one ``named_parameters()`` gives); on leaving, the module gets its own
    tensors back, and a buffer the block reassigned (``self.count = ...`` rather than an in-place
    update) is written back into ``tensors``. Stricter in one way: ``tensors`` may only use
    canonical names (an alias of a tied weight, or an unknown name, is an error); ``strict``
    also requires every name. Under ``torch.compile``, and for a swap nested inside another swap
    of the same module, torch's own reparametrisation does the work.

    Example::

        with swapped(model, {**params, **buffers}):
            out = model(x)
    """
    # Dynamo cannot trace the cache (a WeakKeyDictionary): test for compiling before touching it.
    if torch.compiler.is_compiling() or getattr(_SLOTS.get(module), "active", 0):
        # Nested: the module holds the outer swap's tensors, so its structure cannot be re-read.
        with reparametrize_module(module, tensors, tie_weights=True, strict=strict):
            yield
        return
    slots = _slots_of(module)
    if tensors.keys() != slots.names:
        unexpected = sorted(tensors.keys() - slots.names)
        missing = sorted(slots.names - tensors.keys()) if strict else []
        if unexpected or missing:
            raise KeyError(f"tensors for {type(module).__name__}: unexpected {unexpected}, missing {missing}")
    originals = [owner[key] for owner, key, _ in slots.places]
    given = [tensors.get(name) for _, _, name in slots.places]
    slots.active += 1
    try:
        for (owner, key, _), tensor in zip(slots.places, given):
            if tensor is not None:
                owner[key] = tensor
        yield
    finally:
        slots.active -= 1
        for (owner, key, name), original, tensor in zip(slots.places, originals, given):
            current = owner.get(key)  # None if the block deleted it
            owner[key] = original
            if tensor is not None and current is not tensor:  # reassigned inside the block
                tensors[name] = current


def check_names_and_shapes(module: torch.nn.Module, params: dict, buffers: dict) -> None:
    """Raise a precise error when ``params``/``buffers`` do not fit ``module``."""
    for kind, given, expected in (
        ("params", params, dict(module.named_parameters())),
        ("buffers", buffers, dict(module.named_buffers())),
    ):
        if given.keys() != expected.keys():
            missing = sorted(expected.keys() - given.keys())
            extra = sorted(given.keys() - expected.keys())
            raise KeyError(
                f"{kind}: names do not match the module {type(module).__name__}: "
                f"missing {missing}, unexpected {extra}"
            )
        for name, tensor in given.items():
            want = expected[name].shape
            if tensor.shape != want:
                raise ValueError(
                    f"{kind}[{name!r}]: expected shape {tuple(want)} (the module's), got {tuple(tensor.shape)}"
                )


def call_with(
    module: torch.nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    fn: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(fn(module, *args, **kwargs), new_buffers)`` with ``module``'s tensors swapped for the given ones.

    Like :func:`apply_module`, for code that uses a module in more ways than one forward call
    (several submodules, helper methods)::

        loss, new_buffers = call_with(model, params, buffers, lambda m, x, y: mse(m(x), m.post(y)), x, y)
    """
    check_names_and_shapes(module, params, buffers)
    return _call(module, params, buffers, fn, args, kwargs)


def _call(module, params, buffers, fn, args, kwargs):
    # BatchNorm updates its running statistics in place: the module gets private copies of the
    # buffers, which come back as the new buffers.
    tensors = {**params, **{name: b.clone() for name, b in buffers.items()}}
    with swapped(module, tensors):
        out = fn(module, *args, **kwargs)
    return out, {name: tensors[name] for name in buffers}


def apply_module(
    module: torch.nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    *args: Any,
    check: bool = True,
    **kwargs: Any,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(module(*args, **kwargs), new_buffers)`` computed with the given tensors.

    ``check`` verifies names and shapes first (cheap; turn off in a hot loop
    once the state is known to fit).
    """
    if check:
        check_names_and_shapes(module, params, buffers)
    return _call(module, params, buffers, torch.nn.Module.__call__, args, kwargs)
