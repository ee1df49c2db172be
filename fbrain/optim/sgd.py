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
from fbrain.optim.base import GradientTransformation, unless_skipped
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
    fused: bool = True,
) -> GradientTransformation:
    """``torch.optim.SGD`` as a pure transformation.

    ``fused`` chooses between ATen's fused CPU kernel (where it serves) and torch.optim's default
    arithmetic, bit for bit, as in :func:`fbrain.optim.adam`.

    A momentum buffer is kept only when ``momentum`` is given non-zero (or as a
    schedule); weight decay is applied only when given non-zero. Both choices
    are fixed when the optimizer is built; the values stay tunable tensors.
    """
    schedules = hp.checked("sgd", lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    has_momentum, has_decay, damped = (hp.given(schedules[n]) for n in ("momentum", "weight_decay", "dampening"))
    if nesterov and (not has_momentum or damped):
        raise ValueError("sgd: nesterov: Nesterov momentum requires momentum > 0 and dampening = 0")

    def init(params):
        return SGDState(
            count=torch.zeros((), dtype=torch.int64, device=hp.device_of(params)),
            momentum_buffer={n: torch.zeros_like(p) for n, p in params.items()} if has_momentum else {},
            hyperparams=hp.init(params, **schedules),
        )

    def direction(grads, state, params):
        """torch.optim's single-tensor SGD up to its last line, rounding for rounding (its
        ``add(..., alpha=)`` rounds a multiply-add once on the CPU): the direction ``d`` (the
        step is ``params + d * step``), ``step`` (-lr), and the new state."""
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
            buf = fe.addcmul(fe.mul([buffers[n] for n in names], hp.scalar(mom, g)), g, hp.scalar(keep, g))
            buffers = {**buffers, **dict(zip(names, buf))}
            g = fe.addcmul(g, buf, hp.scalar(x["momentum"], g)) if nesterov else buf
        return names, g, hp.scalar(-x["lr"], g), SGDState(state.count + 1, buffers, h)

    def update(grads, state, params=None):
        names, d, step, new_state = direction(grads, state, params)
        return dict(zip(names, fe.mul(d, step))), new_state

    def arithmetic(grads, state, params, skip):
        names, d, step, new_state = direction(grads, state, params)
        new_params = dict(zip(names, fe.addcmul([params[n] for n in names], d, step)))
        return unless_skipped(skip, new_params, new_state, params, state, names)

    def fused_apply(grads, state, params, skip, in_place):
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
            lr=h["lr"], dampening=0.0, nesterov=nesterov, maximize=maximize,
            # Never the kernel's "first step" (buffer <- gradient): with the zero-initialised buffer
            # and no dampening, momentum * 0 + gradient is that same gradient, bit for bit, and
            # no host read of the count is needed to tell the first step apart.
            is_first_step=False,
            grad_scale=None, found_inf=skip.to(torch.float32))
        momentum_buffer = {**state.momentum_buffer, **dict(zip(names, buffers))} if has_momentum else {}
        new_state = SGDState(torch.where(skip, state.count, state.count + 1), momentum_buffer, h)
        return {**params, **dict(zip(names, new_p))}, new_state

    def apply(grads, state, params, skip, in_place=False):
        # The fused kernel where it serves and is allowed, else torch's arithmetic (see adam's apply).
        return (fused and fused_apply(grads, state, params, skip, in_place)) or arithmetic(grads, state, params, skip)

    return GradientTransformation(init, update, apply=apply)
