"""Checkpoints given what they should not trust (issue 28): another model's checkpoint in evaluate,
a key no checkpoint has, empty stages, bad keep-only arguments, folders deleted while a reader
recovers, and the Checkpointer's memory of folders long gone."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch

from conftest import REPO, RegressionBrain, trees_equal
from fbrain.checkpoint import Checkpointer, CheckpointError
from fbrain.checkpoint import checkpointer as checkpointer_module


def data(n_in, n_out, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n_in, generator=g), torch.randn(n_out, generator=g)) for _ in range(n)]


def brain(folder, model, opt=lambda p: torch.optim.Adam(p, lr=1e-2), **run_opts):
    return RegressionBrain({"model": model}, opt, run_opts={"noprogressbar": True, **run_opts},
                           checkpointer=Checkpointer(folder))


def trained(folder, model, **run_opts):
    b = brain(folder, model, **run_opts)
    b.fit(range(1), data(model.in_features, model.out_features), train_loader_kwargs={"batch_size": 4})
    b.checkpointer.save_checkpoint(meta={"loss": 0.5})
    return b


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# -- 1. evaluate verifies what it loads, as fit's recovery does ------------------------------------------

@pytest.mark.parametrize("other", ["shape", "names", "optimizer"])
def test_evaluate_refuses_another_models_checkpoint_and_changes_nothing(tmp_path, other):
    # Before: a fresh Linear(4, 2) Brain's evaluate(max_key=...) took a Linear(3, 4)'s checkpoint
    # unchecked (its modules became (4, 3)) and returned a loss.
    folder = tmp_path / "ckpts"
    torch.manual_seed(0)
    if other == "shape":
        trained(folder, torch.nn.Linear(3, 4))
        fresh, reason = brain(folder, torch.nn.Linear(4, 2)), r"params\['model.weight'\]: shape \(2, 4\) expected"
    elif other == "names":  # the same shapes under other names: model.0.weight, model.0.bias
        b = brain(folder, torch.nn.Sequential(torch.nn.Linear(4, 2)))
        b.fit(range(1), data(4, 2), train_loader_kwargs={"batch_size": 4})
        b.checkpointer.save_checkpoint(meta={"loss": 0.5})
        fresh = brain(folder, torch.nn.Linear(4, 2))
        reason = r"params: keys differ from the template: missing \['model.weight', 'model.bias'\]"
    else:  # the same model, trained with Adam; evaluated by a Brain whose optimizer is SGD
        trained(folder, torch.nn.Linear(4, 2))
        fresh = brain(folder, torch.nn.Linear(4, 2), opt=lambda p: torch.optim.SGD(p, lr=0.1))
        reason = "opt_state"
    before = weights(fresh.modules)
    with pytest.warns(UserWarning, match="cannot be loaded"), pytest.raises(CheckpointError, match=reason) as err:
        fresh.evaluate(data(4, 2), max_key="loss", test_loader_kwargs={"batch_size": 4})
    assert "nothing was changed" in str(err.value) and str(folder) in str(err.value)
    assert trees_equal(weights(fresh.modules), before)
    assert trees_equal(before, fresh.state.params)
    # fit's recovery gives the same reason for the same checkpoint (one code path), and falls back.
    fitting = brain(folder, torch.nn.Linear(4, 2), opt=fresh.opt_class)
    with pytest.warns(UserWarning, match="cannot be loaded") as seen:
        fitting.fit(range(0), data(4, 2))
    assert any(re.search(reason, str(w.message)) for w in seen)


def test_evaluate_in_a_fresh_brain_recovers_the_checkpoint_of_its_own_model(tmp_path):
    folder = tmp_path / "ckpts"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    done = trained(folder, model)
    expected = done.evaluate(data(4, 2, seed=1), test_loader_kwargs={"batch_size": 4})
    for opt in (done.opt_class, None):  # without an optimizer, its state is not loaded (SpeechBrain's)
        torch.manual_seed(1)
        fresh = brain(folder, torch.nn.Linear(4, 2), opt=opt)
        got = fresh.evaluate(data(4, 2, seed=1), max_key="loss", test_loader_kwargs={"batch_size": 4})
        assert got == expected
        assert trees_equal(fresh.state.params, done.state.params)
        if opt is not None:
            assert trees_equal(fresh.state.opt_state, done.state.opt_state)


def test_evaluating_before_fitting_changes_nothing_fit_does(tmp_path):
    # evaluate makes the state as fit would (init_optimizers): a fit afterwards starts as it would alone.
    results = []
    for evaluate_first in (False, True):
        torch.manual_seed(0)
        b = brain(tmp_path / f"ckpts{evaluate_first}", torch.nn.Linear(4, 2))
        if evaluate_first:
            b.evaluate(data(4, 2, seed=1), test_loader_kwargs={"batch_size": 4})
        b.fit(range(2), data(4, 2), train_loader_kwargs={"batch_size": 4})
        results.append(b.state)
    assert trees_equal(results[0], results[1])


def test_evaluate_with_ema_in_a_fresh_brain_loads_the_average(tmp_path):
    folder = tmp_path / "ckpts"
    torch.manual_seed(0)
    done = trained(folder, torch.nn.Linear(4, 2), ema_decay=0.5, eval_with_ema=True)
    expected = done.evaluate(data(4, 2, seed=1), test_loader_kwargs={"batch_size": 4})
    fresh = brain(folder, torch.nn.Linear(4, 2), ema_decay=0.5, eval_with_ema=True)
    assert fresh.evaluate(data(4, 2, seed=1), min_key="loss", test_loader_kwargs={"batch_size": 4}) == expected


# -- 2. a key no checkpoint has -----------------------------------------------------------------------------

def test_evaluate_with_a_key_no_checkpoint_has_warns_and_evaluates_the_weights_it_has(tmp_path, caplog):
    # SpeechBrain: find_checkpoint keeps only checkpoints with the key, recover_if_possible logs
    # "Would load a checkpoint here, but none found yet." (info) and evaluate goes on.
    folder = tmp_path / "ckpts"
    torch.manual_seed(0)
    trained(folder, torch.nn.Linear(4, 2))
    fresh = brain(folder, torch.nn.Linear(4, 2))
    before = weights(fresh.modules)
    with caplog.at_level(logging.WARNING, logger="fbrain.checkpoint.checkpointer"):
        loss = fresh.evaluate(data(4, 2), min_key="x", test_loader_kwargs={"batch_size": 4})
    assert math.isfinite(loss) and trees_equal(weights(fresh.modules), before)
    (message,) = [r.getMessage() for r in caplog.records if "min_key='x'" in r.getMessage()]
    assert "has 'x' in its metadata (they have ['loss'])" in message and "nothing was recovered" in message
    caplog.clear()
    empty = brain(tmp_path / "none", torch.nn.Linear(4, 2))
    with caplog.at_level(logging.WARNING, logger="fbrain.checkpoint.checkpointer"):
        empty.evaluate(data(4, 2), max_key="acc", test_loader_kwargs={"batch_size": 4})
    assert any("max_key='acc': there is no checkpoint here" in r.getMessage() for r in caplog.records)


def test_bad_keys_are_errors_before_anything_is_read(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpts", {"model": torch.nn.Linear(2, 2)})
    ckpt.save_checkpoint(meta={"loss": 1.0})
    with pytest.raises(TypeError, match=r"max_key: expected a metadata key \(str\), got \['loss'\]"):
        ckpt.recover_if_possible(max_key=["loss"])
    with pytest.raises(TypeError, match="importance_key: expected a function"):
        ckpt.find_checkpoint(importance_key="loss")


# -- 3. empty stages ---------------------------------------------------------------------------------------

class Recording(RegressionBrain):
    def on_stage_end(self, stage, stage_loss, epoch=None):
        self.ended = getattr(self, "ended", []) + [(stage.name, stage_loss)]


def test_an_empty_train_set_is_an_error_and_empty_eval_stages_have_a_nan_loss(tmp_path, caplog):
    # SpeechBrain hands on_stage_end 0.0 for an empty stage (avg_train_loss starts at 0.0, and so do
    # avg_valid_loss and avg_test_loss), which a min_key ranking calls the best checkpoint.
    b = Recording({"model": torch.nn.Linear(3, 2)}, lambda p: torch.optim.SGD(p, lr=0.1),
                  run_opts={"noprogressbar": True})
    with pytest.raises(ValueError, match="train_set: expected at least one batch in epoch 1, got none"):
        b.fit(range(1, 3), [], [], train_loader_kwargs={"batch_size": 4})
    assert getattr(b, "ended", []) == [] and b.step == 0
    with pytest.raises(ValueError, match="train_set: expected at least one batch"):
        b.fit(range(1), data(3, 2, n=3), train_loader_kwargs={"batch_size": 4, "drop_last": True})
    with caplog.at_level(logging.WARNING):
        b.fit(range(1), data(3, 2), [], train_loader_kwargs={"batch_size": 4})
        assert math.isnan(b.evaluate([], test_loader_kwargs={"batch_size": 4}))
    (train, valid, test) = b.ended
    assert train[0] == "TRAIN" and math.isfinite(train[1])
    assert valid[0] == "VALID" and math.isnan(valid[1]) and test[0] == "TEST" and math.isnan(test[1])
    messages = [r.getMessage() for r in caplog.records]
    assert "valid_set: expected at least one batch, got none; the VALID stage's loss is nan" in messages
    assert "test_set: expected at least one batch, got none; the TEST stage's loss is nan" in messages


def test_an_epoch_resumed_after_its_last_batch_is_not_empty(tmp_path):
    # An intra-epoch checkpoint written at the epoch's last step: the resumed epoch has no batch left.
    folder = tmp_path / "ckpts"
    first = Recording({"model": torch.nn.Linear(3, 2)}, lambda p: torch.optim.SGD(p, lr=0.1),
                      run_opts={"noprogressbar": True, "ckpt_interval_steps": 2}, checkpointer=Checkpointer(folder))
    first.fit(range(1), data(3, 2), train_loader_kwargs={"batch_size": 4})  # 2 steps: saved after the last
    again = Recording({"model": torch.nn.Linear(3, 2)}, lambda p: torch.optim.SGD(p, lr=0.1),
                      run_opts={"noprogressbar": True}, checkpointer=Checkpointer(folder))
    again.fit(range(1), data(3, 2), train_loader_kwargs={"batch_size": 4})
    assert again.ended == first.ended  # the running loss as it was, not an error


def test_a_nan_metadata_value_is_never_the_best(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpts", {"model": torch.nn.Linear(2, 2)})
    for loss in (0.7, float("nan"), 0.3, float("nan"), 0.9):
        ckpt.save_checkpoint(meta={"loss": loss})
    assert ckpt.find_checkpoint(min_key="loss").meta["loss"] == 0.3
    assert ckpt.find_checkpoint(max_key="loss").meta["loss"] == 0.9
    ranked = [c.meta["loss"] for c in ckpt.find_checkpoints(min_key="loss")]
    assert ranked[:3] == [0.3, 0.7, 0.9] and all(math.isnan(v) for v in ranked[3:])
    ckpt.delete_checkpoints(num_to_keep=2, min_keys=["loss"], importance_keys=[])
    assert sorted(c.meta["loss"] for c in ckpt.list_checkpoints()) == [0.3, 0.7]


# -- 4. keep-only arguments are checked before anything is written -------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_to_keep": -1}, ValueError, r"num_to_keep: expected an int >= 0, got -1"),
    ({"num_to_keep": 1.5}, TypeError, r"num_to_keep: expected an int >= 0, got 1.5 \(float\)"),
    ({"num_to_keep": "2"}, TypeError, r"num_to_keep: expected an int >= 0, got '2'"),
    ({"num_to_keep": True}, TypeError, r"num_to_keep: expected an int >= 0, got True"),
    ({"max_keys": "loss"}, TypeError, r"max_keys: expected a list of metadata keys \(str\), got 'loss'; "
                                      r"write max_keys=\['loss'\]"),
    ({"min_keys": [1]}, TypeError, r"min_keys: expected a list of metadata keys \(str\), got \[1\]"),
    ({"importance_keys": ["loss"]}, TypeError, r"importance_keys: expected a list of functions"),
    ({"ckpt_predicate": 5}, TypeError, r"ckpt_predicate: expected None or a function"),
    ({"verbosity": "info"}, TypeError, r"verbosity: expected a logging level"),
    ({"meta": [("loss", 1)]}, TypeError, r"meta: expected a dict"),
    ({"meta": {"loss": object()}}, TypeError, r"checkpoint meta: cannot store a object"),
    ({"meta": {1: 0.5}}, TypeError, r"meta: expected str keys, got 1"),
    ({"name": "a/b"}, ValueError, r"name: expected None or a non-empty file-name-safe string"),
])
def test_save_and_keep_only_checks_every_argument_before_writing(tmp_path, kwargs, error, match):
    folder = tmp_path / "ckpts"
    ckpt = Checkpointer(folder, {"model": torch.nn.Linear(2, 2)})
    ckpt.save_checkpoint(meta={"loss": 1.0})
    before = sorted(os.listdir(folder))
    with pytest.raises(error, match=match):
        ckpt.save_and_keep_only(**{"meta": {"loss": 0.5}, **kwargs})
    assert sorted(os.listdir(folder)) == before
    if kwargs.keys() <= {"num_to_keep", "max_keys", "min_keys", "importance_keys", "ckpt_predicate", "verbosity"}:
        with pytest.raises(error, match=match):
            ckpt.delete_checkpoints(**kwargs)
        assert sorted(os.listdir(folder)) == before


def test_num_to_keep_zero_is_allowed_as_in_speechbrain(tmp_path):
    # SpeechBrain's delete_checkpoints: "if num_to_keep < 0: raise ValueError"; 0 is accepted.
    ckpt = Checkpointer(tmp_path / "ckpts", {"model": torch.nn.Linear(2, 2)})
    ckpt.save_checkpoint()
    ckpt.save_and_keep_only(num_to_keep=0)  # keep_recent: the one just saved stays
    assert len(ckpt.list_checkpoints()) == 1
    ckpt.delete_checkpoints(num_to_keep=0)
    assert ckpt.list_checkpoints() == []


SPEECHBRAIN_CONTRACTS = r"""
import logging, sys, torch
from speechbrain.utils.checkpoints import Checkpointer
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
ckpt = Checkpointer(sys.argv[1], {"model": torch.nn.Linear(2, 2)})
ckpt.save_checkpoint(meta={"loss": 1.0})
print("KEY", ckpt.recover_if_possible(min_key="x"))
try:
    ckpt.save_and_keep_only(num_to_keep=-1)
except ValueError as err:
    print("RAISED", err, len(ckpt.list_checkpoints()))
"""


@pytest.mark.speechbrain
def test_speechbrains_behaviour_that_fbrain_follows(tmp_path):
    # In a subprocess: importing SpeechBrain changes global torch flags.
    done = subprocess.run([sys.executable, "-c", SPEECHBRAIN_CONTRACTS, str(tmp_path / "sb")], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    # No checkpoint has the key: nothing is recovered, an info line, and the run goes on.
    assert "Would load a checkpoint here, but none found yet." in done.stdout and "KEY None" in done.stdout
    # num_to_keep < 0 is a ValueError, but only after the checkpoint was written (fbrain checks first).
    assert "RAISED Number of checkpoints to keep must be positive. 2" in done.stdout


# -- 5. a reader recovering while writers save and delete --------------------------------------------------

def test_a_checkpoint_deleted_after_it_was_listed_makes_recovery_list_again(tmp_path):
    folder = tmp_path / "ckpts"
    writer = Checkpointer(folder, {"model": torch.nn.Linear(2, 2)})
    with torch.no_grad():
        writer.recoverables["model"].weight.fill_(1.0)
    writer.save_checkpoint()
    model = torch.nn.Linear(2, 2)
    reader = Checkpointer(folder, {"model": model})
    real = reader.verify_checkpoint
    calls = []

    def verify_while_another_run_saves(checkpoint):
        calls.append(checkpoint.path)
        if len(calls) == 1:  # between the listing and the verification: a keep-only save elsewhere
            with torch.no_grad():
                writer.recoverables["model"].weight.fill_(2.0)
            writer.save_and_keep_only(num_to_keep=1)
        return real(checkpoint)

    reader.verify_checkpoint = verify_while_another_run_saves
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "damaged" warning: a deleted folder is not damage
        found = reader.recover_if_possible()
    assert found is not None and found.path != calls[0] and model.weight.eq(2.0).all()
    assert not os.path.exists(calls[0]) and sorted(os.listdir(folder)) == [found.path.name]


def test_real_damage_is_still_reported_when_folders_come_and_go(tmp_path):
    folder = tmp_path / "ckpts"
    ckpt = Checkpointer(folder, {"gen": torch.Generator()})  # an .fbrain file: every byte is checksummed
    older = ckpt.save_checkpoint()
    newer = ckpt.save_checkpoint()
    path = newer.paramfiles["gen"]
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.warns(UserWarning, match=re.escape(f"checkpoint {newer.path} is damaged")):
        assert ckpt.recover_if_possible().path == older.path


WRITER = r"""
import sys, time, torch
from fbrain.checkpoint import Checkpointer
folder, wid, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
a, b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
ckpt = Checkpointer(folder, {"a": a, "b": b})
deadline, i = time.monotonic() + seconds, 0
while time.monotonic() < deadline:
    k = 2 * i + wid + 1
    with torch.no_grad():
        for m in (a, b):
            m.weight.fill_(k)
            m.bias.fill_(k)
    ckpt.save_and_keep_only(meta={"k": k}, num_to_keep=1)
    i += 1
    time.sleep(0.02)  # the other writer polls the lock every 50 ms: let it in now and then
print(i)
"""


def test_a_reader_never_misses_a_checkpoint_nor_reads_half_of_one_while_two_writers_save_and_delete(tmp_path):
    # Before: a reader's recover_if_possible returned None 44 times in 612 while a valid checkpoint
    # existed: a folder deleted between the listing and its verification read as "damaged".
    folder = tmp_path / "ckpts"
    os.makedirs(folder)
    seconds = 6.0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(w), str(seconds)],
                                stdout=subprocess.PIPE, text=True, env=env) for w in (0, 1)]
    a, b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
    reader = Checkpointer(folder, {"a": a, "b": b})
    recoveries, misses, seen = 0, 0, set()
    try:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and not reader.list_checkpoints():
            time.sleep(0.01)  # the writers' imports take a moment
        assert reader.list_checkpoints(), "no writer saved a checkpoint"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while any(w.poll() is None for w in writers):
                found = reader.recover_if_possible()
                recoveries += 1
                if found is None:
                    misses += 1
                    continue
                k = found.meta["k"]
                seen.add(k)
                for m in (a, b):  # every file of one checkpoint: never a half one
                    assert m.weight.eq(k).all() and m.bias.eq(k).all(), (k, found.path)
    finally:
        outputs = [w.communicate(timeout=60)[0] for w in writers]
    assert all(w.returncode == 0 for w in writers)
    saves = [int(out.split()[-1]) for out in outputs]
    assert misses == 0, f"{misses} of {recoveries} recoveries found no checkpoint"
    assert [str(w.message) for w in caught] == []  # nothing reported as damaged
    assert recoveries > 20 and len(seen) > 5 and min(saves) > 5, (recoveries, len(seen), saves)
    assert {k % 2 for k in seen} == {0, 1}  # both writers' checkpoints were read
    assert list(reader._saved_names) == [c.path for c in reader.list_checkpoints()]


# -- 6. the Checkpointer remembers only the folders there are ----------------------------------------------

def test_saved_names_are_kept_only_for_folders_on_disk(tmp_path):
    # Before: one entry per checkpoint ever listed (300 saves: 300 entries, 1 folder on disk).
    folder = tmp_path / "ckpts"
    ckpt = Checkpointer(folder, {"model": torch.nn.Linear(2, 2)})
    for i in range(60):
        ckpt.save_and_keep_only(meta={"i": i}, num_to_keep=1)
    assert len(os.listdir(folder)) == 1
    assert list(ckpt._saved_names) == [c.path for c in ckpt.list_checkpoints()]
    ckpt.delete_checkpoints(num_to_keep=0)
    assert ckpt._saved_names == {} and os.listdir(folder) == []


def test_a_deletion_cut_short_leaves_a_leftover_the_next_save_removes(tmp_path, monkeypatch):
    folder = tmp_path / "ckpts"
    ckpt = Checkpointer(folder, {"model": torch.nn.Linear(2, 2)})
    first = ckpt.save_checkpoint()

    def crash(path, *args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(checkpointer_module.shutil, "rmtree", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        ckpt.delete_checkpoints(num_to_keep=0)
    monkeypatch.undo()
    assert ckpt.list_checkpoints() == []  # renamed first: gone as a checkpoint, whole or not at all
    assert os.listdir(folder) == [first.path.name + checkpointer_module.DELETING_MARK]
    second = ckpt.save_checkpoint()
    assert os.listdir(folder) == [second.path.name]
