"""The Brain's running training loss of an epoch: what the progress bar shows and hooks read.

The loss of each batch is kept on the device (:class:`~fbrain.brain.running_mean.RunningMean`)
and read only when someone asks. Under torchrun it is the run's loss, averaged over the ranks: the
pure step averages it itself; the loss an imperative ``fit_batch`` returns is averaged here. A
recipe that overrides ``update_average`` gets SpeechBrain's behaviour: its function is called with
every loss (a host read per batch, as in SpeechBrain).

Example::

    >>> import torch
    >>> from fbrain.brain.train_loss import TrainLoss
    >>> losses = TrainLoss()
    >>> losses.step_ran(micro_batches=2); losses.add(torch.tensor(1.0))   # a step over 2 batches
    >>> losses.add(torch.tensor(4.0))                                     # one imperative batch
    >>> losses.value()
    2.0
"""

from __future__ import annotations

from typing import Callable

from fbrain import distributed as _distributed
from fbrain.brain.running_mean import RunningMean


class TrainLoss:
    """The mean of an epoch's training losses so far, each weighted by the batches it covers."""

    def __init__(self, update_average: Callable | None = None):
        self.mean = RunningMean()
        self.update_average = update_average  # a recipe's own (loss, avg) -> avg, or None
        self._weight, self._averaged = 1, False

    @property
    def custom(self) -> bool:
        return self.update_average is not None

    def step_ran(self, micro_batches: int) -> None:
        """The pure step produced the next loss: it covers ``micro_batches`` batches and is already
        averaged over the ranks."""
        self._weight, self._averaged = micro_batches, True

    def add(self, loss) -> None:
        """Count the loss of the batch just trained (None: no step, e.g. a collected micro-batch)."""
        if not self._averaged:
            loss = _distributed.scalar_mean(loss)
        if self.custom:
            if loss is not None:
                self.mean.reset(self.update_average(loss, self.mean.value()))
        else:
            self.mean.add(loss, self._weight)
        self._weight, self._averaged = 1, False

    def value(self) -> float:
        return self.mean.value()

    def reset(self, value: float = 0.0) -> None:
        self.mean.reset(value)
