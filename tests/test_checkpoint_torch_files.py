"""Module files in torch's format: SpeechBrain's tools read fbrain's folders, and fbrain still
verifies what it reads (damage is a CheckpointError, nothing runs code, older folders load)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from conftest import REPO, ConvNet, trees_equal
from fbrain import checkpoint
from fbrain.checkpoint import Checkpointer, CheckpointError, average_checkpoints, recoverables, torch_files


def saved_runs(folder, values=(1.0, 2.0, 6.0)):
    """Checkpoints of a ConvNet (BatchNorm buffers included) whose weights change each time."""
    model = ConvNet(0)
    ckpt = Checkpointer(folder, {"model": model})
    for value in values:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(value)
            model.norm.num_batches_tracked += 1
        ckpt.save_checkpoint()
    return ckpt, model


@pytest.mark.speechbrain
def test_speechbrains_average_checkpoints_and_pretrainer_read_fbrains_folders(tmp_path):
    ckpt, model = saved_runs(tmp_path / "save")
    ours = average_checkpoints(ckpt.find_checkpoints(max_num_checkpoints=3), "model")
    newest = ckpt.find_checkpoint().paramfiles["model"]
    script = textwrap.dedent(f"""
        import json, sys, torch
        from speechbrain.utils.checkpoints import Checkpointer, average_checkpoints
        from speechbrain.utils.parameter_transfer import Pretrainer
        found = Checkpointer({str(tmp_path / "save")!r}).find_checkpoints(max_num_checkpoints=3)
        torch.save(average_checkpoints(found, "model"), {str(tmp_path / "theirs.pt")!r})
        sys.path.insert(0, {str(REPO / "tests")!r})
        from conftest import ConvNet
        model = ConvNet(1)
        pre = Pretrainer(collect_in={str(tmp_path / "collected")!r}, loadables={{"model": model}},
                         paths={{"model": {str(newest)!r}}})
        pre.collect_files()
        pre.load_collected()
        torch.save(model.state_dict(), {str(tmp_path / "pretrained.pt")!r})
        print(json.dumps(len(found)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == 3
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    assert trees_equal(dict(theirs), dict(ours))  # SpeechBrain's average, to the bit
    assert trees_equal(dict(torch.load(tmp_path / "pretrained.pt", weights_only=True)), dict(model.state_dict()))


def test_average_checkpoints_is_the_mean_and_loads_into_the_module(tmp_path):
    ckpt, model = saved_runs(tmp_path)
    states = [recoverables.read_state_dict(c.paramfiles["model"]) for c in ckpt.find_checkpoints()]
    mean = average_checkpoints(ckpt.find_checkpoints(), "model")
    for name, value in mean.items():
        expected = (states[0][name] + states[1][name] + states[2][name]) / 3.0
        assert torch.equal(value, expected), name
    model.load_state_dict(mean)
    with pytest.raises(KeyError, match="has no file for 'other'"):
        average_checkpoints(ckpt.find_checkpoints(), "other")
    with pytest.raises(ValueError, match="no state_dicts"):
        average_checkpoints([], "model")


def test_a_damaged_module_file_is_named_and_recovery_falls_back(tmp_path):
    ckpt, model = saved_runs(tmp_path, values=(1.0, 2.0))
    older, newest = sorted(ckpt.list_checkpoints(), key=lambda c: c.meta["unixtime"])
    path = newest.paramfiles["model"]
    data = bytearray(path.read_bytes())
    weight = recoverables.read_state_dict(path)["head.weight"]
    data[data.index(weight.numpy().tobytes()) + 5] ^= 0x10  # inside a tensor's stored bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        torch_files.verify(path)
    with pytest.warns(UserWarning, match="damaged"):
        found = ckpt.recover_if_possible()
    assert found.path == older.path
    assert trees_equal(dict(model.state_dict()), dict(recoverables.read_state_dict(older.paramfiles["model"])))


def test_fbrain_0_2_folders_with_module_files_in_fbrains_format_still_load(tmp_path):
    ckpt, model = saved_runs(tmp_path, values=(1.0,))
    saved = ckpt.find_checkpoint()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.save(saved.path / "model.fbrain", expected)  # what fbrain 0.2 wrote
    saved.paramfiles["model"].unlink()
    with torch.no_grad():
        model.conv.weight.zero_()
    assert ckpt.recover_if_possible().paramfiles["model"].name == "model.fbrain"
    assert trees_equal(dict(model.state_dict()), expected)


def test_pickles_that_would_run_code_are_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    path = tmp_path / "model.ckpt"
    torch.save({"weight": Boom()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        recoverables.read_state_dict(path)


def test_fuzzed_module_files_fail_as_checkpoint_errors_or_load_exactly(tmp_path):
    """Bit flips, byte runs, cuts and splices of a real module file (the damage of
    ``python -m benchmarks.checkpoint_fuzz``): every outcome is a CheckpointError or the exact
    state_dict (a change that misses every checked byte)."""
    from benchmarks.checkpoint_fuzz import damaged

    model = ConvNet(0)
    clean = tmp_path / "clean.ckpt"
    torch_files.save(clean, model.state_dict())
    original = clean.read_bytes()
    expected = dict(model.state_dict())
    rng = random.Random(0)
    outcomes = {"rejected": 0, "exact": 0}
    path = tmp_path / "model.ckpt"
    for _ in range(400):
        data = damaged(original, rng)
        path.write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = recoverables.read_state_dict(path)
        except CheckpointError:
            outcomes["rejected"] += 1
            continue
        assert trees_equal(dict(got), expected), "a damaged file loaded as other values"
        outcomes["exact"] += 1
    assert outcomes["rejected"] > 300, outcomes
