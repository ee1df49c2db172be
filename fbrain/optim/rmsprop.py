"""RMSprop with torch.optim.RMSprop's semantics (centered, momentum, weight decay).

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> opt = optim.rmsprop(lr=1e-2, centered=True)
    >>> params = {"w": torch.ones(2)}
    >>> updates, _ = opt.update({"w": torch.ones(2)}, opt.init(params), params)
    >>> updates["w"].shape
    torch.Size([2])
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fbrain.optim import hyperparams as hp
from fbrain.optim import _foreach as fe
from fbrain.optim._foreach import decayed_gradients, ordered
from fbrain.optim.base import GradientTransformation


class RMSpropState(NamedTuple):
    count: torch.Tensor
    square_avg: dict[str, torch.Tensor]
    grad_avg: dict[str, torch.Tensor]
    momentum_buffer: dict[str, torch.Tensor]
    hyperparams: dict  # name -> 0-dim tensor or hp.Static (see fbrain.optim.hyperparams)


def rmsprop(
    lr: hp.Hyperparam = 1e-2,
    alpha: hp.Hyperparam = 0.99,
    eps: hp.Hyperparam = 1e-8,
    weight_decay: hp.Hyperparam = 0.0,
    momentum: hp.Hyperparam = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.RMSprop`` as a pure transformation."""
    schedules = hp.checked("rmsprop", lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)
    has_momentum, has_decay = hp.given(schedules["momentum"]), hp.given(schedules["weight_decay"])

    def init(params):
        zeros = lambda: {n: torch.zeros_like(p) for n, p in params.items()}  # noqa: E731
        return RMSpropState(
            count=torch.zeros((), dtype=torch.int64, device=hp.device_of(params)),
            square_avg=zeros(),
            grad_avg=zeros() if centered else {},
            momentum_buffer=zeros() if has_momentum else {},
            hyperparams=hp.init(params, **schedules),
        )

    def update(grads, state, params=None):
        h = hp.current(state.hyperparams, schedules, state.count)
        x = hp.as_tensors(h, state.count.device)
        names, g = ordered(grads)
        g = decayed_gradients(g, names, params, x["weight_decay"] if has_decay else None, maximize)
        c = lambda value: hp.scalar(value, g)  # noqa: E731
        one_minus_alpha = c(1 - x["alpha"])

        square_avg = fe.mul([state.square_avg[n] for n in names], c(x["alpha"]))
        g2 = fe.mul(g, g)
        fe.mul_(g2, one_minus_alpha)
        fe.add_(square_avg, g2)
        grad_avg = state.grad_avg
        if centered:
            # grad_avg <- lerp(grad_avg, g, 1 - alpha); avg = sqrt(square_avg - grad_avg^2)
            old = [grad_avg[n] for n in names]
            ga = fe.sub(g, old)
            fe.mul_(ga, one_minus_alpha)
            fe.add_(ga, old)
            grad_avg = {**grad_avg, **dict(zip(names, ga))}
            avg = fe.sub(square_avg, fe.mul(ga, ga))
            avg = fe.sqrt(avg)
        else:
            avg = fe.sqrt(square_avg)
        fe.add_(avg, c(x["eps"]))

        step = fe.div(g, avg)
        buffers = state.momentum_buffer
        if has_momentum:
            step_buf = fe.mul([buffers[n] for n in names], c(x["momentum"]))
            fe.add_(step_buf, step)
            buffers = {**buffers, **dict(zip(names, step_buf))}
            step = step_buf
        updates = fe.mul(step, c(-x["lr"]))
        new_state = RMSpropState(
            state.count + 1, {**state.square_avg, **dict(zip(names, square_avg))}, grad_avg, buffers, h
        )
        return dict(zip(names, updates)), new_state

    return GradientTransformation(init, update)
