"""Shared pieces of the optimizers' fused CPU shortcuts (``GradientTransformation.fused_apply``).

ATen's fused CPU kernels (``torch._fused_adam_``, ``torch._fused_sgd_`` ...) update parameters
and moments in place in one pass and skip the whole update when ``found_inf`` is set. A pure step
runs them on copies (or, with a donated state, on the state's own tensors). They take the learning
rate as a tensor but the other hyperparameters as Python numbers, and a step never reads a tensor
value on the host: those numbers come from the host-side mirror kept when the hyperparameters were
set (:func:`fbrain.optim.hyperparams.mirrored`). Where the mirror cannot be trusted (a schedule, an
in-place change, a state loaded from a checkpoint before ``mirror_hyperparams``), and for states on
any other device, the shortcut declines and the step takes the general multi-tensor path, which
gives the same results.
"""

from __future__ import annotations

import torch

from fbrain.optim.hyperparams import mirrored


def serves(grads: list[torch.Tensor], hyperparams: dict[str, torch.Tensor]) -> bool:
    """True when the fused CPU kernels can take these gradients and hyperparameters."""
    return bool(grads) and all(g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64)
                               for g in grads) and all(v.device.type == "cpu" for v in hyperparams.values())


def working_copies(tree: dict[str, torch.Tensor], names: list[str], in_place: bool) -> list[torch.Tensor]:
    """The tensors the kernel may overwrite: private copies, or the donated originals."""
    return [tree[n] if in_place else tree[n].clone() for n in names]


def host_values(hyperparams: dict[str, torch.Tensor], names: list[str]) -> dict[str, float] | None:
    """The mirrored Python values of ``names`` (no tensor is read), or None if one is not known."""
    out = {}
    for name in names:
        value = mirrored(hyperparams[name])
        if value is None:
            return None
        out[name] = value
    return out
