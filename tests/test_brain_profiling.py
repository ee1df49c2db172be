"""SpeechBrain 1.1's run options profile_training / profile_warmup / profile_steps and
remove_vector_weight_decay (fbrain 0.2 refused them as unknown options)."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

import fbrain
from conftest import RegressionBrain, batches, mlp


def test_profile_training_writes_a_trace_of_the_profiled_steps_then_stops(tmp_path):
    data = list(batches(10, batch_size=4))
    brain = RegressionBrain({"model": mlp(0)}, lambda p: torch.optim.SGD(p, lr=0.1),
                            hparams={"output_folder": str(tmp_path)},
                            run_opts={"profile_training": True, "profile_warmup": 1, "profile_steps": 2,
                                      "noprogressbar": True})
    with pytest.raises(SystemExit) as stopped:
        brain.fit(range(3), data, train_loader_kwargs={"batch_size": None})
    assert stopped.value.code == 0
    assert int(brain.state.counters.step) == 3  # the warm-up and recorded steps only
    traces = glob.glob(os.path.join(tmp_path, "profiler_logs", "*.pt.trace.json"))
    assert len(traces) == 1, os.listdir(tmp_path)
    with open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    assert any("aten::addmm" in str(e.get("name")) for e in events)  # the model's forward was recorded


def test_a_fit_shorter_than_the_profiled_steps_stops_the_profiler_and_says_so(tmp_path, caplog):
    # Found in review: the profiler kept running, and the next fit crashed in Kineto.
    brain = RegressionBrain({"model": mlp(0)}, lambda p: torch.optim.SGD(p, lr=0.1),
                            hparams={"output_folder": str(tmp_path)},
                            run_opts={"profile_training": True, "profile_warmup": 2, "profile_steps": 5,
                                      "noprogressbar": True})
    with caplog.at_level("WARNING"):
        brain.fit(range(1), list(batches(3, batch_size=4)), train_loader_kwargs={"batch_size": None})
    assert any("fit ended after 3 of the 7 profiled steps" in r.message for r in caplog.records)
    with pytest.raises(SystemExit):  # a second fit profiles afresh and ends as a profiling run does
        brain.fit(range(2, 4), list(batches(10, batch_size=4)), train_loader_kwargs={"batch_size": None})


def test_bad_profiler_settings_are_named():
    with pytest.raises(ValueError, match="profile_steps: expected an int >= 1"):
        RegressionBrain({"model": mlp(0)}, lambda p: torch.optim.SGD(p, lr=0.1),
                        run_opts={"profile_training": True, "profile_steps": 0}).fit(range(1), [])


def test_remove_vector_weight_decay_exempts_biases_as_speechbrain_does():
    brain = RegressionBrain({"model": mlp(0)}, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
                            run_opts={"remove_vector_weight_decay": True, "noprogressbar": True})
    brain.fit(range(1), list(batches(2, batch_size=4)), train_loader_kwargs={"batch_size": None})
    groups = brain.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.1]
    assert all(p.ndim == 1 for p in groups[0]["params"]) and all(p.ndim == 2 for p in groups[1]["params"])
    # The same training as torch.optim.AdamW with those two groups.
    model = mlp(0)
    opt = torch.optim.AdamW(fbrain.brain.optimizers.vector_weight_decay_groups(model), lr=1e-2, weight_decay=0.1)
    for x, y in batches(2, batch_size=4):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    for name, p in model.named_parameters():
        assert torch.allclose(brain.state.params["model." + name], p, atol=1e-6), name
