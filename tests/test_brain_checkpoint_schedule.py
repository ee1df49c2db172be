"""The Brain's intra-epoch checkpoints by the clock, and falling back from a damaged intra-epoch
checkpoint to an end-of-epoch one without keeping the newer one's position in the epoch."""

from __future__ import annotations

import os
import shutil
import types

import pytest
import torch

import fbrain
from conftest import RegressionBrain
from fbrain.brain import checkpointing
from fbrain.checkpoint import Checkpointer


class Regression(RegressionBrain):
    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        self.losses.append(float(loss))
        if getattr(self, "clock", None) is not None:
            self.clock[0] += 25.0  # each batch "takes" 25 seconds

    def on_stage_end(self, stage, stage_loss, epoch=None):
        self.stage_losses.append(float(stage_loss))


def data(n=10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, generator=g), torch.randn(2, generator=g)) for _ in range(n)]


def make(checkpointer=None, **run_opts):
    torch.manual_seed(0)
    brain = Regression({"model": torch.nn.Linear(3, 2)}, lambda p: torch.optim.Adam(p, lr=0.01),
                       run_opts={"noprogressbar": True, **run_opts}, checkpointer=checkpointer)
    brain.losses, brain.stage_losses = [], []
    return brain


LOADER = {"batch_size": 2}  # 10 examples: 5 batches an epoch


def test_intra_epoch_checkpoints_every_n_minutes(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(checkpointing, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    brain = make(Checkpointer(tmp_path / "ckpts"), ckpt_interval_minutes=1.0)
    brain.clock = clock
    saved_at = []
    original = brain._save_intra_epoch_ckpt
    monkeypatch.setattr(brain, "_save_intra_epoch_ckpt", lambda: (saved_at.append(brain.step), original())[1])
    brain.fit(range(1), data(12), train_loader_kwargs=LOADER)  # 6 batches, 25 s each
    assert saved_at == [3, 6]  # 75 s and 150 s: each time a minute had passed since the last one
    found = brain.checkpointer.list_checkpoints()
    assert len(found) == 1 and found[0].meta["end-of-epoch"] is False  # only the newest is kept
    record = fbrain.checkpoint.load(found[0].paramfiles["brain"])
    assert record["step"] == 6

    # A clock that stands still: no checkpoint at all.
    standing = make(Checkpointer(tmp_path / "still"), ckpt_interval_minutes=1.0)
    standing.fit(range(1), data(12), train_loader_kwargs=LOADER)
    assert standing.checkpointer.list_checkpoints() == []


def resume(checkpoints_dir, **run_opts):
    brain = make(Checkpointer(checkpoints_dir), **run_opts)
    brain.checkpointer.add_recoverable("generator", torch.Generator())
    return brain


def test_falling_back_from_a_damaged_intra_epoch_checkpoint_starts_the_epoch_afresh(tmp_path):
    # Epoch 1, an end-of-epoch checkpoint, then epoch 2 leaves an intra-epoch checkpoint at step 4;
    # the generator is registered after the Brain, so its file is read after the Brain's.
    ckpt = Checkpointer(tmp_path / "ckpts")
    first = make(ckpt, ckpt_interval_steps=4)
    ckpt.add_recoverable("generator", torch.Generator().manual_seed(3))
    first.fit([1], data(), train_loader_kwargs=LOADER)
    end_of_epoch = ckpt.save_checkpoint(end_of_epoch=True)
    shutil.copytree(end_of_epoch.path, tmp_path / "only_end_of_epoch" / os.path.basename(end_of_epoch.path))
    first.fit([2], data(), train_loader_kwargs=LOADER)
    newest = ckpt.find_checkpoint()
    assert newest.meta["end-of-epoch"] is False
    assert fbrain.checkpoint.load(newest.paramfiles["brain"])["step"] == 4

    damaged = bytearray(open(newest.paramfiles["generator"], "rb").read())
    damaged[-20] ^= 0xFF
    open(newest.paramfiles["generator"], "wb").write(bytes(damaged))

    resumed = resume(tmp_path / "ckpts", ckpt_interval_steps=4)
    with pytest.warns(UserWarning, match="generator.fbrain.*trying an older one"):
        resumed.fit([2], data(), train_loader_kwargs=LOADER)
    # The Brain's file of the damaged checkpoint was read first; its position must not survive:
    # the run is exactly the one that recovers the end-of-epoch checkpoint alone.
    reference = resume(tmp_path / "only_end_of_epoch", ckpt_interval_steps=4)
    reference.fit([2], data(), train_loader_kwargs=LOADER)
    assert len(resumed.losses) == 5  # the whole of epoch 2, not only what followed step 4
    assert resumed.losses == reference.losses == first.losses[5:]
    assert resumed.stage_losses == reference.stage_losses
    for name, value in reference.state.params.items():
        assert torch.equal(resumed.state.params[name], value), name
