"""``EpochCounter``: an iterable of epoch numbers that remembers where it stopped.

It is checkpointable (``state_dict``/``load_state_dict``, and SpeechBrain's ``_save``/``_recover``
file hooks), so a resumed run continues with the next epoch.

Example::

    >>> from fbrain.brain.epoch_counter import EpochCounter
    >>> counter = EpochCounter(limit=3)
    >>> [epoch for epoch in counter]
    [1, 2, 3]
    >>> resumed = EpochCounter(limit=5)
    >>> resumed.load_state_dict(counter.state_dict())
    >>> list(resumed)
    [4, 5]
"""

from __future__ import annotations

from fbrain import checkpoint
from fbrain.checkpoint.checkpointer import mark_as_loader, mark_as_saver


class EpochCounter:
    """Yields ``current + 1, ..., limit``; ``current`` is the last epoch started."""

    def __init__(self, limit: int):
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"EpochCounter: limit must be an int >= 0, got {limit!r}")
        self.current = 0
        self.limit = limit

    def __iter__(self):
        while self.current < self.limit:
            self.current += 1
            yield self.current

    def state_dict(self) -> dict:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        current = state["current"]
        if not isinstance(current, int):
            raise TypeError(f"EpochCounter: state 'current' must be an int, got {type(current).__name__}")
        self.current = current

    # Checkpointer hooks (the names SpeechBrain's EpochCounter uses).
    @mark_as_saver
    def _save(self, path) -> None:
        checkpoint.save(path, self.state_dict())

    @mark_as_loader
    def _recover(self, path, end_of_epoch=True) -> None:
        self.load_state_dict(checkpoint.load(path))
        # An epoch interrupted in the middle must be run again (the Brain skips what was done).
        if not end_of_epoch:
            self.current -= 1
