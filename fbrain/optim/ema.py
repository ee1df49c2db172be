"""An exponential moving average (EMA) of the weights, kept in the optimizer's state.

``with_ema(tx, decay)`` wraps any optimizer: it updates the parameters as ``tx`` does, then moves
the average towards the new parameters, ``ema <- decay * ema + (1 - decay) * params``. The first
step copies the parameters, as ``torch.optim.swa_utils.AveragedModel`` with
``get_ema_multi_avg_fn(decay)`` does, and the same ``lerp`` gives the same numbers. A skipped step
(non-finite gradients) leaves the average as it was. The average is part of the optimizer state,
so it is checkpointed and restored with it; :func:`ema_params` reads it back, e.g. to evaluate with
the averaged weights.

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> opt = optim.with_ema(optim.sgd(lr=0.5), decay=0.9)
    >>> params = {"w": torch.tensor([1.0])}
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...     params, state = optim.apply(opt, {"w": torch.tensor([1.0])}, state, params)
    >>> params["w"], optim.ema_params(state)["w"]
    (tensor([0.]), tensor([0.4500]))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fbrain.optim import hyperparams as hp
from fbrain.optim.base import GradientTransformation, apply, apply_updates
from fbrain.tree import device_of, select


class EmaState(NamedTuple):
    """The wrapped optimizer's state, the running average of every parameter, and the number of
    steps averaged so far."""

    inner: Any
    params: dict[str, torch.Tensor]
    count: torch.Tensor


def _moved(state: EmaState, new_params: dict, names: list[str], decay: float) -> EmaState:
    """``state`` with the average of ``names`` moved towards ``new_params`` (copied on step one)."""
    first = state.count == 0
    ema = dict(state.params)
    for n in names:
        weight = torch.where(first, 1.0, 1.0 - decay).to(ema[n].dtype)
        ema[n] = torch.lerp(ema[n], new_params[n].detach().to(ema[n].dtype), weight)
    return EmaState(state.inner, ema, state.count + 1)


def with_ema(tx: GradientTransformation, decay: float) -> GradientTransformation:
    """``tx``, plus an exponential moving average of the parameters it trains (see the module)."""
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"with_ema: expected a GradientTransformation, got {type(tx).__name__}")
    if isinstance(decay, torch.Tensor):
        raise TypeError("with_ema: decay: expected a number, got a tensor")
    decay = hp.checked_value("with_ema: decay", "decay", decay, schedule=False)

    def init(params):
        return EmaState(tx.init(params), {n: p.detach().clone() for n, p in params.items()},
                        torch.zeros((), dtype=torch.int64, device=device_of(params)))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("with_ema: update needs the parameters (the average follows them)")
        updates, inner = tx.update(grads, state.inner, params)
        new_params = apply_updates({n: params[n] for n in updates}, updates)
        return updates, _moved(state._replace(inner=inner), new_params, list(updates), decay)

    def apply_fn(grads, state, params, skip, in_place=False):
        new_params, inner = apply(tx, grads, state.inner, params, skip, in_place)
        moved = _moved(state._replace(inner=inner), new_params, [n for n in grads if n in params], decay)
        kept = select(~skip, moved._replace(inner=None), state._replace(inner=None))
        return new_params, kept._replace(inner=inner)

    return GradientTransformation(init, update, tx.frozen, apply_fn)


def ema_params(opt_state: Any) -> dict[str, torch.Tensor]:
    """The averaged parameters held anywhere in ``opt_state`` (e.g. inside ``partition`` groups),
    merged into one dict; a KeyError when the optimizer keeps no average."""
    found: dict[str, torch.Tensor] = {}

    def visit(node):
        if isinstance(node, EmaState):
            found.update(node.params)
            visit(node.inner)
        elif isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, (tuple, list)):
            for value in node:
                visit(value)

    visit(opt_state)
    if not found:
        raise KeyError("ema_params: this optimizer state holds no average of the weights; "
                       "wrap the optimizer with optim.with_ema(opt, decay)")
    return found

