"""Turn a torch.optim constructor into its functional twin.

SpeechBrain recipes hand the Brain an ``opt_class``: a callable that takes the
parameters and returns a torch optimizer. :func:`from_torch` builds one
instance on a throw-away parameter, reads its hyperparameters, and returns the
matching fbrain transformation.

Example::

    >>> import functools, torch
    >>> from fbrain import optim
    >>> opt = optim.from_torch(functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    >>> float(optim.get_hyperparams(opt.init({"w": torch.zeros(1)}))["momentum"])
    0.9
"""

from __future__ import annotations

from typing import Callable

import torch

from fbrain.optim import adaptive
from fbrain.optim.adam import adam
from fbrain.optim.base import GradientTransformation
from fbrain.optim.rmsprop import rmsprop
from fbrain.optim.sgd import sgd


def _number(value):
    return float(value) if isinstance(value, torch.Tensor) else value


def _sgd(g):
    return sgd(lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"],
               weight_decay=g["weight_decay"], nesterov=g["nesterov"], maximize=g["maximize"],
               fused=bool(g.get("fused")))


def _adam(g, decoupled=False):
    return adam(lr=g["lr"], betas=tuple(_number(b) for b in g["betas"]), eps=g["eps"],
                weight_decay=g["weight_decay"], amsgrad=g["amsgrad"], maximize=g["maximize"],
                decoupled_weight_decay=decoupled or g.get("decoupled_weight_decay", False),
                # The arithmetic torch.optim would run: its fused kernel only when asked for
                # (on the CPU it otherwise runs single-tensor code, which rounds differently).
                fused=bool(g.get("fused")))


def _rmsprop(g):
    return rmsprop(lr=g["lr"], alpha=g["alpha"], eps=g["eps"], weight_decay=g["weight_decay"],
                   momentum=g["momentum"], centered=g["centered"], maximize=g["maximize"])


def _betas(g):
    return tuple(_number(b) for b in g["betas"])


_TWINS: list[tuple[type, Callable[[dict], GradientTransformation]]] = [
    (torch.optim.Adagrad, lambda g: adaptive.adagrad(lr=g["lr"], lr_decay=g["lr_decay"], weight_decay=g["weight_decay"],
                                                      initial_accumulator_value=g["initial_accumulator_value"],
                                                      eps=g["eps"], maximize=g["maximize"])),
    (torch.optim.Adadelta, lambda g: adaptive.adadelta(lr=g["lr"], rho=g["rho"], eps=g["eps"],
                                                        weight_decay=g["weight_decay"], maximize=g["maximize"])),
    (torch.optim.Adamax, lambda g: adaptive.adamax(lr=g["lr"], betas=_betas(g), eps=g["eps"],
                                                    weight_decay=g["weight_decay"], maximize=g["maximize"])),
    (torch.optim.NAdam, lambda g: adaptive.nadam(lr=g["lr"], betas=_betas(g), eps=g["eps"], weight_decay=g["weight_decay"],
                                                  momentum_decay=g["momentum_decay"], maximize=g["maximize"],
                                                  decoupled_weight_decay=g["decoupled_weight_decay"])),
    (torch.optim.RAdam, lambda g: adaptive.radam(lr=g["lr"], betas=_betas(g), eps=g["eps"], weight_decay=g["weight_decay"],
                                                  decoupled_weight_decay=g["decoupled_weight_decay"],
                                                  maximize=g["maximize"])),
    (torch.optim.AdamW, lambda g: _adam(g, decoupled=True)),
    (torch.optim.Adam, _adam),
    (torch.optim.SGD, _sgd),
    (torch.optim.RMSprop, _rmsprop),
]


def twin_of(optimizer: torch.optim.Optimizer) -> GradientTransformation:
    """The fbrain twin of an existing torch optimizer, from its first parameter group."""
    group = {k: _number(v) for k, v in optimizer.param_groups[0].items() if k != "params"}
    # Exact types only: a subclass may change what step() does.
    for cls, build in _TWINS:
        if type(optimizer) is cls:
            return build(group)
    supported = ", ".join(f"torch.optim.{cls.__name__}" for cls, _ in _TWINS)
    raise TypeError(
        f"opt_class builds a {type(optimizer).__module__}.{type(optimizer).__qualname__}, "
        f"which has no functional twin in fbrain.optim; supported: {supported}"
    )


def from_torch(opt_class: Callable) -> GradientTransformation:
    """The functional twin of ``opt_class`` (a callable ``params -> torch.optim.Optimizer``)."""
    if isinstance(opt_class, GradientTransformation):
        return opt_class
    if not callable(opt_class):
        raise TypeError(f"opt_class: expected a callable returning a torch optimizer, got {opt_class!r}")
    probe = [torch.nn.Parameter(torch.zeros(1))]
    try:
        instance = opt_class(probe)
    except Exception as err:
        raise TypeError(
            f"opt_class: calling {opt_class!r} with a list of parameters failed ({err}); "
            "expected a callable like `lambda params: torch.optim.Adam(params, lr=1e-3)`"
        ) from err
    if not isinstance(instance, torch.optim.Optimizer):
        raise TypeError(
            f"opt_class: {opt_class!r} returned a {type(instance).__name__}, expected a torch.optim.Optimizer"
        )
    return twin_of(instance)
