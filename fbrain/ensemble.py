"""Train several copies of a model at once: stacked states and a vmapped step.

Stacking puts every tensor of N states along a new leading axis, learning
rates and RNG keys included, so each copy can have its own seed or
hyperparameters. The vmapped step equals running each copy's step alone.

Example::

    >>> import torch, fbrain
    >>> from fbrain import optim
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = optim.sgd(lr=0.1)
    >>> states = [fbrain.TrainState.create(torch.nn.Linear(2, 1), opt) for _ in range(3)]
    >>> stacked = fbrain.stack_states(states)
    >>> stacked.params["weight"].shape
    torch.Size([3, 1, 2])
    >>> len(fbrain.unstack_states(stacked))
    3
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.func import vmap

from fbrain.state import TrainState
from fbrain.state import check_state
from fbrain.optim.hyperparams import get_hyperparams
from fbrain.step import TrainStep
from fbrain.tree import tree_flatten, tree_map


def stack_states(states: list[TrainState]) -> TrainState:
    """One state whose every tensor has a leading axis of ``len(states)``."""
    if not states:
        raise ValueError("stack_states: expected at least one state")
    spec = tree_flatten(states[0])[1]
    for i, s in enumerate(states[1:], start=1):
        check_state(s)
        if tree_flatten(s)[1] != spec:
            first, this = get_hyperparams(states[0].opt_state), get_hyperparams(s.opt_state)
            differ = sorted(k for k in first if k in this and not isinstance(first[k], torch.Tensor)
                            and first[k] != this[k])
            if differ:
                raise ValueError(
                    f"stack_states: states[{i}] has {differ[0]}={this[differ[0]]}, states[0] has {first[differ[0]]}; "
                    "hyperparameters given as numbers (all but the learning rate) must agree across an "
                    "ensemble: give it as a schedule (optim.schedules.constant(...)) to make it a tensor")
            raise ValueError(f"stack_states: states[{i}] has a different structure from states[0]")
    return tree_map(lambda *xs: torch.stack(xs) if isinstance(xs[0], torch.Tensor) else xs[0], *states)


def unstack_states(stacked: TrainState) -> list[TrainState]:
    """The inverse of :func:`stack_states`."""
    leaves, spec = tree_flatten(stacked)
    sizes = {x.shape[0] for x in leaves if isinstance(x, torch.Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"unstack_states: tensors disagree on the ensemble size: {sorted(sizes)}")
    (n,) = sizes
    return [tree_map(lambda x, i=i: x[i] if isinstance(x, torch.Tensor) else x, stacked) for i in range(n)]


def ensemble_step(
    train_step: TrainStep, *, shared_batch: bool = True, randomness: str = "error"
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """A step over a stacked state that trains every copy at once with ``vmap``.

    With ``shared_batch`` every copy sees the same batch; otherwise the batch
    too has a leading ensemble axis. ``randomness`` is vmap's: "error" (the
    default) refuses random ops, "different"/"same" draw from the caller's
    generator.
    """
    if not isinstance(train_step, TrainStep):
        raise TypeError(f"train_step: expected a step from fbrain.make_train_step, got {type(train_step).__name__}")
    batched = vmap(train_step.pure,
                   in_dims=(0, None if shared_batch else 0), randomness=randomness)

    def step(stacked: TrainState, batch: Any) -> tuple[TrainState, dict]:
        check_state(stacked)
        return batched(stacked, batch)

    return step
