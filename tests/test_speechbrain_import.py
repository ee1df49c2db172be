"""Moving over from SpeechBrain: a real speechbrain.Brain checkpoint imported into fbrain, and
SpeechBrain's own recoverables (NewBobScheduler, EpochCounter) in fbrain's Checkpointer.

SpeechBrain runs in subprocesses: importing it turns on TF32 and patches global torch state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fbrain
from fbrain import checkpoint
from fbrain.checkpoint import CheckpointError, import_speechbrain
from fbrain.checkpoint.speechbrain_import import parse_flat_yaml
from test_brain_parity import CASE  # the ConvModel (with BatchNorm buffers), its data and Brain hooks

EPOCH_BATCHES = 3  # batches of 8 per epoch
LR, LR_AFTER_EPOCH_1 = 1e-2, 4e-3

# SpeechBrain trains epoch 1, saves a checkpoint (after changing the lr, as a scheduler would), then
# continues with epoch 2 in the same process: the reference for fbrain continuing from that checkpoint.
SB_RUN = CASE + textwrap.dedent('''
    import json, sys, torch, speechbrain
    from speechbrain.utils.checkpoints import Checkpointer
    from speechbrain.utils.epoch_loop import EpochCounter
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out, opt_name = sys.argv[1], sys.argv[2]
    ConvBrain, _ = make_brains(speechbrain)

    class SavingBrain(ConvBrain):
        def on_stage_end(self, stage, stage_loss, epoch=None):
            super().on_stage_end(stage, stage_loss, epoch)
            if epoch == 1:
                speechbrain.nnet.schedulers.update_learning_rate(self.optimizer, LR_AFTER_EPOCH_1)
                self.checkpointer.save_checkpoint()

    model, counter = ConvModel(), EpochCounter(2)
    ckpt = Checkpointer(out + "/sb_ckpts", {"model": model, "counter": counter})
    opt_class = {"adam": lambda p: torch.optim.Adam(p, lr=LR),
                 "sgd": lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9)}[opt_name]
    brain = SavingBrain({"model": model}, opt_class=opt_class, checkpointer=ckpt,
                        run_opts={"device": "cpu", "max_grad_norm": 5.0, "noprogressbar": True})
    brain.losses, brain.stage_losses = [], []
    loader = torch.utils.data.DataLoader(make_data()[:8 * EPOCH_BATCHES], batch_size=8)
    brain.fit(counter, loader)
    torch.save(model.state_dict(), out + "/final_model.pt")
    torch.save(brain.optimizer.state_dict(), out + "/final_optimizer.pt")
    json.dump({"losses": brain.losses}, open(out + "/sb.json", "w"))
''')


def run_speechbrain(tmp_path, opt_name: str) -> dict:
    script = f"EPOCH_BATCHES, LR, LR_AFTER_EPOCH_1 = {EPOCH_BATCHES}, {LR}, {LR_AFTER_EPOCH_1}\n" + SB_RUN
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), opt_name], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        pytest.fail(f"the SpeechBrain run failed:\n{done.stderr[-3000:]}")
    return json.loads((tmp_path / "sb.json").read_text())


def fbrain_case():
    namespace: dict = {}
    exec(CASE, namespace)
    return namespace


def sb_checkpoint(tmp_path) -> str:
    folders = [f for f in os.listdir(tmp_path / "sb_ckpts") if f.startswith("CKPT+")]
    assert len(folders) == 1
    return str(tmp_path / "sb_ckpts" / folders[0])


def make_brain(ns, tmp_path, opt_class, counter):
    ConvBrain, _ = ns["make_brains"](fbrain)
    ckpt = checkpoint.Checkpointer(tmp_path / "fb_ckpts", {"counter": counter})
    brain = ConvBrain({"model": ns["ConvModel"]()}, opt_class=opt_class, checkpointer=ckpt,
                      run_opts={"device": "cpu", "max_grad_norm": 5.0, "noprogressbar": True})
    brain.losses, brain.stage_losses = [], []
    return brain


@pytest.fixture(scope="module")
def sb_adam(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sb_adam")
    return tmp, run_speechbrain(tmp, "adam")


@pytest.mark.speechbrain
def test_import_into_a_brain_gives_speechbrains_exact_state(sb_adam, tmp_path):
    sb_dir, _ = sb_adam
    folder = sb_checkpoint(sb_dir)
    ns = fbrain_case()
    counter = fbrain.EpochCounter(2)
    brain = make_brain(ns, tmp_path, lambda p: torch.optim.Adam(p, lr=LR), counter)
    state = import_speechbrain(sb_dir / "sb_ckpts", brain)  # the checkpoints folder: picks the newest CKPT+
    assert brain.state is state

    modules = torch.load(os.path.join(folder, "model.ckpt"), weights_only=True)
    for key, value in modules.items():
        got = state.params.get(f"model.{key}", state.buffers.get(f"model.{key}"))
        assert torch.equal(got, value), key
    assert torch.equal(brain.modules.model.conv.weight.detach(), modules["conv.weight"])  # modules follow
    assert int(state.buffers["model.norm.num_batches_tracked"]) == EPOCH_BATCHES

    torch_opt = torch.load(os.path.join(folder, "optimizer.ckpt"), weights_only=True)
    names = [n for n, _ in brain.modules.named_parameters()]
    for i, name in enumerate(names):
        assert torch.equal(state.opt_state["opt_class"].mu[name], torch_opt["state"][i]["exp_avg"]), name
        assert torch.equal(state.opt_state["opt_class"].nu[name], torch_opt["state"][i]["exp_avg_sq"]), name
        assert int(torch_opt["state"][i]["step"]) == EPOCH_BATCHES
    assert int(state.opt_state["opt_class"].count) == EPOCH_BATCHES
    assert float(state.opt_state["opt_class"].hyperparams["lr"]) == LR_AFTER_EPOCH_1  # as the "scheduler" left it
    assert brain.optimizer.param_groups[0]["lr"] == LR_AFTER_EPOCH_1
    assert int(state.counters.optimizer_step) == EPOCH_BATCHES and brain.optimizer_step == EPOCH_BATCHES
    assert int(state.counters.epoch) == 1 and counter.current == 1


@pytest.mark.speechbrain
def test_fbrain_continues_a_speechbrain_run_as_speechbrain_does(sb_adam, tmp_path):
    sb_dir, theirs = sb_adam
    ns = fbrain_case()
    counter = fbrain.EpochCounter(2)
    brain = make_brain(ns, tmp_path, lambda p: torch.optim.Adam(p, lr=LR), counter)
    import_speechbrain(sb_dir / "sb_ckpts", brain)
    # fit() rebuilds the optimizers and recovers the newest fbrain checkpoint: the imported one.
    loader = torch.utils.data.DataLoader(ns["make_data"]()[:8 * EPOCH_BATCHES], batch_size=8)
    brain.fit(counter, loader)
    assert len(brain.losses) == EPOCH_BATCHES  # epoch 2 only
    diffs = [abs(a - b) for a, b in zip(brain.losses, theirs["losses"][EPOCH_BATCHES:])]
    assert max(diffs) < 1e-5, diffs
    final = torch.load(sb_dir / "final_model.pt", weights_only=True)
    for key, value in final.items():
        ours = brain.state.params.get(f"model.{key}", brain.state.buffers.get(f"model.{key}"))
        torch.testing.assert_close(ours, value, rtol=1e-5, atol=1e-6)
    final_opt = torch.load(sb_dir / "final_optimizer.pt", weights_only=True)
    names = [n for n, _ in brain.modules.named_parameters()]
    for i, name in enumerate(names):
        torch.testing.assert_close(brain.state.opt_state["opt_class"].mu[name], final_opt["state"][i]["exp_avg"],
                                   rtol=1e-5, atol=1e-7)
    assert int(brain.state.opt_state["opt_class"].count) == 2 * EPOCH_BATCHES


@pytest.mark.speechbrain
def test_import_into_a_train_state_and_sgd_momentum(tmp_path):
    run_speechbrain(tmp_path, "sgd")
    folder = sb_checkpoint(tmp_path)
    ns = fbrain_case()
    model = torch.nn.ModuleDict({"model": ns["ConvModel"]()})
    state = fbrain.TrainState.create(model, fbrain.optim.sgd(LR, momentum=0.9))
    new = import_speechbrain(folder, state)
    assert new is not state and int(state.opt_state.count) == 0  # the template is left alone
    torch_opt = torch.load(os.path.join(folder, "optimizer.ckpt"), weights_only=True)
    for i, name in enumerate(new.params):
        assert torch.equal(new.opt_state.momentum_buffer[name], torch_opt["state"][i]["momentum_buffer"])
    assert int(new.opt_state.count) > 0  # buffers exist: no "first step" copy of the gradient
    assert float(new.opt_state.hyperparams["lr"]) == LR_AFTER_EPOCH_1
    # The wrong kind of optimizer, or a model of another shape, is an error naming file and parameter.
    with pytest.raises(CheckpointError, match=r"optimizer.ckpt.*'model.conv.weight'.*momentum_buffer"):
        import_speechbrain(folder, fbrain.TrainState.create(model, fbrain.optim.adam(LR)))
    other = torch.nn.ModuleDict({"model": torch.nn.Sequential()})
    other.model.conv = torch.nn.Conv1d(1, 8, kernel_size=5, padding=2, bias=False)
    other.model.norm = torch.nn.BatchNorm1d(8)
    other.model.head = torch.nn.Linear(8, 2)
    with pytest.raises(CheckpointError, match=r"model.ckpt: params\['model.conv.weight'\]: shape \(8, 1, 5\) "
                                              r"expected, file has \(4, 1, 5\)"):
        import_speechbrain(folder, fbrain.TrainState.create(other, fbrain.optim.sgd(LR, momentum=0.9)))


def test_pickles_that_would_run_code_are_refused(tmp_path):
    folder = tmp_path / "CKPT+2024-01-01+00-00-00+00"
    folder.mkdir()
    torch.save({"weight": torch.zeros(1), "evil": fbrain.EpochCounter(1)}, folder / "model.ckpt")
    state = fbrain.TrainState.create(torch.nn.Linear(1, 1), fbrain.optim.sgd(0.1))
    with pytest.raises(CheckpointError, match=r"model.ckpt: cannot be read with torch.load\(weights_only=True\)"):
        import_speechbrain(folder, state)


def test_flat_yaml_reader_matches_pyyaml():
    yaml = pytest.importorskip("yaml")
    text = yaml.dump({"step": 3, "avg_train_loss": 0.125, "optimizer_step": 7, "end-of-epoch": False,
                      "unixtime": 1700000000.5, "nan": float("nan")})
    ours, theirs = parse_flat_yaml(text), yaml.safe_load(text)
    assert ours.keys() == theirs.keys()
    assert all(ours[k] == theirs[k] or (ours[k] != ours[k] and theirs[k] != theirs[k]) for k in ours)


# -- SpeechBrain's recoverables in fbrain's Checkpointer -------------------------------------------

SB_RECOVERABLES = textwrap.dedent('''
    import sys, torch, speechbrain
    from speechbrain.nnet.schedulers import NewBobScheduler
    from speechbrain.utils.epoch_loop import EpochCounter
    import fbrain
    from fbrain import checkpoint

    sched, counter = NewBobScheduler(initial_value=1.0, annealing_factor=0.5, patient=0), EpochCounter(10)
    ckpt = checkpoint.Checkpointer(sys.argv[1], {"scheduler": sched, "counter": counter})
    for loss in (1.0, 0.999, 1.2):
        next(counter)
        sched(loss)
    saved = ckpt.save_checkpoint()
    expected = (sched.hyperparam_value, list(sched.metric_values), counter.current)
    fresh_sched, fresh_counter = NewBobScheduler(initial_value=1.0, annealing_factor=0.5, patient=0), EpochCounter(10)
    ckpt2 = checkpoint.Checkpointer(sys.argv[1], {"scheduler": fresh_sched, "counter": fresh_counter})
    assert ckpt2.recover_if_possible().path == saved.path
    got = (fresh_sched.hyperparam_value, list(fresh_sched.metric_values), fresh_counter.current)
    assert got == expected and expected[0] < 1.0 and expected[2] == 3, (got, expected)
    print("OK", got)
''')


@pytest.mark.speechbrain
def test_speechbrain_recoverables_work_in_fbrains_checkpointer(tmp_path):
    done = subprocess.run([sys.executable, "-c", SB_RECOVERABLES, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stdout + done.stderr[-3000:]


def test_state_dict_owners_are_recoverables(tmp_path):
    class Owner:
        def __init__(self):
            self.value = 0

        def state_dict(self):
            return {"value": self.value}

        def load_state_dict(self, state):
            self.value = state["value"]

    owner = Owner()
    owner.value = 5
    ckpt = checkpoint.Checkpointer(tmp_path, {"owner": owner})
    ckpt.save_checkpoint()
    owner.value = 0
    ckpt.recover_if_possible()
    assert owner.value == 5
    assert checkpoint.load(ckpt.find_checkpoint().paramfiles["owner"]) == {"value": 5}
