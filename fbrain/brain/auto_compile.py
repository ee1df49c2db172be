"""``compile_steps="auto"`` (the default): compile the train step when the fit is long enough to repay it.

A compiled step is one graph for forward, backward, clipping and update; on small CPU models it
takes well under the eager step's time, but compiling costs seconds to tens of seconds (torch's
on-disk FX graph and AOTAutograd caches, on by default, shorten a second start). Set against the
time a step saves, compiling repays itself after some thousands to tens of thousands of steps
(docs/benchmarks.md has the suite's figures). So the default compiles the train step when the fit
plans at least ``auto_compile_min_steps`` (20,000) of them, and runs it eagerly otherwise.

The decision is a function of the run's plan only (epochs left x batches per epoch, the step
limits), never of timings, so the same recipe with the same data always takes the same path, and
a resumed run the same as an uninterrupted one would at that point. Compiled and eager steps agree
within float rounding (1e-5, tested), and the choice is logged. ``compile_steps=True`` compiles
the train and eval steps always, ``False`` never; a step that cannot be captured whole (an LSTM in
torch 2.11) runs eagerly either way.

Example::

    >>> planned_train_steps(range(3), list(range(100)), done_in_epoch=0)
    300
"""

from __future__ import annotations

from typing import Any


def planned_train_steps(epoch_counter: Any, train_set: Any, done_in_epoch: int = 0,
                        step_limit: int | None = None) -> int | None:
    """How many train steps a fit over ``epoch_counter`` and ``train_set`` will take (None when
    unknown: a loader without a length, a counter without a limit). ``done_in_epoch``: batches of
    the first epoch already trained on (a resumed run); ``step_limit``: steps left before a limit
    (the optimizer step limit, the debug limits) stops the fit."""
    try:
        per_epoch = len(train_set)
    except TypeError:
        return None
    if hasattr(epoch_counter, "limit") and hasattr(epoch_counter, "current"):
        epochs = epoch_counter.limit - epoch_counter.current  # fbrain's and SpeechBrain's counters
    else:
        try:
            epochs = len(epoch_counter)
        except TypeError:
            return None
    planned = max(0, epochs * per_epoch - done_in_epoch)
    return planned if step_limit is None else min(planned, max(0, step_limit))


def compiles_train_step(option: Any, planned: int | None, min_steps: int) -> bool:
    """Whether the train step runs compiled under the ``compile_steps`` run option ``option``."""
    if option == "auto":
        return planned is not None and planned >= min_steps
    return bool(option)
