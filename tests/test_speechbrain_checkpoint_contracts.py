"""Contracts of SpeechBrain's own checkpoint tests that fbrain's Checkpointer keeps.

- A checkpoint without a file for a registered recoverable: recovery raises a RuntimeError
  (SpeechBrain's test_checkpointer), which is also fbrain's CheckpointError.
- After a save the folder holds the checkpoint folders and nothing of fbrain's
  (SpeechBrain's test_parallel_checkpoint, under 2 gloo ranks), while one writer at a time is kept.
- ``fbrain.checkpoint.load`` given a folder says what to do instead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, trees_equal
from fbrain import checkpoint
from fbrain.checkpoint import Checkpointer, CheckpointError, MissingRecoverableError
from fbrain.checkpoint import checkpointer as checkpointer_module


def linear(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(2, 2)


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# -- a recoverable no checkpoint has -----------------------------------------------------------------

def test_a_recoverable_missing_from_the_checkpoint_is_a_runtime_error_and_a_checkpoint_error(tmp_path):
    a = linear(0)
    Checkpointer(tmp_path, {"a": a}).save_checkpoint()
    a_saved, b = weights(a), linear(1)
    recoverer = Checkpointer(tmp_path, {"a": linear(2), "b": b})
    before = (weights(recoverer.recoverables["a"]), weights(b))
    with pytest.raises(RuntimeError, match=r"no checkpoint has a file for recoverable\(s\) \['b'\]"):
        recoverer.recover_if_possible()  # SpeechBrain's test: pytest.raises(RuntimeError)
    with pytest.raises(CheckpointError, match="allow_partial_load=True"):  # fbrain's callers: unchanged
        recoverer.recover_if_possible()
    assert issubclass(MissingRecoverableError, CheckpointError) and issubclass(MissingRecoverableError, RuntimeError)
    assert issubclass(MissingRecoverableError, ValueError)  # CheckpointError was, and is, a ValueError
    # Nothing changed.
    assert trees_equal(weights(recoverer.recoverables["a"]), before[0]) and trees_equal(weights(b), before[1])

    # Added to the Checkpointer that saved (SpeechBrain's test adds it to the same object): the same.
    same = Checkpointer(tmp_path / "same", {"a": linear(3)})
    same.save_checkpoint()
    same.add_recoverable("b", linear(4))
    with pytest.raises(MissingRecoverableError):
        same.recover_if_possible()

    # allow_partial_load keeps its behaviour: "a" is recovered, "b" stays as it was.
    partial = Checkpointer(tmp_path, {"a": linear(5), "b": b}, allow_partial_load=True)
    found = partial.recover_if_possible()
    assert found is not None and sorted(found.paramfiles) == ["a"]
    assert trees_equal(weights(partial.recoverables["a"]), a_saved) and trees_equal(weights(b), before[1])


def test_loading_a_given_checkpoint_without_a_recoverables_file_is_the_same_error(tmp_path):
    saved = Checkpointer(tmp_path, {"a": linear(0)}).save_checkpoint()
    recoverer = Checkpointer(tmp_path, {"a": linear(1), "b": linear(2)})
    for check in (recoverer.verify_checkpoint, recoverer.load_checkpoint):
        expected = rf"{re.escape(saved.path.name)}: has no file for recoverable 'b'"
        with pytest.raises(MissingRecoverableError, match=expected):
            check(saved)
    Checkpointer(tmp_path, {"a": linear(1), "b": linear(2)}, allow_partial_load=True).load_checkpoint(saved)


def test_a_file_lost_from_the_newest_checkpoint_still_falls_back_to_an_older_one(tmp_path):
    # A file missing from one checkpoint is damage (recovery warns and goes on), not the error above.
    ckpt = Checkpointer(tmp_path, {"a": linear(0), "b": linear(1)})
    older = ckpt.save_checkpoint(meta={"n": 1})
    newer = ckpt.save_checkpoint(meta={"n": 2})
    os.remove(newer.paramfiles["b"])
    with pytest.warns(UserWarning, match="has no file for recoverable 'b'"):
        assert ckpt.recover_if_possible().path == older.path


# -- nothing of fbrain's in the folder; one writer at a time --------------------------------------

def test_after_a_save_the_folder_holds_only_checkpoints(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpts", {"a": linear(0)})
    first = ckpt.save_checkpoint(name="test")
    assert os.listdir(ckpt.checkpoints_dir) == [first.path.name]
    ckpt.save_and_keep_only(num_to_keep=2)
    ckpt.save_and_keep_only(num_to_keep=2)
    kept = sorted(c.path.name for c in ckpt.list_checkpoints())
    assert len(kept) == 2 and sorted(os.listdir(ckpt.checkpoints_dir)) == kept
    ckpt.delete_checkpoints(num_to_keep=0)
    assert os.listdir(ckpt.checkpoints_dir) == []


def test_after_a_save_under_two_gloo_ranks_every_rank_sees_only_the_checkpoint(tmp_path):
    # SpeechBrain's test_parallel_checkpoint.
    from test_distributed import torchrun

    torchrun(tmp_path, script=REPO / "tests" / "scripts" / "ddp_checkpoint_listing.py")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    saved = ranks[0]["saved"]
    assert saved is not None and saved.startswith("CKPT+test") and ranks[1]["saved"] is None
    assert [r["listing"] for r in ranks] == [[saved], [saved]]


HOLDER = """
import sys, time
from fbrain.checkpoint import Checkpointer
with Checkpointer(sys.argv[1]).writer_lock:
    open(sys.argv[2], "w").close()  # tell the test the lock is held
    time.sleep(float(sys.argv[3]))
"""


def hold_lock(folder, flag, seconds):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(flag), str(seconds)])
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert holder.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return holder


def test_a_second_process_writing_the_folder_fails_naming_it_and_the_holders_pid(tmp_path):
    folder = tmp_path / "ckpts"
    holder = hold_lock(folder, tmp_path / "held", 60)
    try:
        assert os.listdir(folder) == []  # the lock is held, and adds nothing to the folder
        second = Checkpointer(folder, {"a": linear(0)}, lock_timeout=0.3)
        started = time.monotonic()
        expected = rf"^{re.escape(str(folder))}: another process \(PID {holder.pid}\) is writing"
        with pytest.raises(CheckpointError, match=expected):
            second.save_checkpoint()
        assert time.monotonic() - started >= 0.3  # it waited for lock_timeout
        with pytest.raises(CheckpointError, match=rf"PID {holder.pid}"):
            second.delete_checkpoints()
        assert os.listdir(folder) == []
    finally:
        holder.kill()
        holder.wait(timeout=60)
    # The kernel dropped the killed holder's lock: the folder is writable at once.
    saved = Checkpointer(folder, {"a": linear(0)}, lock_timeout=0.3).save_checkpoint()
    assert os.listdir(folder) == [saved.path.name]


def test_the_lock_is_reentrant_and_one_lock_per_folder_in_a_process_too(tmp_path):
    ckpt = Checkpointer(tmp_path, {"a": linear(0)})
    with ckpt.writer_lock:
        with ckpt.writer_lock:
            ckpt.save_and_keep_only()  # takes the lock again inside
        other = checkpointer_module.WriterLock(ckpt.checkpoints_dir, timeout=0.1)
        with pytest.raises(CheckpointError, match=rf"another process \(PID {os.getpid()}\)"):
            with other:
                pass
    with other:  # released once the outermost block ended
        pass
    assert len(os.listdir(tmp_path)) == 1


def test_the_holders_pid_is_unknown_where_proc_locks_cannot_be_read(tmp_path, monkeypatch):
    def no_proc(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpointer_module, "open", no_proc, raising=False)
    with checkpointer_module.WriterLock(tmp_path, timeout=60):
        with pytest.raises(CheckpointError, match=r"another process \(PID unknown\)"):
            with checkpointer_module.WriterLock(tmp_path, timeout=0.1):
                pass


def test_a_lock_file_left_by_an_earlier_fbrain_is_left_alone(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / ".fbrain-writer.lock").write_text("12345")
    ckpt = Checkpointer(folder, {"a": linear(0)})
    saved = ckpt.save_checkpoint()
    ckpt.save_and_keep_only()
    assert sorted(os.listdir(folder)) == sorted([".fbrain-writer.lock", ckpt.find_checkpoint().path.name])
    assert (folder / ".fbrain-writer.lock").read_text() == "12345"
    assert saved.path.name not in os.listdir(folder)
    assert Checkpointer(folder, {"a": linear(1)}).recover_if_possible() is not None


def test_where_a_folder_cannot_be_locked_the_lock_file_keeps_one_writer(tmp_path, monkeypatch):
    # NFS refuses an exclusive flock on a descriptor open only for reading (EBADF), as a folder's is.
    flock = fcntl.flock

    def nfs_flock(fd, operation):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    ckpt = Checkpointer(tmp_path, {"a": linear(0)})
    with ckpt.writer_lock:
        assert (tmp_path / ".fbrain-writer.lock").read_text() == str(os.getpid())
        with pytest.raises(CheckpointError, match=rf"another process \(PID {os.getpid()}\)"):
            with checkpointer_module.WriterLock(tmp_path, timeout=0.1):
                pass
    saved = ckpt.save_checkpoint()
    assert sorted(os.listdir(tmp_path)) == sorted([".fbrain-writer.lock", saved.path.name])


# -- load() given a folder ---------------------------------------------------------------------------

def test_loading_a_folder_is_a_checkpoint_error_naming_the_fix(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpts", {"a": linear(0)})
    saved = ckpt.save_checkpoint()
    for folder in (ckpt.checkpoints_dir, saved.path, str(saved.path)):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder))}: cannot be read: it is a folder; "
                                                  r"expected a checkpoint file .*"
                                                  r"Checkpointer\(folder\)\.recover_if_possible\(\)"):
            checkpoint.load(folder)
    with pytest.raises(FileNotFoundError, match="nope.fbrain"):  # a missing file: as before
        checkpoint.load(tmp_path / "nope.fbrain")


def test_loading_a_fifo_fails_at_once_instead_of_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "state.fbrain"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="state.fbrain: cannot be read: not a regular file"):
        checkpoint.load(fifo)
