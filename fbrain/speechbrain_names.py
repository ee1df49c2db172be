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
its names does, and then fbrain puts back the global torch flags that import changed
(:data:`SPEECHBRAIN_FLAGS`), so ``sb.dataio.dataset`` leaves torch as it found it.

Example::

    >>> import fbrain as sb
    >>> sb.utils.checkpoints.Checkpointer is sb.Checkpointer
    True
    >>> sb.utils.epoch_loop.EpochCounter is sb.EpochCounter
    True
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any, Callable, Iterator

import torch

from fbrain import torch_compat

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

# The global torch flags importing SpeechBrain changes, put back after each SpeechBrain import fbrain
# makes. SpeechBrain 1.x applies its "quirks" on import (speechbrain.utils.quirks): TF32 on for CUDA
# matmuls and cuDNN, TorchScript's profiling executor and mode off, cuDNN benchmarking off on ROCm.
# Measured with torch 2.11 and SpeechBrain 1.1 (every torch.backends flag, the float32 matmul
# precision, deterministic/grad/threads/default dtype compared before and after the import): on CPU
# what changes is cuda.matmul.allow_tf32 (False -> True; torch reports the same switch as
# get_float32_matmul_precision() "highest" -> "high" and cuda.matmul.fp32_precision "none" -> "tf32")
# and the two TorchScript switches; cudnn.allow_tf32 is already on by default, and changes only where
# it was turned off. torch has an older API (allow_tf32, the float32 matmul precision) and a newer one
# (fp32_precision) for one state, and refuses a CUDA matmul while they disagree: the older switches
# are put back first (they also set the newer ones, mkldnn.matmul's included, which is listed for
# that), then the newer ones, so both read as before. Only a flag whose value differs is written.
SPEECHBRAIN_FLAGS = (
    "float32_matmul_precision", "cuda.matmul.fp32_precision", "mkldnn.matmul.fp32_precision",
    "cudnn.allow_tf32", "cudnn.conv.fp32_precision", "cudnn.rnn.fp32_precision",
    "cudnn.benchmark", "jit_profiling",
)


def _flag_access(name: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    """The reader and writer of one of :data:`SPEECHBRAIN_FLAGS`."""
    if name == "float32_matmul_precision":
        return torch.get_float32_matmul_precision, torch.set_float32_matmul_precision
    if name == "jit_profiling":
        return torch_compat.jit_profiling, torch_compat.set_jit_profiling
    *parents, attribute = name.split(".")
    owner = torch.backends
    for part in parents:
        owner = getattr(owner, part)
    return (lambda: getattr(owner, attribute)), (lambda value: setattr(owner, attribute, value))


@contextlib.contextmanager
def _torch_flags_kept() -> Iterator[None]:
    """The block may import SpeechBrain: afterwards :data:`SPEECHBRAIN_FLAGS` read as before it."""
    saved = {}
    for name in SPEECHBRAIN_FLAGS:
        try:
            read, write = _flag_access(name)
            saved[name] = (read(), read, write)
        except AttributeError:  # not in this torch: nothing SpeechBrain can change there
            continue
        except RuntimeError:  # torch's two TF32 APIs already disagree (the caller mixed them): leave it
            continue
    try:
        yield
    finally:
        for name, (value, read, write) in saved.items():
            try:
                changed = read() != value
            except RuntimeError:  # the APIs disagree now: the older switch, written back, settles it
                changed = True
            if changed:
                write(value)


MISSING = ("fbrain.{path} is SpeechBrain's speechbrain.{path}, and SpeechBrain is not installed "
           "({error}); install it with fbrain's `speechbrain` extra: pip install 'fbrain[speechbrain]'")


def _fbrain_object(spec: str) -> Any:
    module, attribute = spec.split(":")
    return getattr(importlib.import_module(module), attribute)


def _speechbrain_module(path: str) -> types.ModuleType | None:
    """``speechbrain.<path>`` if it is a module (imported now), else None (an attribute, then)."""
    with _torch_flags_kept():
        return _import_speechbrain_module(path)


def _import_speechbrain_module(path: str) -> types.ModuleType | None:
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
        with _torch_flags_kept():  # SpeechBrain's packages import their modules when first asked
            found = parent is not None and hasattr(parent, name)
            value = getattr(parent, name) if found else None
        if not found:
            raise AttributeError(f"fbrain.{self._path} (SpeechBrain's speechbrain.{self._path}) has no "
                                 f"attribute {name!r}")
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
