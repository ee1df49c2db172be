"""Shared pieces of the optimizers' fused CPU shortcuts (``GradientTransformation.fused_apply``).

ATen's fused CPU kernels (``torch._fused_adam_``, ``torch._fused_sgd_`` ...) update parameters
and moments in place in one pass and skip the whole update when ``found_inf`` is set. A pure step
runs them on copies (or, with a donated state, on the state's own tensors). They take most
hyperparameters as Python numbers: those are read from the state's hyperparameter tensors, which
for a CPU state live in host memory, so reading them waits on nothing. States on any other device
take the general multi-tensor path.
"""

from __future__ import annotations

import torch


def serves(grads: list[torch.Tensor], hyperparams: dict[str, torch.Tensor]) -> bool:
    """True when the fused CPU kernels can take these gradients and hyperparameters."""
    return bool(grads) and all(g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64)
                               for g in grads) and all(v.device.type == "cpu" for v in hyperparams.values())


def working_copies(tree: dict[str, torch.Tensor], names: list[str], in_place: bool) -> list[torch.Tensor]:
    """The tensors the kernel may overwrite: private copies, or the donated originals."""
    return [tree[n] if in_place else tree[n].clone() for n in names]
