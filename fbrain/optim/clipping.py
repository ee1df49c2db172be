"""Gradient clipping by global norm, with ``torch.nn.utils.clip_grad_norm_``'s arithmetic.

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> grads = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    >>> clipped, norm = optim.clip_grads_by_global_norm(grads, 1.0)
    >>> float(norm), [round(float(v), 4) for v in clipped.values()]
    (5.0, [0.6, 0.8])
"""

from __future__ import annotations

import torch

from fbrain.optim import _foreach as fe
from fbrain.optim import hyperparams as hp
from fbrain.optim.base import EmptyState, GradientTransformation


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors taken together (inf/NaN if any entry is)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(fe.norm(tensors)))


def clip_grads_by_global_norm(grads: dict, max_norm, norm: torch.Tensor | None = None, in_place: bool = False):
    """``(clipped grads, norm before clipping)``: scale every gradient by ``min(1, max_norm / (norm + 1e-6))``.

    Like torch, the multiplication always happens (by exactly 1.0 when no clipping is needed), so
    there is no data-dependent branch. ``in_place``: the gradients are the caller's own to
    overwrite (a step's, as ``clip_grad_norm_`` does), which saves a copy of them.
    """
    names = list(grads)
    tensors = [grads[n] for n in names]
    if norm is None:
        norm = global_norm(tensors)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if not tensors:
        return {}, norm
    scale = coef.to(tensors[0].dtype)
    return dict(zip(names, fe.mul_(tensors, scale) if in_place else fe.mul(tensors, scale))), norm


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Clip the gradients of all parameters together to a global L2 norm of at most ``max_norm``."""
    max_norm = hp.checked_value("clip_by_global_norm: max_norm", "max_norm", max_norm, schedule=False)

    def update(grads, state, params=None):
        return clip_grads_by_global_norm(grads, max_norm)[0], state

    return GradientTransformation(lambda params: EmptyState(), update)
