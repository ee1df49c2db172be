"""Learning-rate schedules: pure functions from the update count (a tensor) to a value.

Pass one wherever an optimizer takes a hyperparameter; it is evaluated on the
device at every update, so a compiled step never recompiles as it changes.

Example::

    >>> import torch
    >>> from fbrain.optim import schedules
    >>> s = schedules.warmup_cosine_decay(peak=1e-3, warmup_steps=10, decay_steps=100)
    >>> [round(float(s(torch.tensor(n))), 6) for n in (0, 10, 100)]
    [0.0, 0.001, 0.0]
"""

from __future__ import annotations

import math

import torch

from fbrain.optim.hyperparams import Schedule


def _f(count: torch.Tensor) -> torch.Tensor:
    return count.to(torch.float64) if count.device.type != "mps" else count.to(torch.float32)


def constant(value: float) -> Schedule:
    """Always ``value``."""
    return lambda count: torch.full_like(_f(count), value)


def linear(init: float, end: float, steps: int) -> Schedule:
    """From ``init`` to ``end`` in ``steps`` updates, then ``end``."""
    _check_steps("steps", steps)
    return lambda count: init + (end - init) * torch.clamp(_f(count) / steps, 0.0, 1.0)


def exponential_decay(init: float, rate: float, steps: int, staircase: bool = False) -> Schedule:
    """``init * rate ** (count / steps)`` (with ``staircase``, the exponent is floored)."""
    _check_steps("steps", steps)

    def schedule(count):
        exponent = _f(count) / steps
        return init * rate ** (torch.floor(exponent) if staircase else exponent)

    return schedule


def cosine_decay(init: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Half a cosine from ``init`` down to ``alpha * init`` over ``decay_steps``."""
    _check_steps("decay_steps", decay_steps)

    def schedule(count):
        progress = torch.clamp(_f(count) / decay_steps, 0.0, 1.0)
        return init * ((1 - alpha) * 0.5 * (1 + torch.cos(math.pi * progress)) + alpha)

    return schedule


def warmup_cosine_decay(peak: float, warmup_steps: int, decay_steps: int, end: float = 0.0) -> Schedule:
    """Linear warm-up from 0 to ``peak``, then cosine decay to ``end`` at ``decay_steps``."""
    _check_steps("warmup_steps", warmup_steps)
    if decay_steps <= warmup_steps:
        raise ValueError(f"decay_steps: expected more than warmup_steps={warmup_steps}, got {decay_steps}")

    def schedule(count):
        c = _f(count)
        warm = peak * c / warmup_steps
        progress = torch.clamp((c - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
        cos = end + (peak - end) * 0.5 * (1 + torch.cos(math.pi * progress))
        return torch.where(c < warmup_steps, warm, cos)

    return schedule


def piecewise_constant(init: float, boundaries_and_scales: dict[int, float]) -> Schedule:
    """``init``, multiplied by ``scale`` once the count reaches each boundary."""
    items = sorted(boundaries_and_scales.items())

    def schedule(count):
        c = _f(count)
        value = torch.full_like(c, init)
        for boundary, scale in items:
            value = torch.where(c >= boundary, value * scale, value)
        return value

    return schedule


def noam(peak: float, warmup_steps: int) -> Schedule:
    """Transformer warm-up: rises linearly to ``peak`` at ``warmup_steps``, then decays as 1/sqrt(count)."""
    _check_steps("warmup_steps", warmup_steps)

    def schedule(count):
        c = _f(count) + 1
        return peak * torch.minimum(c / warmup_steps, torch.sqrt(warmup_steps / c))

    return schedule


def _check_steps(name: str, steps) -> None:
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"{name}: expected a positive int, got {steps!r}")
