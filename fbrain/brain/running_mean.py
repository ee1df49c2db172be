"""A running mean of losses that stays on the device until someone reads it.

SpeechBrain reads every loss on the host (``float(loss)``) to update its average: a host
synchronisation per step. :class:`RunningMean` keeps the losses as tensors and reduces them in
chunks on the device; :meth:`value` reads one number, when the progress bar or a hook asks.
Non-finite losses are left out of the mean, as SpeechBrain's ``update_average`` leaves them out.

Example::

    >>> import torch
    >>> from fbrain.brain.running_mean import RunningMean
    >>> mean = RunningMean()
    >>> for loss in [1.0, float("nan"), 3.0]:
    ...     mean.add(torch.tensor(loss))
    >>> mean.value()
    2.0
"""

from __future__ import annotations

import torch

_CHUNK = 512  # losses kept as separate tensors before one reduction folds them in


class RunningMean:
    """Weighted mean of the finite losses added since the last :meth:`reset`."""

    def __init__(self):
        self.reset()

    def reset(self, value: float = 0.0) -> None:
        """Forget the losses; :meth:`value` returns ``value`` until a loss is added."""
        self._pending: list[torch.Tensor] = []
        self._weights: list[float] = []
        self._sum = self._count = None
        self._initial = float(value)

    def add(self, loss, weight: float = 1.0) -> None:
        """Add ``loss`` (a scalar tensor, or a number) counting ``weight`` examples; None is ignored."""
        if loss is None:
            return
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss))
        self._pending.append(loss.detach())
        self._weights.append(weight)
        if len(self._pending) >= _CHUNK:
            self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        device = self._pending[0].device
        losses = torch.stack([x.reshape(()).to(device=device, dtype=torch.float64) for x in self._pending])
        weights = torch.tensor(self._weights, dtype=torch.float64).to(device, non_blocking=True)
        finite = torch.isfinite(losses)
        total = torch.where(finite, losses * weights, torch.zeros_like(losses)).sum()
        count = torch.where(finite, weights, torch.zeros_like(weights)).sum()
        self._sum = total if self._sum is None else self._sum + total
        self._count = count if self._count is None else self._count + count
        self._pending, self._weights = [], []

    def value(self) -> float:
        """The mean as a Python float (one host read); the reset value if nothing was added."""
        self._fold()
        if self._sum is None:
            return self._initial
        total, count = torch.stack([self._sum, self._count]).tolist()
        return total / count if count else self._initial

    RECORD = frozenset({"pending", "weights", "sum", "count", "initial"})  # the keys of a record

    def record(self) -> dict:
        """The exact state (pending losses included: folding them early would change the rounding
        of the epoch's average), as plain values and tensors for a checkpoint."""
        return {"pending": list(self._pending), "weights": list(self._weights), "sum": self._sum,
                "count": self._count, "initial": self._initial}

    def restore(self, record: dict) -> None:
        """Continue from a :meth:`record`."""
        self._pending, self._weights = list(record["pending"]), list(record["weights"])
        self._sum, self._count, self._initial = record["sum"], record["count"], record["initial"]
