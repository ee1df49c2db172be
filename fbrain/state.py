"""``TrainState``: everything a training run knows, as one immutable value.

A state is a frozen dataclass registered as a pytree, so ``tree_map``,
``torch.compile`` and ``vmap`` see straight through it. Pure step functions
take a state and return the next one; nothing in a state is ever modified in
place.

Example::

    >>> import torch
    >>> from fbrain import TrainState, optim
    >>> model = torch.nn.Linear(3, 1)
    >>> state = TrainState.create(model, optim.sgd(lr=0.1))
    >>> sorted(state.params)
    ['bias', 'weight']
    >>> state.params["weight"] is model.weight
    False
    >>> int(state.replace(counters=state.counters._replace(epoch=torch.tensor(3))).counters.epoch)
    3
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from fbrain import rng as _rng
from fbrain.loss_scale import DynamicLossScale, LossScaleState
from fbrain.optim.base import GradientTransformation
from fbrain.tree import device_of, register_dataclass, tree_map


class Counters(NamedTuple):
    """Progress counters, all int64 tensors so a step can advance them on the device.

    ``step`` counts gradient applications (:func:`fbrain.update.apply_gradients`: one per train
    step, one per ``optimizer.step()`` of an imperative recipe), ``optimizer_step`` those that
    were applied; ``nonfinite_count`` counts steps skipped for a non-finite loss
    or gradient, ``nonfinite_streak`` those in a row (reset by a finite step). In fp16, a
    step skipped only because the scaled gradients overflowed (finite loss) is the loss
    scale backing off, not a non-finite step: it advances neither count.
    """

    step: torch.Tensor
    optimizer_step: torch.Tensor
    epoch: torch.Tensor
    nonfinite_count: torch.Tensor
    nonfinite_streak: torch.Tensor

    @classmethod
    def zeros(cls, device=None) -> "Counters":
        return cls(*(torch.zeros((), dtype=torch.int64, device=device) for _ in cls._fields))


@register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, buffers, optimizer state, loss scale, counters and RNG key.

    ``params`` and ``buffers`` are keyed like ``module.named_parameters()`` and
    ``module.named_buffers()``. ``rng`` stays on the CPU whatever the device of
    the rest (see :mod:`fbrain.rng`).
    """

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: Any
    scaler: LossScaleState
    counters: Counters
    rng: torch.Tensor

    @classmethod
    def create(
        cls,
        module: torch.nn.Module,
        optimizer: GradientTransformation,
        *,
        seed: int = 0,
        loss_scale: DynamicLossScale = DynamicLossScale(),
    ) -> "TrainState":
        """Copy ``module``'s parameters and buffers into a new state (never aliases)."""
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(optimizer, GradientTransformation):
            raise TypeError(
                "optimizer: expected an fbrain.optim.GradientTransformation "
                f"(e.g. optim.adam(1e-3)), got {type(optimizer).__name__}; "
                "wrap a torch.optim constructor with optim.from_torch(...)"
            )
        params = {name: p.detach().clone() for name, p in module.named_parameters()}
        for name, p in params.items():
            if not p.is_floating_point():
                raise TypeError(f"params[{name!r}]: expected a floating-point tensor, got dtype {p.dtype}")
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        device = device_of(params)
        return cls(
            params=params,
            buffers=buffers,
            opt_state=optimizer.init(params),
            scaler=loss_scale.init(device),
            counters=Counters.zeros(device),
            rng=_rng.new_key(seed),
        )

    def replace(self, **changes) -> "TrainState":
        """A copy with some fields replaced (the fields themselves are shared, not copied)."""
        # Not dataclasses.replace: it reads the class's field table, which torch.compile then
        # re-checks in Python before every call of a compiled step.
        unknown = [name for name in changes if name not in _FIELDS]
        if unknown:
            raise TypeError(f"TrainState.replace: unknown fields {sorted(unknown)}; fields are {list(_FIELDS)}")
        return type(self)(*(changes[f] if f in changes else getattr(self, f) for f in _FIELDS))

    def to(self, device: torch.device | str) -> "TrainState":
        """The same state with every tensor on ``device`` (the RNG key stays on the CPU)."""
        moved = tree_map(
            lambda x: x.to(device) if isinstance(x, torch.Tensor) else x,
            self.replace(rng=None),
        )
        return moved.replace(rng=self.rng)

    @property
    def step(self) -> torch.Tensor:
        return self.counters.step


def check_state(state: Any) -> None:
    """Raise a precise error if ``state`` is not a usable TrainState (host-side metadata only)."""
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected an fbrain.TrainState, got {type(state).__name__}")
    for name, p in state.params.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            what = f"dtype {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise TypeError(f"params[{name!r}]: expected a floating-point tensor, got {what}")


_FIELDS = tuple(f.name for f in dataclasses.fields(TrainState))
