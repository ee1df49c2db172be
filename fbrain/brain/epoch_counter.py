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
from fbrain.checkpoint.recoverables import mark_as_loader, mark_as_preparer, mark_as_saver, register_with_speechbrain


class EpochCounter:
    """Yields ``current + 1, ..., limit``; ``current`` is the last epoch started."""

    def __init__(self, limit: int):
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"EpochCounter: limit must be an int >= 0, got {limit!r}")
        self.current = 0
        self.limit = limit
        # SpeechBrain's own Checkpointer (a recipe's YAML may make one) saves it with its hooks.
        register_with_speechbrain(EpochCounter)

    def __iter__(self):
        while self.current < self.limit:
            self.current += 1
            yield self.current

    def state_dict(self) -> dict:
        return {"current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.current = self._checked(state)

    @staticmethod
    def _checked(state) -> int:
        current = state.get("current") if isinstance(state, dict) else None
        if not isinstance(current, int) or isinstance(current, bool):
            raise TypeError(f"EpochCounter: expected a state {{'current': int}}, got {state!r:.80}")
        return current

    # Checkpointer hooks (the names SpeechBrain's EpochCounter uses).
    @mark_as_saver
    def _save(self, path) -> None:
        checkpoint.save(path, self.state_dict())

    @mark_as_preparer
    def _prepare_recover(self, path, end_of_epoch=True):
        current = self._checked(checkpoint.load(path))
        # An epoch interrupted in the middle must be run again (the Brain skips what was done).
        target = current if end_of_epoch else current - 1
        return lambda: setattr(self, "current", target)

    @mark_as_loader
    def _recover(self, path, end_of_epoch=True) -> None:
        self._prepare_recover(path, end_of_epoch)()
