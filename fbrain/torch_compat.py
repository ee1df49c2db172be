"""Every private torch API fbrain uses, in one place, with what happens where a torch lacks it.

fbrain supports torch from 2.11 up to (not including) 3.0; CI runs the tests on two releases of that
range (tests/test_torch_compat.py checks each entry below on the torch it runs with). When a torch
release moves one of these, this file is the only one to change.

- ``pytree``: ``torch.utils._pytree`` (tree_map, key paths, node registration). Needed: fbrain's
  trees are pytrees. Registration goes through :func:`register_pytree_node`.
- :func:`fused_kernel`: ATen's fused CPU optimizer kernels (``torch._fused_adam_`` ...). Missing:
  None, and the optimizers use their multi-tensor arithmetic (same results to rounding).
- ``COMPILE_FAILURES``: dynamo's exceptions for a step it cannot capture. Missing names are left
  out of the tuple.
- :func:`in_functorch_transform` / :func:`is_batched`: whether code runs inside ``torch.func``'s
  vmap or grad, and whether a tensor is a vmap-batched one.
- ``funcol``: ``torch.distributed._functional_collectives`` (all_reduce that returns a new tensor and
  traces under torch.compile).
- ``reparametrize_module``: ``torch.nn.utils.stateless._reparametrize_module``, the context manager
  ``torch.func.functional_call`` runs in (a module's tensors swapped for given ones; traces under
  torch.compile). :func:`fbrain.functional.swapped` uses it under torch.compile and for nested swaps.
- :func:`jit_profiling` / :func:`set_jit_profiling`: TorchScript's profiling executor and mode
  (``torch._C._jit_set_profiling_*``), which importing SpeechBrain turns off; fbrain puts them back.
  Missing: None, and nothing to put back.

Example::

    >>> from fbrain import torch_compat
    >>> torch_compat.fused_kernel("_fused_sgd_") is not None
    True
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed._functional_collectives as funcol  # noqa: F401 - re-exported
import torch.utils._pytree as pytree
from torch.nn.utils import stateless as _stateless

SUPPORTED = ">=2.11,<3"  # the range pyproject.toml declares

GetAttrKey, MappingKey, SequenceKey = pytree.GetAttrKey, pytree.MappingKey, pytree.SequenceKey


def register_pytree_node(cls: type, flatten: Callable, unflatten: Callable, name: str,
                         flatten_with_keys: Callable | None = None) -> None:
    """Make ``cls`` a pytree node named ``name`` (its serialized type name). Without
    ``flatten_with_keys``, its children's key paths are their positions (``[0]``, ``[1]`` ...), so
    key-path functions (``tree_flatten_with_path``) work on every fbrain type."""
    if flatten_with_keys is None:
        def flatten_with_keys(obj):
            children, context = flatten(obj)
            return [(SequenceKey(i), child) for i, child in enumerate(children)], context
    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=name,
                                flatten_with_keys_fn=flatten_with_keys)


def flatten_one_level(obj: Any) -> tuple[str, list] | None:
    """``(kind, children)`` of a registered pytree node (a dict, list, tuple, named tuple, fbrain's
    types ...; every named tuple is of the kind ``"namedtuple"``), or None when ``obj`` is a leaf."""
    node = pytree._get_node_type(obj)
    if node not in pytree.SUPPORTED_NODES:
        return None
    children, _ = pytree.SUPPORTED_NODES[node].flatten_fn(obj)
    return node.__qualname__, list(children)


def fused_kernel(name: str) -> Callable | None:
    """``torch.<name>`` (e.g. ``_fused_adam_``), or None in a torch without it."""
    return getattr(torch, name, None)


def _dynamo_exceptions() -> tuple[type, ...]:
    try:
        import torch._dynamo.exc as exc
    except ImportError:  # a torch without dynamo: nothing to catch
        return ()
    # FailOnRecompileLimitHit (out of recompiles) is not a TorchDynamoException.
    names = ("TorchDynamoException", "FailOnRecompileLimitHit")
    return tuple(getattr(exc, n) for n in names if isinstance(getattr(exc, n, None), type))


COMPILE_FAILURES = _dynamo_exceptions()

# ``with reparametrize_module(module, tensors, tie_weights=True, strict=False):`` the module holds
# ``tensors`` (by name) inside the block and its own afterwards. functional_call is this plus
# argument handling; fbrain needs the context manager itself (a block, not one call), which torch
# keeps private. The name, not a wrapper, so torch.compile sees torch's own function.
reparametrize_module = _stateless._reparametrize_module


def jit_profiling() -> tuple[bool, bool] | None:
    """TorchScript's global switches ``(profiling executor, profiling mode)``, or None in a torch
    without them. torch has only their setters, which return the old value: each is read by setting
    it and setting it back."""
    setters = (getattr(torch._C, "_jit_set_profiling_executor", None),
               getattr(torch._C, "_jit_set_profiling_mode", None))
    if not all(callable(s) for s in setters):
        return None
    state = []
    for setter in setters:
        old = setter(True)
        setter(old)
        state.append(bool(old))
    return state[0], state[1]


def set_jit_profiling(state: tuple[bool, bool]) -> None:
    """Set what :func:`jit_profiling` read."""
    torch._C._jit_set_profiling_executor(state[0])
    torch._C._jit_set_profiling_mode(state[1])


def in_functorch_transform() -> bool:
    """True inside a ``torch.func`` transform (vmap, grad ...)."""
    return torch._C._functorch.maybe_current_level() is not None


def is_batched(tensor: torch.Tensor) -> bool:
    """True for a tensor that vmap batched (a per-example view inside a vmapped function)."""
    return torch._C._functorch.is_batchedtensor(tensor)
