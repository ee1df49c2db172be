"""SpeechBrain's ``Checkpointer``: named recoverables saved together in ``CKPT+<time>`` folders.

A checkpoint is a folder holding one file per recoverable (``<name>.fbrain`` in fbrain's msgpack
format, never pickle; ``<name>.ckpt`` for a module, in torch's format so SpeechBrain's tools read it,
and where a custom or SpeechBrain hook writes it) and a
``CKPT.yaml`` metadata file (written as JSON, which YAML readers accept, with its own checksum).
A folder is written under a temporary name and renamed when complete, so a crash mid-save leaves
no folder that looks like a checkpoint; the leftovers are ignored and removed later. When the
newest checkpoint turns out damaged, :meth:`Checkpointer.recover_if_possible` warns and falls back
to the newest intact one; a checkpoint loads all its recoverables or changes none
(:mod:`fbrain.checkpoint.recoverables`).

Example::

    >>> import tempfile, torch
    >>> from fbrain.checkpoint import Checkpointer
    >>> model = torch.nn.Linear(2, 2)
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), {"model": model})
    >>> saved = ckpt.save_checkpoint(meta={"loss": 0.5})
    >>> with torch.no_grad():
    ...     _ = model.weight.zero_()
    >>> ckpt.recover_if_possible().meta["loss"], bool(model.weight.abs().sum() > 0)
    (0.5, True)
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import logging
import math
import operator
import os
import pathlib
import shutil
import tempfile
import time
import warnings
import zlib
from typing import Any, Callable, Mapping

import torch

from fbrain import distributed
from fbrain.checkpoint import shards, torch_files
from fbrain.checkpoint.files import fsync_dir
from fbrain.checkpoint.reading import is_fbrain_file, verify_file
from fbrain.checkpoint.recoverables import (  # noqa: F401 - mark_as_*: also importable from here
    SUFFIXES, default_save, file_name, load_all, mark_as_loader, mark_as_preparer, mark_as_saver)
from fbrain.checkpoint.serialization import CheckpointError

log = logging.getLogger(__name__)

PREFIX = "CKPT"
META_FILE = "CKPT.yaml"
TMP_MARK = ".incomplete-"
# A folder being deleted is first renamed to this (a leftover, never a checkpoint): readers see a
# checkpoint whole or not at all, never one half deleted.
DELETING_MARK = TMP_MARK + "deleted"
# How many times recovery lists the folder again when a checkpoint it listed was deleted meanwhile
# (by a writer's keep-only) before it got to load it.
RELIST_LIMIT = 20

# Only where the folder itself cannot be locked (NFS refuses an exclusive flock on a descriptor not
# open for writing): the lock is then on this file in the folder, as earlier fbrain versions had it everywhere.
LOCK_FILE = ".fbrain-writer.lock"
_NO_FOLDER_LOCK = {errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP}

Checkpoint = collections.namedtuple("Checkpoint", ["path", "meta", "paramfiles"])
Checkpoint.__doc__ = ("A saved checkpoint: its folder, its metadata, and the file of each recoverable "
                      "(pathlib.Path objects, as SpeechBrain's).")


class MissingRecoverableError(CheckpointError, RuntimeError):
    """A checkpoint has no file for a registered recoverable: a CheckpointError, and the
    RuntimeError SpeechBrain's Checkpointer raises in this case (so code catching either works)."""


# -- one writer per folder ---------------------------------------------------------------------------

class WriterLock:
    """An OS lock (``flock``) on the checkpoints folder itself, held while a Checkpointer writes or
    deletes there, so two runs on one folder cannot remove each other's checkpoints in progress. It
    adds nothing to the folder. A second writer waits up to ``timeout`` seconds, then fails naming the
    folder and the holder's PID (from ``/proc/locks``; "unknown" where that cannot be read). The
    kernel drops the lock when its process dies, so a killed run never leaves the folder locked.
    Re-entrant within one WriterLock; readers take no lock. On a file system that cannot lock a
    folder (NFS), the lock is on ``folder/.fbrain-writer.lock``, which holds the holder's PID.

    Example::

        with WriterLock("results/save", timeout=60.0):
            ...  # write, clean up
    """

    def __init__(self, folder: str, timeout: float):
        self.folder, self.timeout = folder, timeout
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> "WriterLock":
        if self._depth == 0:
            self._fd = self._acquire()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _acquire(self) -> int:
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return self._wait(fd, lambda: flock_holder(fd))
        except OSError as err:  # _wait closed fd
            if err.errno not in _NO_FOLDER_LOCK:
                raise
        fd = os.open(os.path.join(self.folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        self._wait(fd, lambda: os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _wait(self, fd: int, holder: Callable[[], str]) -> int:
        """``fd``, locked; waits up to the timeout. On any failure ``fd`` is closed."""
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise CheckpointError(
                            f"{self.folder}: another process (PID {holder()}) is writing checkpoints here; waited "
                            f"{self.timeout:g} s. Give each run its own output folder, or stop the other run") from None
                    time.sleep(0.05)
        except BaseException:
            os.close(fd)
            raise


def flock_holder(fd: int) -> str:
    """The PID of the process holding an ``flock`` on the file or folder open as ``fd``, read from
    Linux's ``/proc/locks`` (matched by device and inode), or "unknown"."""
    st = os.fstat(fd)
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks") as f:
            lines = f.readlines()
    except OSError:
        return "unknown"
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 3545 fe:00:2146659 0 EOF" (waiters: "1: -> FLOCK ...")
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == wanted and int(fields[4]) > 0:
                return fields[4]
        except ValueError:
            continue
    return "unknown"


# -- the Checkpointer ------------------------------------------------------------------------------

class Checkpointer:
    """Saves and recovers a set of named objects, with SpeechBrain's method names and semantics."""

    def __init__(self, checkpoints_dir: str | os.PathLike, recoverables: dict | None = None,
                 custom_load_hooks: dict | None = None, custom_save_hooks: dict | None = None,
                 allow_partial_load: bool = False, lock_timeout: float = 60.0):
        self.checkpoints_dir = pathlib.Path(checkpoints_dir)  # str or Path given: a Path, as SpeechBrain's
        os.makedirs(self.checkpoints_dir, exist_ok=True)
        self.writer_lock = WriterLock(self.checkpoints_dir, lock_timeout)
        self.recoverables: dict[str, Any] = {}
        self.custom_load_hooks: dict[str, Callable] = {}
        self.custom_save_hooks: dict[str, Callable] = {}
        self.allow_partial_load = allow_partial_load
        # Of the folders the last listing found (no others: bounded by what is on disk): the
        # recoverables each saved, and its metadata file's bytes (which checkpoint the folder held).
        self._saved_names: dict[pathlib.Path, frozenset] = {}
        self._listed_meta: dict[pathlib.Path, bytes] = {}
        for name, obj in (recoverables or {}).items():
            self.add_recoverable(name, obj, (custom_save_hooks or {}).get(name),
                                 (custom_load_hooks or {}).get(name))

    def add_recoverable(self, name: str, obj: Any, custom_save_hook: Callable | None = None,
                        custom_load_hook: Callable | None = None, optional_load: bool = False) -> None:
        if not isinstance(name, str) or not name or os.sep in name:
            raise ValueError(f"recoverable name: expected a non-empty file-name-safe string, got {name!r}")
        if name in self.recoverables:
            raise ValueError(f"recoverable {name!r} is already registered")
        self.recoverables[name] = obj
        if custom_save_hook is not None:
            self.custom_save_hooks[name] = custom_save_hook
        if custom_load_hook is not None:
            self.custom_load_hooks[name] = custom_load_hook

    def add_recoverables(self, recoverables: dict) -> None:
        for name, obj in recoverables.items():
            self.add_recoverable(name, obj)

    # -- saving ----------------------------------------------------------------------------------

    def _new_folder_name(self, name: str | None) -> str:
        stamp = name or time.strftime("%Y-%m-%d+%H-%M-%S")
        for n in range(100):
            candidate = f"{PREFIX}+{stamp}+{n:02d}"
            if not os.path.exists(os.path.join(self.checkpoints_dir, candidate)):
                return candidate
        raise FileExistsError(f"{self.checkpoints_dir}: too many checkpoints named {stamp!r}")

    def save_checkpoint(self, meta: dict | None = None, end_of_epoch: bool = True,
                        name: str | None = None, verbosity: int = logging.INFO) -> Checkpoint | None:
        """Save every recoverable into a new ``CKPT+...`` folder; it appears only once complete.

        In a distributed run rank 0 writes (the others get None), and every rank waits until it is
        written, so all can read it afterwards. A recoverable sharded across the ranks (a Brain with
        ``shard_optimizer_state``) has every rank write its own shard file into the folder
        (:mod:`fbrain.checkpoint.shards`), which must then be on a file system every rank sees; the
        folder appears only once every rank has written, and if any rank fails nothing is saved and
        every rank raises a CheckpointError naming it.
        """
        # Arguments first: a bad one is an error before anything is written (every rank checks alike).
        user_meta = checked_meta(meta)
        _check_name(name)
        # Every rank has the same recoverables, so all agree on whether the ranks write shards.
        savers = {key: saver for key, obj in self.recoverables.items()
                  if callable(saver := getattr(obj, "_fbrain_shard_saver", None))}
        main = distributed.is_main_process()
        tmp = final = None
        with contextlib.ExitStack() as held:
            try:
                failure = None
                if main:
                    try:
                        held.enter_context(self.writer_lock)
                        self._remove_leftovers()
                        final = self._new_folder_name(name)
                        tmp = tempfile.mkdtemp(prefix=f"{final}{TMP_MARK}", dir=self.checkpoints_dir)
                    except Exception as err:  # noqa: BLE001 - told to every rank below, then raised
                        failure = err
                if distributed.active():  # every rank hears whether rank 0 could start, and where
                    tmp, final, told = distributed.ddp_broadcast((tmp, final, failure and repr(failure)))
                    if told is not None and failure is None:
                        raise CheckpointError(f"{self.checkpoints_dir}: rank 0 could not start the checkpoint ({told})")
                if failure is not None:
                    raise failure
                if savers:
                    self._save_shards(savers, pathlib.Path(tmp))
                return self._write_checkpoint(tmp, final, user_meta, end_of_epoch, verbosity) if main else None
            except BaseException:
                if main and tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                distributed.barrier()

    def _save_shards(self, savers: dict[str, Callable], tmp: pathlib.Path) -> None:
        """Every rank writes its shard files into ``tmp``; raises on every rank if any rank failed."""
        error = None
        try:
            for key, save_shard in savers.items():
                paramfile = tmp / file_name(key, self.recoverables[key], self.custom_save_hooks.get(key))
                save_shard(shards.folder_of(paramfile))
        except Exception as err:  # noqa: BLE001 - every rank must hear of it before anyone raises
            error = err
        failed = distributed.failures_across_ranks(error)
        if failed:
            listed = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items()))
            raise CheckpointError(f"{self.checkpoints_dir}: not every rank could write its shard of the checkpoint "
                                  f"({listed}); nothing was saved") from error

    def _write_checkpoint(self, tmp, final, user_meta, end_of_epoch, verbosity) -> Checkpoint:
        """``user_meta``: the caller's metadata as :func:`checked_meta` gave it (as it will read back)."""
        paramfiles = {}
        for key, obj in self.recoverables.items():
            hook = self.custom_save_hooks.get(key)
            path = pathlib.Path(tmp, file_name(key, obj, hook))  # hooks get a Path, as SpeechBrain's do
            hook(obj, path) if hook is not None else default_save(obj, path)
            paramfiles[key] = path
        full_meta = {**user_meta, "end-of-epoch": bool(end_of_epoch), "unixtime": time.time()}
        # The names saved, under the checksum: a file missing later is damage, a recoverable not
        # named was added after this checkpoint (see _refuse_a_recoverable_no_checkpoint_has).
        stored = {**full_meta, RECOVERABLES_KEY: sorted(paramfiles)}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({**stored, CHECKSUM_KEY: meta_checksum(stored)}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        os.replace(tmp, os.path.join(self.checkpoints_dir, final))
        fsync_dir(self.checkpoints_dir)
        path = self.checkpoints_dir / final
        log.log(verbosity, "saved checkpoint %s", path)
        return Checkpoint(path, full_meta, {k: path / v.name for k, v in paramfiles.items()})

    def save_and_keep_only(self, meta=None, end_of_epoch=True, name=None, num_to_keep=1, keep_recent=True,
                           importance_keys=None, max_keys=None, min_keys=None, ckpt_predicate=None,
                           verbosity=logging.INFO) -> None:
        """Save, then delete the checkpoints that are neither among the best nor the most recent.
        Returns None, as SpeechBrain's does (``find_checkpoint`` gives the one saved).

        Every argument is checked before anything is written (SpeechBrain's saves first and then
        fails in its deletion): ``num_to_keep`` an int >= 0 (SpeechBrain's rule), ``max_keys`` /
        ``min_keys`` lists of metadata keys (str), ``importance_keys`` a list of functions,
        ``ckpt_predicate`` a function or None, ``meta`` a mapping of storable values."""
        check_keep_arguments(num_to_keep, min_keys, max_keys, importance_keys, ckpt_predicate, verbosity)
        checked_meta(meta)
        _check_name(name)
        saved = self.save_checkpoint(meta=meta, end_of_epoch=end_of_epoch, name=name, verbosity=verbosity)
        keys = list(importance_keys or [])
        if keep_recent:
            keys.append(_recency)
        self.delete_checkpoints(num_to_keep=num_to_keep, max_keys=max_keys, min_keys=min_keys,
                                importance_keys=keys, ckpt_predicate=ckpt_predicate, verbosity=verbosity,
                                # keep_recent: the checkpoint just written is the recent one, whatever
                                # another folder's (possibly tampered) time says.
                                _keep=None if saved is None or not keep_recent else saved.path)

    # -- finding -----------------------------------------------------------------------------------

    def list_checkpoints(self) -> list[Checkpoint]:
        """Every complete checkpoint folder (leftovers of interrupted saves are not checkpoints).

        A folder deleted while it is listed (another process's keep-only) is left out without a
        word; one whose metadata is damaged is left out with a warning."""
        return self._list()[0]

    def _list(self) -> tuple[list[Checkpoint], bool]:
        """The checkpoints, and whether a folder listed was deleted before it could be read (then a
        checkpoint saved meanwhile may be missing: recovery lists again)."""
        found, saved_names, listed_meta, gone = [], {}, {}, False
        for entry in sorted(os.listdir(self.checkpoints_dir)):
            path = self.checkpoints_dir / entry
            if not entry.startswith(PREFIX + "+") or TMP_MARK in entry:
                continue
            if not os.path.isdir(path):
                gone = gone or not os.path.lexists(path)  # deleted since the folder was listed
                continue
            try:
                with open(os.path.join(path, META_FILE), "rb") as f:
                    raw = f.read()
                meta = json.loads(raw)
                if not isinstance(meta, dict):
                    raise ValueError("not a mapping")
                stored = meta.pop(CHECKSUM_KEY, None)
                # Checkpoints of fbrain 0.1 have no checksum; any other must match.
                if stored is not None and stored != meta_checksum(meta):
                    raise ValueError("checksum mismatch: changed after it was written")
                names = meta.pop(RECOVERABLES_KEY, None)  # fbrain 0.3 on
                paramfiles = {}
                for f in sorted(os.listdir(path), key=lambda f: f.endswith(SUFFIXES[0])):  # .fbrain wins
                    stem, suffix = os.path.splitext(f)
                    if suffix in SUFFIXES:
                        paramfiles[stem] = path / f
            except (OSError, ValueError) as err:
                if not os.path.isdir(path):
                    gone = True
                    continue  # deleted since it was listed: not damage
                log.warning("ignoring %s: its %s is damaged or unreadable (%s)", path, META_FILE, err)
                continue
            if names is not None:
                saved_names[path] = frozenset(map(str, names))
            listed_meta[path] = raw
            found.append(Checkpoint(path, meta, paramfiles))
        # What each listed checkpoint saved; only folders listed now (bounded by what is on disk).
        self._saved_names, self._listed_meta = saved_names, listed_meta
        return found, gone

    def find_checkpoints(self, importance_key=None, max_key=None, min_key=None, ckpt_predicate=None,
                         max_num_checkpoints=None) -> list[Checkpoint]:
        """Checkpoints ordered from best to worst (default: newest first)."""
        return self._ranked(self.list_checkpoints(), importance_key, max_key, min_key, ckpt_predicate,
                            max_num_checkpoints)

    @staticmethod
    def _ranked(listed, importance_key=None, max_key=None, min_key=None, ckpt_predicate=None,
                max_num_checkpoints=None) -> list[Checkpoint]:
        key = _importance(importance_key, max_key, min_key)
        candidates = [c for c in listed
                      if (ckpt_predicate is None or ckpt_predicate(c))
                      and (max_key is None or max_key in c.meta) and (min_key is None or min_key in c.meta)]
        # Newest first, then by importance: a stable sort keeps ties newest first (SpeechBrain's order).
        candidates.sort(key=_recency, reverse=True)
        ranked = sorted(candidates, key=key, reverse=True)
        return ranked if max_num_checkpoints is None else ranked[:max_num_checkpoints]

    def find_checkpoint(self, importance_key=None, max_key=None, min_key=None, ckpt_predicate=None):
        """The best checkpoint, or None."""
        ranked = self.find_checkpoints(importance_key, max_key, min_key, ckpt_predicate)
        return ranked[0] if ranked else None

    # -- recovering --------------------------------------------------------------------------------

    def verify_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Raise a CheckpointError unless every file the recoverables need is there, a regular file,
        and (fbrain's files) intact: what recovery checks before it changes anything."""
        for key in self.recoverables:
            path = checkpoint.paramfiles.get(key)
            if path is None:
                if self.allow_partial_load:
                    continue
                raise MissingRecoverableError(
                    f"{checkpoint.path}: has no file for recoverable {key!r}; pass allow_partial_load=True to "
                    "the Checkpointer to load the others and keep it as it is, or recover from another checkpoint")
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: not a regular file")
            try:
                fbrain_file, zip_file = is_fbrain_file(path), torch_files.is_torch_zip(path)
            except OSError as err:
                raise CheckpointError(f"{path}: cannot be read ({err})") from None
            if fbrain_file:
                verify_file(path)
            elif zip_file:
                torch_files.verify(path)
            if os.path.isdir(shards.folder_of(path)):  # saved sharded: every rank's file, too
                shards.verify(shards.folder_of(path))

    def load_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Load every recoverable from ``checkpoint``, or (raising the error) change none."""
        self.verify_checkpoint(checkpoint)
        self._load_verified(checkpoint)

    def recover_if_possible(self, importance_key=None, max_key=None, min_key=None, ckpt_predicate=None, *,
                            strict: bool = False):
        """Load the best checkpoint; if it is damaged, warn and try the next. Returns it, or None.

        Every file of a checkpoint is verified before any recoverable changes (a damaged file,
        a missing one, a directory where a file should be), and a checkpoint whose files verify
        but do not fit the recoverables (another model) changes none of them either.

        A checkpoint deleted after it was listed (another process saving with keep-only) is not
        damage: the folder is listed again (up to ``RELIST_LIMIT`` times) and the best checkpoint
        now there is loaded. When no checkpoint has ``max_key`` / ``min_key`` in its metadata,
        nothing is recovered and None returned, as SpeechBrain does, after a warning naming the
        key and the keys the checkpoints have. ``strict=True`` (fbrain's; ``Brain.evaluate`` uses
        it): when checkpoints match but none of them can be loaded, raise a CheckpointError naming
        each one's reason instead of returning None."""
        _importance(importance_key, max_key, min_key)  # a bad key is an error before anything is read
        failures: list[str] = []
        for relisted in range(RELIST_LIMIT + 1):
            listed, gone = self._list()
            candidates = self._ranked(listed, importance_key, max_key, min_key, ckpt_predicate)
            self._refuse_a_recoverable_no_checkpoint_has(candidates)
            failures = []
            gone = gone and not candidates  # (a folder deleted while listing hid the one that replaced it)
            listed_meta = dict(self._listed_meta)
            for checkpoint in candidates:
                listed_as = listed_meta.get(checkpoint.path)
                try:
                    self.verify_checkpoint(checkpoint)
                except CheckpointError as err:
                    if _replaced(checkpoint.path, listed_as):
                        gone = True
                    else:
                        failures.append(f"{checkpoint.path}: {err}")
                        warnings.warn(f"checkpoint {checkpoint.path} is damaged ({err}); nothing was loaded from "
                                      "it, trying an older one", stacklevel=2)
                        continue
                else:
                    try:
                        self._load_verified(checkpoint, listed_as)
                    except Exception as err:  # noqa: BLE001 - any failure of a recoverable's loader: fall back
                        if _replaced(checkpoint.path, listed_as):
                            gone = True
                        else:
                            failures.append(f"{checkpoint.path}: {type(err).__name__}: {err}")
                            warnings.warn(f"checkpoint {checkpoint.path} cannot be loaded ({type(err).__name__}: "
                                          f"{err}); nothing was loaded from it, trying an older one", stacklevel=2)
                            continue
                    else:
                        log.info("recovered from %s", checkpoint.path)
                        return checkpoint
                # Deleted since it was listed (nothing was loaded from it): a newer one took its place
                # (perhaps under the same name: another checkpoint saved in the same second).
                if relisted < RELIST_LIMIT:
                    log.debug("%s was deleted while recovering; listing %s again", checkpoint.path,
                              self.checkpoints_dir)
                    break
            if not gone:
                break
        if gone and not failures:
            message = (f"{self.checkpoints_dir}: every checkpoint listed was deleted before it could be loaded, "
                       f"{RELIST_LIMIT + 1} times (another process saves and deletes here faster than they load)")
            if strict:
                raise CheckpointError(message + "; nothing was changed. Recover when that process has stopped")
            log.warning("%s; nothing was recovered", message)
            return None
        if failures:
            if strict:
                raise CheckpointError(
                    f"{self.checkpoints_dir}: none of the {len(failures)} checkpoint(s) that match could be "
                    f"recovered; nothing was changed. " + "; ".join(failures) +
                    ". Recover with the objects that wrote them, or remove the folders that are damaged")
            return None
        key = max_key if max_key is not None else min_key
        if key is not None:
            self._warn_no_checkpoint_has(key, "max_key" if max_key is not None else "min_key", ckpt_predicate)
        else:
            log.info("%s: no checkpoint to recover from yet", self.checkpoints_dir)
        return None

    def _load_verified(self, checkpoint: Checkpoint, listed_as: bytes | None = None) -> None:
        """Load ``checkpoint`` (verified). With ``listed_as`` (its metadata file's bytes when it was
        listed), the folder must still hold that checkpoint once every file was read and before
        anything changes: a folder deleted meanwhile and saved again under the same name (two saves
        in one second) would otherwise give files of one checkpoint and the metadata of another."""
        def still_the_one_listed():
            if _replaced(checkpoint.path, listed_as):
                raise CheckpointError(f"{checkpoint.path}: deleted, or replaced by another checkpoint of the "
                                      "same name, while it was read; nothing was loaded from it")

        items = {key: (obj, checkpoint.paramfiles[key], self.custom_load_hooks.get(key))
                 for key, obj in self.recoverables.items() if key in checkpoint.paramfiles}
        load_all(items, bool(checkpoint.meta.get("end-of-epoch", True)), self.allow_partial_load,
                 self.custom_save_hooks, before_changing=None if listed_as is None else still_the_one_listed)

    def _warn_no_checkpoint_has(self, key: str, argument: str, ckpt_predicate) -> None:
        """SpeechBrain recovers nothing and goes on (one info line, not naming the key); fbrain goes on
        too, after a warning that says which key was asked for and which keys the checkpoints have."""
        listed = [c for c in self.list_checkpoints() if ckpt_predicate is None or ckpt_predicate(c)]
        if not listed:
            log.warning("%s: %s=%r: there is no checkpoint here; nothing was recovered (the recoverables keep "
                        "their current values)", self.checkpoints_dir, argument, key)
            return
        keys = sorted({k for c in listed for k in c.meta} - {"end-of-epoch", "unixtime"})
        log.warning("%s: %s=%r: none of the %d checkpoint(s) has %r in its metadata (they have %s); nothing was "
                    "recovered (the recoverables keep their current values, as with SpeechBrain). Pass a key "
                    "given to save_checkpoint(meta=...), or save the checkpoints with this one", self.checkpoints_dir,
                    argument, key, len(listed), key, keys or "no keys of their own")

    def _refuse_a_recoverable_no_checkpoint_has(self, candidates: list[Checkpoint]) -> None:
        """A file missing from one checkpoint is damage (recovery falls back to an older one); a
        recoverable that *no* checkpoint has a file for was added after they were written, and
        falling back would silently restart the run: an error naming it (as SpeechBrain raises)."""
        if not candidates or self.allow_partial_load:
            return
        # Only checkpoints that record what they saved can tell (fbrain 0.1 and 0.2's cannot: damage).
        missing = [key for key in self.recoverables
                   if all(key not in c.paramfiles and key not in self._saved_names.get(c.path, {key}) for c in candidates)]
        if missing:
            raise MissingRecoverableError(
                f"{self.checkpoints_dir}: no checkpoint has a file for recoverable(s) {missing} (added after the "
                f"checkpoints were written?); pass allow_partial_load=True to the Checkpointer to recover the "
                "others and keep these as they are, or remove them from the recoverables")

    # -- deleting ----------------------------------------------------------------------------------

    def delete_checkpoints(self, num_to_keep=1, min_keys=None, max_keys=None, importance_keys=None,
                           ckpt_predicate=None, verbosity=logging.INFO, _keep=None) -> None:
        """Delete checkpoints except the ``num_to_keep`` best under each importance criterion
        (rank 0 deletes in a distributed run; the others wait)."""
        check_keep_arguments(num_to_keep, min_keys, max_keys, importance_keys, ckpt_predicate, verbosity)
        if not distributed.is_main_process():
            distributed.barrier()
            return
        try:
            with self.writer_lock:
                self._delete(num_to_keep, min_keys, max_keys, importance_keys, ckpt_predicate, verbosity, _keep)
        finally:
            distributed.barrier()

    def _delete(self, num_to_keep, min_keys, max_keys, importance_keys, ckpt_predicate, verbosity, always_keep) -> None:
        criteria = [(None, k, None) for k in (max_keys or [])] + [(None, None, k) for k in (min_keys or [])]
        criteria += [(k, None, None) for k in (importance_keys or [])]
        if not criteria:
            criteria = [(_recency, None, None)]
        deletable = [c for c in self.list_checkpoints() if ckpt_predicate is None or ckpt_predicate(c)]
        keep = {always_keep}  # save_and_keep_only never deletes the checkpoint it just wrote
        for importance_key, max_key, min_key in criteria:
            ranked = self.find_checkpoints(importance_key, max_key, min_key, ckpt_predicate)
            keep.update(c.path for c in ranked[:num_to_keep])
        for checkpoint in deletable:
            if checkpoint.path not in keep:
                _delete_folder(checkpoint.path)
                self._saved_names.pop(checkpoint.path, None)
                log.log(verbosity, "deleted checkpoint %s", checkpoint.path)

    def _remove_leftovers(self) -> None:
        # Called holding the writer lock: no live writer owns an .incomplete- folder now.
        for entry in os.listdir(self.checkpoints_dir):
            if entry.startswith(PREFIX + "+") and TMP_MARK in entry:
                shutil.rmtree(os.path.join(self.checkpoints_dir, entry), ignore_errors=True)


CHECKSUM_KEY = "fbrain-checksum"
RECOVERABLES_KEY = "fbrain-recoverables"


def meta_checksum(meta: dict) -> int:
    """CRC-32 of ``meta`` as canonical JSON (sorted keys): a changed value makes it differ."""
    return zlib.crc32(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())


def _recency(checkpoint: Checkpoint) -> float:
    return checkpoint.meta.get("unixtime", 0.0)


def _replaced(path: pathlib.Path, listed_as: bytes | None) -> bool:
    """Whether checkpoint folder ``path`` no longer holds the checkpoint listed: deleted (or being
    deleted by a writer that removes files in place: its metadata file is gone), or saved again
    under the same name (its metadata, which holds the save's time, differs from ``listed_as``)."""
    try:
        with open(os.path.join(path, META_FILE), "rb") as f:
            now = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return not os.path.isdir(path)
    return listed_as is not None and now != listed_as


def _delete_folder(path: pathlib.Path) -> None:
    """Delete a checkpoint folder so readers never see it half deleted: renamed to a leftover's
    name first (one atomic step: the checkpoint is gone), then removed. Called holding the writer
    lock; a leftover from a crash here is removed by the next save."""
    doomed = path.with_name(path.name + DELETING_MARK)
    if os.path.lexists(doomed):
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _importance(importance_key, max_key, min_key):
    given = [k for k in (importance_key, max_key, min_key) if k is not None]
    if len(given) > 1:
        raise ValueError("give at most one of importance_key, max_key, min_key")
    for label, key in (("max_key", max_key), ("min_key", min_key)):
        if key is not None and not isinstance(key, str):
            raise TypeError(f"{label}: expected a metadata key (str), got {key!r:.60} ({type(key).__name__}); "
                            "for a function of a Checkpoint use importance_key")
    if importance_key is not None and not callable(importance_key):
        raise TypeError(f"importance_key: expected a function of a Checkpoint, got {importance_key!r:.60}; "
                        "for a metadata key use max_key= or min_key=")
    # A value that is not a number (NaN: the loss of a stage that had no batches) ranks below every
    # number, for max_key and min_key alike: it is never "best".
    if max_key is not None:
        return lambda c: _rank_value(c.meta[max_key], 1)
    if min_key is not None:
        return lambda c: _rank_value(c.meta[min_key], -1)
    return importance_key or _recency


def _rank_value(value, sign: int):
    if isinstance(value, float) and math.isnan(value):
        return (0, 0.0)
    return (1, value if sign > 0 else -value)


def _json_number(value):
    # Metadata often holds tensors (a stage loss) or numpy numbers: store their values, which
    # min_key / max_key then compare.
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and hasattr(value, "dtype"):  # a numpy number or array
        return value.item() if getattr(value, "size", 1) == 1 else value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"checkpoint meta: cannot store a {type(value).__name__} ({value!r:.60}); give numbers, "
                    "strings, lists or dicts of them")


def checked_meta(meta: Mapping | None) -> dict:
    """``meta`` as a checkpoint will store and read it back (tensors and numpy numbers as their
    values); a TypeError naming the culprit when it cannot be stored. Nothing is written."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta: expected a dict of numbers, strings, lists or dicts, got {type(meta).__name__} "
                        f"({meta!r:.60}); pass meta={{'loss': value}}")
    bad = [k for k in meta if not isinstance(k, str)]
    if bad:
        raise TypeError(f"meta: expected str keys, got {bad[0]!r} ({type(bad[0]).__name__}); name each value "
                        "with a string, the key that max_key / min_key select by")
    return json.loads(json.dumps(dict(meta), default=_json_number))


def _check_name(name) -> None:
    if name is not None and (not isinstance(name, str) or not name or os.sep in name or TMP_MARK in name):
        raise ValueError(f"name: expected None or a non-empty file-name-safe string (no {os.sep!r}, no "
                         f"{TMP_MARK!r}), got {name!r}; the folder is named CKPT+<name>+NN")


def check_keep_arguments(num_to_keep, min_keys, max_keys, importance_keys, ckpt_predicate,
                         verbosity=logging.INFO) -> None:
    """The arguments of ``save_and_keep_only`` / ``delete_checkpoints`` that say what to keep,
    checked before anything is written or deleted; an error naming the first that is wrong."""
    if isinstance(num_to_keep, bool) or not _is_int(num_to_keep):
        raise TypeError(f"num_to_keep: expected an int >= 0, got {num_to_keep!r} ({type(num_to_keep).__name__}); "
                        "pass how many checkpoints to keep per criterion, e.g. num_to_keep=1")
    if num_to_keep < 0:  # SpeechBrain's rule: "Must be >=0" (0 keeps none but the one just saved)
        raise ValueError(f"num_to_keep: expected an int >= 0, got {num_to_keep}; pass how many checkpoints to "
                         "keep per criterion, e.g. num_to_keep=1")
    for label, keys in (("min_keys", min_keys), ("max_keys", max_keys)):
        if keys is None:
            continue
        if not isinstance(keys, (list, tuple)) or not all(isinstance(k, str) for k in keys):
            example = f"[{keys!r}]" if isinstance(keys, str) else "['loss']"
            raise TypeError(f"{label}: expected a list of metadata keys (str), got {keys!r:.60}; "
                            f"write {label}={example}")
    if importance_keys is not None and (not isinstance(importance_keys, (list, tuple))
                                        or not all(callable(k) for k in importance_keys)):
        raise TypeError(f"importance_keys: expected a list of functions of a Checkpoint, got {importance_keys!r:.60}; "
                        "for a metadata key use max_keys=[key] or min_keys=[key]")
    if ckpt_predicate is not None and not callable(ckpt_predicate):
        raise TypeError(f"ckpt_predicate: expected None or a function of a Checkpoint returning a bool, got "
                        f"{ckpt_predicate!r:.60}")
    if isinstance(verbosity, bool) or not _is_int(verbosity):
        raise TypeError(f"verbosity: expected a logging level (int, e.g. logging.INFO), got {verbosity!r:.60}")


def _is_int(value) -> bool:
    try:
        operator.index(value)  # int, numpy integers
    except TypeError:
        return False
    return True
