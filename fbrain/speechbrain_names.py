"""``import fbrain as sb``: SpeechBrain's names, with fbrain's objects where fbrain has them.

A SpeechBrain recipe reaches far past the Brain: ``sb.dataio.dataset.DynamicItemDataset``,
``sb.utils.data_pipeline.takes``, ``sb.nnet.losses.mse_loss``, ``sb.processing.features.STFT``.
``fbrain.<package>`` for SpeechBrain's packages (``dataio``, ``utils``, ``nnet`` ...) is a
:class:`SpeechBrainNamespace`: attribute by attribute, it gives fbrain's own object where fbrain
has one (the table :data:`FBRAIN_OBJECTS`: the Checkpointer, EpochCounter, MetricStats,
PaddedBatch, run_on_main ...) and SpeechBrain's otherwise, importing SpeechBrain only then, on
first use. So ``sb.utils.checkpoints.Checkpointer`` is fbrain's Checkpointer and
``sb.dataio.dataio.read_audio`` is SpeechBrain's function.

SpeechBrain comes from the optional ``speechbrain`` extra; without it, such a name is an
ImportError that names the extra. Importing SpeechBrain changes global state (it turns TF32 on
and patches the DataLoader): fbrain itself never imports it, only a recipe that asks for one of
its names does.

Example::

    >>> import fbrain as sb
    >>> sb.utils.checkpoints.Checkpointer is sb.Checkpointer
    True
    >>> sb.utils.epoch_loop.EpochCounter is sb.EpochCounter
    True
"""

from __future__ import annotations

import importlib
import types
from typing import Any

# SpeechBrain's top-level packages that ``fbrain.<name>`` stands for.
PACKAGES = frozenset({
    "alignment", "augment", "core", "dataio", "decoders", "inference", "k2_integration", "lm", "lobes",
    "nnet", "processing", "tokenizers", "utils", "wordemb",
})

# ``speechbrain.<module>.<name>`` -> fbrain's object ("module:attribute"), where fbrain has its own.
FBRAIN_OBJECTS = {
    "core.Brain": "fbrain.brain:Brain",
    "core.Stage": "fbrain.brain:Stage",
    "core.parse_arguments": "fbrain.brain:parse_arguments",
    "core.create_experiment_directory": "fbrain.brain:create_experiment_directory",
    "utils.checkpoints.Checkpointer": "fbrain.checkpoint:Checkpointer",
    "utils.checkpoints.Checkpoint": "fbrain.checkpoint:Checkpoint",
    "utils.checkpoints.average_checkpoints": "fbrain.checkpoint:average_checkpoints",
    "utils.checkpoints.average_state_dicts": "fbrain.checkpoint:average_state_dicts",
    "utils.checkpoints.mark_as_saver": "fbrain.checkpoint:mark_as_saver",
    "utils.checkpoints.mark_as_loader": "fbrain.checkpoint:mark_as_loader",
    "utils.epoch_loop.EpochCounter": "fbrain.brain:EpochCounter",
    "utils.distributed.run_on_main": "fbrain.distributed:run_on_main",
    "utils.distributed.ddp_init_group": "fbrain.distributed:ddp_init_group",
    "utils.distributed.if_main_process": "fbrain.distributed:if_main_process",
    "utils.distributed.main_process_only": "fbrain.distributed:main_process_only",
    "utils.distributed.ddp_barrier": "fbrain.distributed:ddp_barrier",
    "utils.distributed.ddp_broadcast": "fbrain.distributed:ddp_broadcast",
    "utils.metric_stats.MetricStats": "fbrain.metrics:MetricStats",
    "utils.train_logger.FileTrainLogger": "fbrain.train_logger:FileTrainLogger",
    "utils.train_logger.TensorboardLogger": "fbrain.train_logger:TensorboardLogger",
    "utils.train_logger.WandBLogger": "fbrain.train_logger:WandBLogger",
    "dataio.batch.PaddedBatch": "fbrain.data:PaddedBatch",
    "dataio.batch.PaddedData": "fbrain.data:PaddedData",
}

MISSING = ("fbrain.{path} is SpeechBrain's speechbrain.{path}, and SpeechBrain is not installed "
           "({error}); install it with fbrain's `speechbrain` extra: pip install 'fbrain[speechbrain]'")


def _fbrain_object(spec: str) -> Any:
    module, attribute = spec.split(":")
    return getattr(importlib.import_module(module), attribute)


def _speechbrain_module(path: str) -> types.ModuleType | None:
    """``speechbrain.<path>`` if it is a module (imported now), else None (an attribute, then)."""
    try:
        importlib.import_module("speechbrain")
    except ImportError as err:
        raise ImportError(MISSING.format(path=path, error=err)) from err
    try:
        return importlib.import_module(f"speechbrain.{path}")
    except ModuleNotFoundError as err:
        if err.name is not None and f"speechbrain.{path}".startswith(err.name + ".") or err.name == f"speechbrain.{path}":
            return None  # no such module: an attribute of its parent (or nothing)
        raise  # a module SpeechBrain's code needs is missing: say which


class SpeechBrainNamespace(types.ModuleType):
    """``fbrain.<path>``: SpeechBrain's module ``speechbrain.<path>``, seen through fbrain (see the
    module's doc). Attributes are looked up when asked for and not cached, so the table of fbrain's
    objects is the only thing deciding which object a name gives."""

    def __init__(self, path: str):
        super().__init__(f"fbrain.{path}", f"SpeechBrain's speechbrain.{path}, with fbrain's objects where "
                                           "fbrain has them (see fbrain.speechbrain_names)")
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # private names (and hasattr probes) never import SpeechBrain
            raise AttributeError(f"fbrain.{self._path} has no attribute {name!r}")
        full = f"{self._path}.{name}"
        if full in FBRAIN_OBJECTS:
            return _fbrain_object(FBRAIN_OBJECTS[full])
        if any(key.startswith(full + ".") for key in FBRAIN_OBJECTS):
            return SpeechBrainNamespace(full)  # on the way to an fbrain object: SpeechBrain not needed yet
        if _speechbrain_module(full) is not None:
            return SpeechBrainNamespace(full)
        parent = _speechbrain_module(self._path)
        if parent is None or not hasattr(parent, name):
            raise AttributeError(f"fbrain.{self._path} (SpeechBrain's speechbrain.{self._path}) has no "
                                 f"attribute {name!r}")
        value = getattr(parent, name)
        if isinstance(value, types.ModuleType) and value.__name__.startswith("speechbrain."):
            return SpeechBrainNamespace(value.__name__[len("speechbrain."):])
        return value

    def __dir__(self):
        module = _speechbrain_module(self._path)
        return sorted(set(dir(module) if module is not None else []))

    def __repr__(self) -> str:
        return f"<fbrain's view of speechbrain.{self._path}>"


def namespace(name: str) -> SpeechBrainNamespace:
    """``fbrain.<name>`` for one of SpeechBrain's packages (:data:`PACKAGES`)."""
    return SpeechBrainNamespace(name)
