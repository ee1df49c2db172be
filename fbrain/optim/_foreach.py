"""Multi-tensor arithmetic for the optimizers and the step.

Each function takes lists of tensors and calls the matching ``torch._foreach_*``
kernel (one call for the whole list). Under ``vmap`` (ensembles, per-example
steps) those kernels have no batching rule, so batched inputs fall back to one
ordinary op per tensor, which vmap understands.

Example::

    >>> import torch
    >>> from fbrain.optim import _foreach as fe
    >>> fe.mul([torch.ones(2), torch.ones(3)], torch.tensor(2.0))[1]
    tensor([2., 2., 2.])
"""

from __future__ import annotations

import torch

from fbrain.optim.hyperparams import scalar
from fbrain.torch_compat import in_functorch_transform, is_batched

_is_batched = is_batched


def any_batched(*args) -> bool:
    if torch.compiler.is_compiling():
        return False  # compiled code never sees functorch's batched wrappers directly
    if not in_functorch_transform():
        return False  # batched tensors exist only inside vmap: no look at each tensor
    for a in args:
        if isinstance(a, torch.Tensor) and _is_batched(a):
            return True
        if isinstance(a, (list, tuple)) and any(_is_batched(t) for t in a):
            return True
    return False


def _pairs(a, b):
    return zip(a, b) if isinstance(b, (list, tuple)) else ((x, b) for x in a)


def _scalar_operand(a, b):
    """``b`` as torch.compile traces it best: a 0-dim tensor operand becomes a list of it.

    Dynamo (torch 2.11) reads a tensor scalar given to ``_foreach_add`` on the host, which breaks
    the graph unless ``fullgraph=True``; the list form traces whole. Eagerly the tensor overload
    stays (on CUDA its fused kernel needs no host read either).
    """
    if torch.compiler.is_compiling() and isinstance(b, torch.Tensor):
        return [b] * len(a)
    return b


def _binary(name: str):
    multi, single = getattr(torch, f"_foreach_{name}"), getattr(torch, name)

    def op(a, b):
        return [single(x, y) for x, y in _pairs(a, b)] if any_batched(a, b) else multi(a, _scalar_operand(a, b))

    op.__name__ = name
    return op


def _binary_inplace(name: str):
    multi = getattr(torch, f"_foreach_{name}_")

    def op(a, b):
        if any_batched(a, b):
            for x, y in _pairs(a, b):
                getattr(x, f"{name}_")(y)
        else:
            multi(a, _scalar_operand(a, b))
        return a

    op.__name__ = f"{name}_"
    return op


def _unary(name: str):
    multi, single = getattr(torch, f"_foreach_{name}"), getattr(torch, name)

    def op(a):
        return [single(x) for x in a] if any_batched(a) else multi(a)

    op.__name__ = name
    return op


add, sub, mul, div, maximum = (_binary(n) for n in ("add", "sub", "mul", "div", "maximum"))
add_, mul_, div_ = (_binary_inplace(n) for n in ("add", "mul", "div"))
sqrt, neg = _unary("sqrt"), _unary("neg")


def _per_tensor(*args) -> bool:
    # The foreach kernels' scalar-tensor overloads trace poorly (compile) or not at all (vmap):
    # there, one ordinary op per tensor (which inductor fuses anyway).
    return torch.compiler.is_compiling() or any_batched(*args)


def addcmul(a: list[torch.Tensor], b: list[torch.Tensor], c) -> list[torch.Tensor]:
    """``a + b * c`` with torch's ``addcmul`` rounding (one rounding of the multiply-add on the CPU:
    what torch.optim's ``add(param, alpha=wd)`` and ``addcmul_`` compute). ``c``: a list, a 0-dim
    tensor, or a Python number (then it is torch.optim's own ``add(b, alpha=c)``)."""
    if isinstance(c, (int, float)):
        if any_batched(a, b):
            return [torch.add(x, y, alpha=c) for x, y in zip(a, b)]
        return list(torch._foreach_add(a, b, alpha=c))
    cs = c if isinstance(c, (list, tuple)) else [c] * len(a)
    if _per_tensor(a, b, cs):
        return [torch.addcmul(x, y, z) for x, y, z in zip(a, b, cs)]
    return list(torch._foreach_addcmul(a, b, cs))


def lerp(a: list[torch.Tensor], b: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    """``a + weight * (b - a)`` as torch's ``lerp`` rounds it (a fused multiply-add on the CPU)."""
    if _per_tensor(a, b, weight):
        return [torch.lerp(x, y, weight) for x, y in zip(a, b)]
    return list(torch._foreach_lerp(a, b, weight))


def norm(a: list[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each tensor."""
    return [torch.linalg.vector_norm(x) for x in a] if any_batched(a) else list(torch._foreach_norm(a))


def ordered(tree: dict[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of a flat dict, in one fixed order for the multi-tensor kernels."""
    names = list(tree)
    return names, [tree[n] for n in names]


def decayed_gradients(grads, names, params, weight_decay, maximize):
    """``(-)grads + weight_decay * params``: torch.optim's coupled (L2) weight decay."""
    if maximize:
        grads = neg(grads)
    if weight_decay is not None:
        if params is None:
            raise ValueError("weight_decay needs the parameters: call update(grads, state, params)")
        # torch.optim: grad.add(param, alpha=weight_decay), one rounding (as addcmul's).
        grads = addcmul(grads, [params[n] for n in names], scalar(weight_decay, grads))
    return grads
