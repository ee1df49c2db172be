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

from typing import Any, Callable

import torch
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module  # what functional_call itself uses


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
    private = {name: b.clone() for name, b in buffers.items()}
    with _reparametrize_module(module, {**params, **private}, tie_weights=True, strict=True):
        out = fn(module, *args, **kwargs)
    return out, private


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
    private = {name: b.clone() for name, b in buffers.items()}
    # strict=True: a tensor the module has but the dicts lack must be an error, not a silent fallback
    # to the module's own (possibly stale) tensor.
    out = functional_call(module, (params, private), args, kwargs, tie_weights=True, strict=True)
    return out, private
