"""Dynamic loss scaling for float16 training, as a pure value.

The rules are those of ``torch.amp.GradScaler``: the scale starts at 2**16;
a step whose gradients are not finite is skipped and multiplies the scale by
``backoff_factor``; after ``growth_interval`` finite steps in a row the scale is
multiplied by ``growth_factor`` (unless that would overflow). The decision is
made with ``torch.where`` on the device, so no step waits for the host.

The state (two tensors) lives in :class:`~fbrain.TrainState`; the factors are
configuration, fixed when the step is built.

Example::

    >>> import torch
    >>> rule = DynamicLossScale()
    >>> s = rule.init()
    >>> s = rule.update(s, found_inf=torch.tensor(True))
    >>> float(s.scale)
    32768.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class LossScaleState(NamedTuple):
    """The loss scale (float32) and the count of finite steps since it last changed (int32)."""

    scale: torch.Tensor
    growth_tracker: torch.Tensor


@dataclass(frozen=True)
class DynamicLossScale:
    """GradScaler's rule for growing and shrinking the loss scale."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self):
        if not self.init_scale > 0:
            raise ValueError(f"init_scale: expected a positive number, got {self.init_scale}")
        if not self.growth_factor > 1.0:
            raise ValueError(f"growth_factor: expected a number > 1, got {self.growth_factor}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor: expected a number in (0, 1), got {self.backoff_factor}")
        if not (isinstance(self.growth_interval, int) and self.growth_interval > 0):
            raise ValueError(f"growth_interval: expected a positive int, got {self.growth_interval!r}")

    def init(self, device: torch.device | str | None = None) -> LossScaleState:
        return LossScaleState(
            scale=torch.tensor(self.init_scale, dtype=torch.float32, device=device),
            growth_tracker=torch.tensor(0, dtype=torch.int32, device=device),
        )

    def update(self, state: LossScaleState, found_inf: torch.Tensor) -> LossScaleState:
        """The next loss-scale state after a step that did (not) find an inf/NaN gradient."""
        scale, tracker = state
        grown_tracker = tracker + 1
        time_to_grow = grown_tracker >= self.growth_interval
        grown = scale * self.growth_factor
        # GradScaler keeps the old scale when growing it would overflow float32.
        grown = torch.where(torch.isfinite(grown), grown, scale)
        next_scale = torch.where(
            found_inf, scale * self.backoff_factor, torch.where(time_to_grow, grown, scale)
        )
        next_tracker = torch.where(
            found_inf | time_to_grow, torch.zeros_like(tracker), grown_tracker
        )
        return LossScaleState(next_scale, next_tracker)
