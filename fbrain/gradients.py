"""Loss and gradients of a pure loss function, by autograd or by torch.func.

A loss function has the signature ``loss_fn(params, buffers, batch, rng)`` and
returns ``loss`` or ``(loss, aux)`` with ``aux`` a dict. Two ways compute the
same gradients bit for bit, and :func:`loss_and_grads` picks one by where it runs:

* ``torch.autograd.grad`` on detached aliases of the parameters: the fastest
  in eager mode;
* ``torch.func.grad``: what ``torch.compile`` and ``vmap`` can trace (chosen under
  either of them).

Example::

    >>> import torch
    >>> from fbrain.gradients import loss_and_grads
    >>> def loss_fn(params, buffers, batch, rng):
    ...     return (params["w"] * batch).sum() ** 2
    >>> params = {"w": torch.tensor([1.0, 2.0])}
    >>> loss, grads, aux = loss_and_grads(loss_fn, params, {}, torch.tensor([1.0, 1.0]), None, ["w"])
    >>> grads["w"]
    tensor([6., 6.])
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.func import grad as func_grad
from torch.func import vmap

from fbrain.torch_compat import in_functorch_transform
from fbrain.tree import map_tensors, tree_map

LossFn = Callable[..., Any]


def split_loss(out: Any) -> tuple[torch.Tensor, dict]:
    """``(loss, aux)`` from what a loss function returned, checking its form."""
    loss, aux = (out if isinstance(out, tuple) and len(out) == 2 else (out, {}))
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn: expected a scalar (0-dim) loss tensor, got {what}")
    if not loss.is_floating_point():
        raise TypeError(f"loss_fn: expected a floating-point loss, got dtype {loss.dtype}")
    if aux is None:
        aux = {}
    if not isinstance(aux, dict):
        raise TypeError(f"loss_fn: aux must be a dict, got {type(aux).__name__}")
    return loss, aux


def _objective(loss_fn, params, buffers, batch, rng, multiplier, context):
    """A function of the trainable parameters only: ``(loss * multiplier, (loss, aux))``."""

    def objective(trainable):
        with context():
            loss, aux = split_loss(loss_fn({**params, **trainable}, buffers, batch, rng))
        scaled = loss if multiplier is None else loss * multiplier
        return scaled, (loss.detach(), aux)

    return objective


def traced() -> bool:
    """True under torch.compile or inside a torch.func transform (vmap, grad), where gradients
    must come from ``torch.func.grad``."""
    return torch.compiler.is_compiling() or in_functorch_transform()


def loss_and_grads(
    loss_fn: LossFn,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    batch: Any,
    rng: torch.Tensor | None,
    trainable: list[str],
    multiplier: torch.Tensor | None = None,
    context=torch.enable_grad,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """``(loss, grads of loss * multiplier w.r.t. params[trainable], aux)``."""
    objective = _objective(loss_fn, params, buffers, batch, rng, multiplier, context)
    if traced():
        grads, (loss, aux) = func_grad(objective, has_aux=True)({n: params[n] for n in trainable})
        return loss, grads, aux
    # Detached aliases share storage with the state's tensors but carry their own
    # requires_grad flag, so the caller's tensors are not touched.
    leaves = {n: params[n].detach().requires_grad_() for n in trainable}
    with torch.enable_grad():
        scaled, (loss, aux) = objective(leaves)
        grads = torch.autograd.grad(scaled, list(leaves.values()), materialize_grads=True) if leaves else ()
    return loss, dict(zip(leaves, grads)), map_tensors(torch.Tensor.detach, aux)


_NO_BUFFERS = (
    "per_example=True: the model updates buffers (BatchNorm running statistics) during the loss; "
    "per-example gradients cannot update buffers: put such modules in eval mode, or use per_example=False"
)


def per_example_loss_and_grads(
    loss_fn: LossFn,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    batch: Any,
    rng: torch.Tensor | None,
    trainable: list[str],
    multiplier: torch.Tensor | None = None,
    context=torch.enable_grad,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Per-example ``(losses [B], grads {name: [B, *shape]}, aux)`` with ``vmap`` over the batch.

    Every tensor in ``batch`` is split along dim 0; ``loss_fn`` sees each
    example as a batch of one, so the same loss function serves both modes.
    """

    def one(example):
        as_batch = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, example)
        objective = _objective(loss_fn, params, buffers, as_batch, rng, multiplier, context)
        grads, (loss, aux) = func_grad(objective, has_aux=True)({n: params[n] for n in trainable})
        if "buffers" in aux:
            raise ValueError(_NO_BUFFERS)
        return loss, grads, aux

    in_dims = tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, batch)
    try:
        return vmap(one, in_dims=(in_dims,), randomness="different")(batch)
    except RuntimeError as err:
        if "updated in place" not in str(err):
            raise
        # BatchNorm in training mode writes its running statistics under vmap.
        raise ValueError(_NO_BUFFERS) from err


def per_example_grads(loss_fn: LossFn) -> Callable:
    """``f(params, buffers, batch, rng) -> (losses [B], grads {name: [B, *shape]})``.

    Example::

        losses, grads = fbrain.per_example_grads(loss_fn)(state.params, state.buffers, batch, None)
    """

    def compute(params, buffers, batch, rng=None):
        losses, grads, _ = per_example_loss_and_grads(loss_fn, params, buffers, batch, rng, list(params))
        return losses, grads

    return compute
