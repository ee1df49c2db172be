"""Checkpoints: msgpack files (never pickle), written atomically and verified on loading.

Example::

    >>> import tempfile, os, torch, fbrain
    >>> from fbrain import checkpoint, optim
    >>> state = fbrain.TrainState.create(torch.nn.Linear(2, 1), optim.adam(1e-3))
    >>> path = os.path.join(tempfile.mkdtemp(), "state.fbrain")
    >>> checkpoint.save(path, state)
    >>> back = checkpoint.load(path, template=state)
    >>> torch.equal(back.params["weight"], state.params["weight"])
    True
"""

from fbrain.checkpoint.averaging import average_checkpoints, average_state_dicts
from fbrain.checkpoint.checkpointer import (Checkpoint, Checkpointer, MissingRecoverableError, mark_as_loader,
                                           mark_as_saver)
from fbrain.checkpoint.files import atomic_open, from_bytes, fsync_dir, load, save, write_atomic
from fbrain.checkpoint.reading import read
from fbrain.checkpoint.restore import restore
from fbrain.checkpoint.serialization import CheckpointError, register_type, to_bytes, write
from fbrain.checkpoint.speechbrain_import import find_speechbrain_checkpoint, import_speechbrain
from fbrain.loss_scale import LossScaleState
from fbrain.optim import AdamState, AdaptiveState, EmaState, EmptyState, RMSpropState, SGDState
from fbrain.optim.hyperparams import Static
from fbrain.state import Counters, TrainState

for _cls in (TrainState, Counters, LossScaleState, AdamState, SGDState, RMSpropState, EmptyState, EmaState, AdaptiveState, Static):
    register_type(_cls)

__all__ = [
    "Checkpoint", "Checkpointer", "average_checkpoints", "average_state_dicts", "mark_as_loader", "mark_as_saver", "CheckpointError", "MissingRecoverableError", "atomic_open", "find_speechbrain_checkpoint", "from_bytes", "fsync_dir",
    "import_speechbrain", "load", "read", "register_type", "restore",
    "save", "to_bytes", "write", "write_atomic",
]
