"""Functional optimizers: pure ``init``/``update``/``apply`` with hyperparameters in their state.

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> opt = optim.chain(optim.clip_by_global_norm(5.0), optim.adam(lr=1e-3))
    >>> params = {"w": torch.zeros(4)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": torch.ones(4)}, state, params)
    >>> params = optim.apply_updates(params, updates)
"""

from fbrain.optim import schedules
from fbrain.optim.adam import AdamState, adam, adamw
from fbrain.optim.adaptive import AdaptiveState, adadelta, adagrad, adamax, nadam, radam
from fbrain.optim.base import (
    EmptyState,
    GradientTransformation,
    apply,
    apply_updates,
    chain,
    frozen,
    frozen_names,
    identity,
    partition,
)
from fbrain.optim.ema import EmaState, ema_params, with_ema
from fbrain.optim.clipping import clip_by_global_norm, clip_grads_by_global_norm, global_norm
from fbrain.optim.from_torch import from_torch, twin_of
from fbrain.optim.hyperparams import Static, get_hyperparams, set_hyperparams
from fbrain.optim.rmsprop import RMSpropState, rmsprop
from fbrain.optim.sgd import SGDState, sgd

__all__ = [
    "AdamState", "AdaptiveState", "EmaState", "EmptyState", "GradientTransformation", "RMSpropState", "SGDState", "Static",
    "adadelta", "adagrad", "adam", "adamax", "adamw", "nadam", "radam", "apply", "apply_updates", "chain", "clip_by_global_norm", "clip_grads_by_global_norm",
    "ema_params", "from_torch", "frozen", "frozen_names", "get_hyperparams", "global_norm", "identity",
    "partition", "rmsprop", "schedules", "set_hyperparams", "sgd", "twin_of", "with_ema",
]
