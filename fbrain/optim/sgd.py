"""Stochastic gradient descent with torch.optim.SGD's semantics (momentum, dampening, Nesterov).

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> opt = optim.sgd(lr=0.1, momentum=0.9)
    >>> params = {"w": torch.ones(2)}
    >>> updates, state = opt.update({"w": torch.ones(2)}, opt.init(params), params)
    >>> updates["w"]
    tensor([-0.1000, -0.1000])
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fbrain.optim import hyperparams as hp
from fbrain.optim import _foreach as fe
from fbrain.optim import _fused
from fbrain.optim._foreach import decayed_gradients, ordered
from fbrain.optim.base import GradientTransformation, apply_with_update
from fbrain.torch_compat import fused_kernel


class SGDState(NamedTuple):
    count: torch.Tensor
    momentum_buffer: dict[str, torch.Tensor]
    hyperparams: dict  # name -> 0-dim tensor or hp.Static (see fbrain.optim.hyperparams)


def sgd(
    lr: hp.Hyperparam = 1e-3,
    momentum: hp.Hyperparam = 0.0,
    dampening: hp.Hyperparam = 0.0,
    weight_decay: hp.Hyperparam = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.SGD`` as a pure transformation.

    A momentum buffer is kept only when ``momentum`` is given non-zero (or as a
    schedule); weight decay is applied only when given non-zero. Both choices
    are fixed when the optimizer is built; the values stay tunable tensors.
    """
    for name, value in [("lr", lr), ("momentum", momentum), ("dampening", dampening),
                        ("weight_decay", weight_decay)]:
        hp.validate(name, value)
    has_momentum = callable(momentum) or momentum != 0
    has_decay = callable(weight_decay) or weight_decay != 0
    if nesterov and (not has_momentum or callable(dampening) or dampening != 0):
        raise ValueError("nesterov: Nesterov momentum requires momentum > 0 and dampening = 0")
    schedules = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)

    def init(params):
        return SGDState(
            count=torch.zeros((), dtype=torch.int64, device=hp.device_of(params)),
            momentum_buffer={n: torch.zeros_like(p) for n, p in params.items()} if has_momentum else {},
            hyperparams=hp.init(params, **schedules),
        )

    def update(grads, state, params=None):
        h = hp.current(state.hyperparams, schedules, state.count)
        x = hp.as_tensors(h, state.count.device)
        names, g = ordered(grads)
        g = decayed_gradients(g, names, params, x["weight_decay"] if has_decay else None, maximize)
        buffers = state.momentum_buffer
        if has_momentum:
            # torch starts the buffer as a copy of the first gradient; with a zero buffer,
            # momentum 0 and dampening 0 on the first update give exactly that.
            first = state.count == 0
            mom = torch.where(first, torch.zeros_like(x["momentum"]), x["momentum"])
            keep = torch.where(first, torch.ones_like(x["dampening"]), 1 - x["dampening"])
            buf = fe.mul([buffers[n] for n in names], hp.scalar(mom, g))
            fe.add_(buf, fe.mul(g, hp.scalar(keep, g)))
            buffers = {**buffers, **dict(zip(names, buf))}
            if nesterov:
                g = fe.add(g, fe.mul(buf, hp.scalar(x["momentum"], g)))
            else:
                g = buf
        updates = fe.mul(g, hp.scalar(-x["lr"], g))
        return dict(zip(names, updates)), SGDState(state.count + 1, buffers, h)

    def fused(grads, state, params, skip, in_place):
        """ATen's fused CPU SGD (see :mod:`fbrain.optim._fused`); None where it does not serve."""
        kernel = fused_kernel("_fused_sgd_")
        names, g = ordered(grads)
        h = hp.current(state.hyperparams, schedules, state.count)
        f = _fused.host_numbers(g, h, (["weight_decay"] if has_decay else [])
                                + (["momentum", "dampening"] if has_momentum else []))
        if f is None or kernel is None or f.get("dampening", 0.0) != 0.0:
            # With dampening torch's first step differs from the later ones (the buffer starts as
            # the plain gradient); telling them apart would read the count: the general path does.
            return None
        new_p = _fused.working_copies(params, names, in_place)
        buffers = _fused.working_copies(state.momentum_buffer, names, in_place) if has_momentum else []
        kernel(
            new_p, list(g), buffers,
            weight_decay=f.get("weight_decay", 0.0), momentum=f.get("momentum", 0.0),
            lr=h["lr"].to(g[0].dtype), dampening=0.0, nesterov=nesterov, maximize=maximize,
            # Never the kernel's "first step" (buffer <- gradient): with the zero-initialised buffer
            # and no dampening, momentum * 0 + gradient is that same gradient, bit for bit, and
            # no host read of the count is needed to tell the first step apart.
            is_first_step=False,
            grad_scale=None, found_inf=skip.to(torch.float32))
        momentum_buffer = {**state.momentum_buffer, **dict(zip(names, buffers))} if has_momentum else {}
        new_state = SGDState(torch.where(skip, state.count, state.count + 1), momentum_buffer, h)
        return {**params, **dict(zip(names, new_p))}, new_state

    def apply(grads, state, params, skip, in_place=False):
        # The fused kernel where it serves, else the arithmetic of `update` (see adam's apply).
        return fused(grads, state, params, skip, in_place) or apply_with_update(update, grads, state, params, skip)

    return GradientTransformation(init, update, apply=apply)
