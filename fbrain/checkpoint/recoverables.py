"""How one recoverable is saved and loaded, and how a checkpoint's recoverables load together.

A recoverable is saved by what it is: its own marked saver (fbrain's ``mark_as_saver`` or
SpeechBrain's), a ``torch.Generator``, a module, or anything with a ``state_dict()``. The file's
name says its format: ``<name>.fbrain`` in fbrain's own (msgpack, checksummed, never pickle);
``<name>.ckpt`` for a module, whose state_dict is written in torch's format (checksummed records,
read with ``weights_only=True``; :mod:`fbrain.checkpoint.torch_files`) so SpeechBrain's tools and
``torch.load`` read it, and for whatever a SpeechBrain hook or a custom hook writes.

Loading is a transaction. Each recoverable is first *prepared*: its file read and checked against
the object (a module's parameter names and shapes, the Brain's whole TrainState), changing nothing.
Only when every recoverable is prepared does anything change. Loaders that cannot be prepared (a
custom hook, SpeechBrain's hooks, a scheduler's ``load_state_dict``) may still fail while changing
their object; they run first, each after a backup of its object, and a failure restores the
backups before it is raised. Either every recoverable loads, or none changes.

Example::

    >>> import tempfile, os, torch
    >>> from fbrain.checkpoint import recoverables
    >>> model, folder = torch.nn.Linear(2, 2), tempfile.mkdtemp()
    >>> path = os.path.join(folder, recoverables.file_name("model", model, None))
    >>> recoverables.default_save(model, path)
    >>> os.path.basename(path)
    'model.ckpt'
    >>> recoverables.load_all({"model": (model, path, None)}, end_of_epoch=True, allow_partial=False)
"""

from __future__ import annotations

import logging
import pathlib
import sys
import shutil
import tempfile
from typing import Any, Callable, NamedTuple

import torch

from fbrain.checkpoint import torch_files
from fbrain.checkpoint.files import load, save
from fbrain.checkpoint.reading import is_fbrain_file

log = logging.getLogger(__name__)

FBRAIN_SUFFIX = ".fbrain"  # fbrain's own format
OTHER_SUFFIX = ".ckpt"  # SpeechBrain's name: modules in torch's format, or what a custom / SpeechBrain hook writes
SUFFIXES = (FBRAIN_SUFFIX, OTHER_SUFFIX)


def mark_as_saver(method: Callable) -> Callable:
    """Mark ``method(self, path)`` as the object's checkpoint saver (it writes fbrain's format).
    SpeechBrain's mark is set too, so :func:`register_with_speechbrain` can offer it to
    SpeechBrain's Checkpointer."""
    method._fbrain_saver = method._speechbrain_saver = True
    return method


def mark_as_loader(method: Callable) -> Callable:
    """Mark ``method(self, path, end_of_epoch)`` as the object's checkpoint loader."""
    method._fbrain_loader = method._speechbrain_loader = True
    return method


def register_with_speechbrain(*classes: type) -> None:
    """Make SpeechBrain's own Checkpointer save and load ``classes`` with their fbrain hooks (a
    recipe whose YAML says ``!new:speechbrain.utils.checkpoints.Checkpointer``). Does nothing
    unless SpeechBrain is already imported: fbrain never imports it (it changes global torch
    flags)."""
    module = sys.modules.get("speechbrain.utils.checkpoints")
    if module is None:
        return
    for cls in classes:
        if cls not in getattr(module, "DEFAULT_SAVE_HOOKS", {}):
            module.register_checkpoint_hooks(cls)


def mark_as_preparer(method: Callable) -> Callable:
    """Mark ``method(self, path, end_of_epoch) -> apply`` as the first half of the object's loader:
    it reads and checks the file and changes nothing; ``apply()`` then changes the object and cannot
    fail. Recovery uses it (instead of the loader) to load every recoverable or none."""
    method._fbrain_preparer = True
    return method


# The attributes that mark a method as a saver / loader: fbrain's own, then SpeechBrain's
# (``speechbrain.utils.checkpoints.mark_as_saver`` / ``mark_as_loader`` set these), so SpeechBrain's
# EpochCounter, NewBobScheduler ... are recoverables as they are, without importing SpeechBrain.
SAVER_FLAGS = ("_fbrain_saver", "_speechbrain_saver")
LOADER_FLAGS = ("_fbrain_loader", "_speechbrain_loader")


def _marked(obj: Any, flags: tuple[str, ...]):
    """The bound method of ``obj`` marked with the first of ``flags`` found, or None."""
    cls = type(obj)
    for flag in flags:
        for name in dir(cls):
            if getattr(getattr(cls, name, None), flag, False):
                return getattr(obj, name)
    return None


def file_name(name: str, obj: Any, custom_save_hook: Callable | None) -> str:
    """The file a recoverable is saved to: ``.fbrain`` when fbrain's own format holds it."""
    if custom_save_hook is not None or _marked(obj, ("_fbrain_saver",)) is None and (
            _marked(obj, ("_speechbrain_saver",)) is not None or isinstance(obj, torch.nn.Module)):
        return name + OTHER_SUFFIX
    return name + FBRAIN_SUFFIX


def default_save(obj: Any, path: str) -> None:
    """Save a recoverable by what it is: marked hooks (fbrain's or SpeechBrain's), a generator, or
    a state_dict owner (modules, LR schedulers, torch optimizers ...)."""
    saver = _marked(obj, SAVER_FLAGS)
    if saver is not None:
        return saver(path)
    if isinstance(obj, torch.Generator):
        return save(path, {"generator_state": obj.get_state()})
    if isinstance(obj, torch.nn.Module):
        return torch_files.save(path, obj.state_dict())
    if hasattr(obj, "state_dict"):
        return save(path, obj.state_dict())
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}: give it @mark_as_saver/@mark_as_loader "
                    "methods, a state_dict()/load_state_dict() pair, or custom hooks in add_recoverable")


class Prepared(NamedTuple):
    """A recoverable's load, split in two: ``apply()`` changes the object. When ``checked`` is
    False, ``apply`` could not be checked beforehand and may fail halfway."""

    apply: Callable[[], None]
    checked: bool


def read_state_dict(path: str) -> Any:
    """A module's state_dict from ``path``, verified: torch's format (what fbrain writes since 0.3,
    and SpeechBrain always) or fbrain's own (fbrain 0.1 and 0.2), told apart by the content."""
    return load(path) if is_fbrain_file(path) else torch_files.load_state_dict(path)


def _module_apply(module: torch.nn.Module, path: str, allow_partial: bool) -> Callable[[], None]:
    state = read_state_dict(path)
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a module's state_dict, got a {type(state).__name__}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if (missing or unexpected) and not allow_partial:
        raise KeyError(f"{path}: does not fit {type(module).__name__}: missing {missing}, unexpected "
                       f"{unexpected}; pass allow_partial_load=True to load what matches")
    for key in own.keys() & state.keys():
        value, expected = state[key], own[key]
        if not isinstance(expected, torch.Tensor):
            continue  # a module's extra state (get_extra_state): its own set_extra_state checks it
        if not isinstance(value, torch.Tensor) or value.shape != expected.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{path}: {key}: expected shape {tuple(expected.shape)}, got {got}")

    def apply() -> None:
        module.load_state_dict(state, strict=not allow_partial)
        if missing or unexpected:
            log.warning("partial load of %s: missing %s, unexpected %s", path, missing, unexpected)
    return apply


def _generator_apply(generator: torch.Generator, path: str) -> Callable[[], None]:
    record = load(path)
    state = record.get("generator_state") if isinstance(record, dict) else None
    if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8
            and state.shape == generator.get_state().shape):
        raise ValueError(f"{path}: expected a generator state like this generator's")
    return lambda: generator.set_state(state)


def prepare(obj: Any, path: str, end_of_epoch: bool, allow_partial: bool,
            custom_load_hook: Callable | None = None) -> Prepared:
    """Read and check what ``obj`` would load from ``path``; nothing changes until ``apply()``."""
    if custom_load_hook is not None:
        return Prepared(lambda: custom_load_hook(obj, path, end_of_epoch), checked=False)
    preparer = _marked(obj, ("_fbrain_preparer",))
    if preparer is not None:
        return Prepared(preparer(path, end_of_epoch), checked=True)
    loader = _marked(obj, LOADER_FLAGS)
    if loader is not None:
        return Prepared(lambda: loader(path, end_of_epoch), checked=False)
    if isinstance(obj, torch.Generator):
        return Prepared(_generator_apply(obj, path), checked=True)
    if isinstance(obj, torch.nn.Module):
        return Prepared(_module_apply(obj, path, allow_partial), checked=True)
    if hasattr(obj, "load_state_dict"):
        state = load(path)
        return Prepared(lambda: obj.load_state_dict(state), checked=False)
    raise TypeError(f"cannot recover a {type(obj).__name__}: it has no loader")


def default_load(obj: Any, path: str, end_of_epoch: bool, allow_partial: bool) -> None:
    """Load one recoverable from ``path`` (checked first where its kind allows)."""
    prepare(obj, path, end_of_epoch, allow_partial).apply()


def load_all(items: dict[str, tuple[Any, str, Callable | None]], end_of_epoch: bool,
             allow_partial: bool, save_hooks: dict[str, Callable] | None = None,
             before_changing: Callable[[], None] | None = None) -> None:
    """Load ``{name: (obj, path, custom_load_hook)}`` as one transaction (see the module's doc):
    if any recoverable fails, every object is as it was and the error is raised. An unchecked
    recoverable that cannot be backed up (a load hook without a save hook, no ``state_dict``) is
    loaded without a backup, after a warning: it alone could be left half-loaded.
    ``before_changing`` runs once every checked file was read, before any object changes; what it
    raises aborts the load (the Checkpointer checks that the folder is still the one it listed)."""
    prepared = {name: prepare(obj, path, end_of_epoch, allow_partial, hook)
                for name, (obj, path, hook) in items.items()}
    if before_changing is not None:
        before_changing()
    save_hooks = save_hooks or {}
    backup_dir = tempfile.mkdtemp(prefix="fbrain-recovery-")
    try:
        backups = {name: _backup(name, items[name][0], save_hooks.get(name), backup_dir)
                   for name, p in prepared.items() if not p.checked}
        # Unchecked loaders first (they may fail), then the checked ones (which cannot).
        order = [n for n, p in prepared.items() if not p.checked] + [n for n, p in prepared.items() if p.checked]
        done = []
        try:
            for name in order:
                done.append(name)
                prepared[name].apply()
        except BaseException:
            for name in done:  # the failed one too: it may have changed part of its object
                if backups.get(name) is not None:
                    _restore(name, items[name], backups[name])
            raise
    finally:
        shutil.rmtree(backup_dir, ignore_errors=True)


def _backup(name: str, obj: Any, save_hook: Callable | None, folder: str) -> pathlib.Path | None:
    """A copy of ``obj`` as it is now, in ``folder``; None (and a warning) when it cannot be saved."""
    path = pathlib.Path(folder, file_name(name, obj, save_hook))  # hooks get Paths, as from the Checkpointer
    try:
        save_hook(obj, path) if save_hook is not None else default_save(obj, path)
    except TypeError as err:  # nothing saves it: a load-only recoverable
        log.warning("recovery: %s cannot be backed up (%s); it is loaded without a way back", name, err)
        return None
    return path


def _restore(name: str, item: tuple, backup: str) -> None:
    obj, _, hook = item
    try:
        prepare(obj, backup, True, True, hook).apply()
    except Exception as err:  # noqa: BLE001 - report, and raise the original failure
        log.error("recovery: could not put %s back as it was before the failed load: %s", name, err)
