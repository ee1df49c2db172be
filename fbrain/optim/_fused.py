"""Shared pieces of the optimizers' fused CPU kernels (the fast branch of their ``apply``).

ATen's fused CPU kernels (``torch._fused_adam_``, ``torch._fused_sgd_`` ...) update parameters and
moments in place in one pass and skip the whole update when ``found_inf`` is set. A pure step runs
them on copies (or, with a donated state, on the state's own tensors). They take the learning rate
as a tensor but the other hyperparameters as Python numbers: those are the state's
:class:`~fbrain.optim.hyperparams.Static` entries, so whether the kernel runs depends on the
optimizer's definition and the state's values only (a scheduled beta or momentum is a tensor: the
optimizer then takes its multi-tensor arithmetic, always).
"""

from __future__ import annotations

import torch

from fbrain.optim import _foreach as fe
from fbrain.optim.hyperparams import host_values


def host_numbers(grads: list[torch.Tensor], hyperparams: dict, names: list[str]) -> dict[str, float] | None:
    """The Python numbers the fused kernel takes for ``names``, or None when the kernel cannot
    serve this call: under torch.compile or vmap (which trace the multi-tensor arithmetic), for
    tensors that are not float32/float64 on the CPU, or when one of ``names`` is scheduled."""
    if not grads or torch.compiler.is_compiling() or fe.any_batched(grads):
        return None
    if not all(g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64) for g in grads):
        return None
    if hyperparams["lr"].device.type != "cpu":
        return None
    return host_values(hyperparams, names)


def working_copies(tree: dict[str, torch.Tensor], names: list[str], in_place: bool) -> list[torch.Tensor]:
    """The tensors the kernel may overwrite: private copies, or the donated originals."""
    return [tree[n] if in_place else tree[n].clone() for n in names]
