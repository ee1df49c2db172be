"""Averaging a module's weights over several checkpoints (SpeechBrain's ``average_checkpoints``).

Averaging the last few checkpoints of a run often scores better than the last one alone; SpeechBrain's
ASR recipes do it before their final test. The files are read with fbrain's verified readers (a damaged
file is a CheckpointError naming it), and the average is SpeechBrain's to the bit: the state_dicts are
summed in the order given, then divided by their count.

Example::

    >>> import tempfile, torch
    >>> from fbrain.checkpoint import Checkpointer, average_checkpoints
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), {"model": model})
    >>> for value in (1.0, 2.0, 6.0):
    ...     _ = model.weight.data.fill_(value)
    ...     _ = ckpt.save_checkpoint()
    >>> average_checkpoints(ckpt.find_checkpoints(max_num_checkpoints=3), "model")["weight"]
    tensor([[3.]])
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from fbrain.checkpoint.recoverables import read_state_dict


def average_state_dicts(state_dicts: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of ``state_dicts`` (an iterable: two are held at a time), as SpeechBrain computes it."""
    iterator = iter(state_dicts)
    try:
        total = dict(next(iterator))
    except StopIteration:
        raise ValueError("average_state_dicts: no state_dicts to average; give at least one checkpoint") from None
    count = 1
    with torch.no_grad():
        for state in iterator:
            if state.keys() != total.keys():
                raise KeyError(f"average_state_dicts: state_dict {count} has other names: missing "
                               f"{sorted(total.keys() - state.keys())}, extra {sorted(state.keys() - total.keys())}")
            for name, value in state.items():
                total[name] = total[name] + value
            count += 1
        return {name: value / float(count) for name, value in total.items()}


def average_checkpoints(checkpoint_list: Iterable[Any], recoverable_name: str,
                        parameter_loader: Callable[[Any], Any] = read_state_dict,
                        averager: Callable[[Iterable[Any]], Any] = average_state_dicts) -> Any:
    """The average of recoverable ``recoverable_name`` over ``checkpoint_list`` (from
    ``Checkpointer.find_checkpoints``), as SpeechBrain's function of that name: load it into the
    module with ``module.load_state_dict(...)``."""
    checkpoints = list(checkpoint_list)
    for c in checkpoints:
        if recoverable_name not in c.paramfiles:
            raise KeyError(f"average_checkpoints: {c.path} has no file for {recoverable_name!r}; it has "
                           f"{sorted(c.paramfiles)}")
    return averager(parameter_loader(c.paramfiles[recoverable_name]) for c in checkpoints)
