"""What a Brain saves in a checkpoint, and how a run resumes from one, bit for bit.

A Brain registers itself with its checkpointer as the recoverable ``"brain"``. Its record holds
the whole :class:`~fbrain.TrainState` (parameters, buffers, optimizer state, loss scale, counters,
RNG key), the position in the current epoch, and the exact running loss. Data order is a function
of the Brain's seed and the epoch, so after an intra-epoch checkpoint a resumed run skips the
batches already trained on and continues exactly where the interrupted one was.

Example::

    >>> from fbrain.brain.checkpointing import IntraEpochSchedule
    >>> schedule = IntraEpochSchedule(every_steps=2, every_minutes=0.0)
    >>> [schedule.due() for _ in range(4)]
    [False, True, False, True]
"""

from __future__ import annotations

import itertools
import time
from typing import Iterable

import torch
from torch.utils.data import BatchSampler, DataLoader

INTRA_EPOCH_FLAG = "brain_intra_epoch_ckpt"


class IntraEpochSchedule:
    """When to save a checkpoint in the middle of an epoch (SpeechBrain's run options)."""

    def __init__(self, every_steps: int, every_minutes: float):
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60.0
        self.restart()

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.every_seconds > 0

    def restart(self) -> None:
        self.steps = 0
        self.since = time.monotonic()

    def due(self) -> bool:
        """Count one step; True (and start over) when a checkpoint is due."""
        self.steps += 1
        if (self.every_steps > 0 and self.steps >= self.every_steps) or \
                (self.every_seconds > 0 and time.monotonic() - self.since >= self.every_seconds):
            self.restart()
            return True
        return False


class _SkipBatches(BatchSampler):
    """A batch sampler that leaves out the first ``skip`` batches of another one."""

    def __init__(self, inner, skip: int):
        self.inner, self.skip = inner, skip

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)


def skip_batches(loader: Iterable, skip: int) -> Iterable:
    """``loader`` without its first ``skip`` batches.

    A map-style DataLoader is rebuilt over a batch sampler that skips the indices, so the skipped
    examples are never loaded; anything else is iterated and the first batches dropped.
    """
    if skip <= 0:
        return loader
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None and \
            not isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return DataLoader(loader.dataset, batch_sampler=_SkipBatches(loader.batch_sampler, skip),
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                          pin_memory=loader.pin_memory, timeout=loader.timeout,
                          worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                          persistent_workers=loader.persistent_workers)
    return itertools.islice(loader, skip, None)
