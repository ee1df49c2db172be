"""brain.optimizer.state_dict() / load_state_dict() in torch.optim's shape (fbrain 0.2 raised), so a
recipe that adds its optimizer to the checkpointer (SpeechBrain's init_optimizers does) works."""

from __future__ import annotations

import pytest
import torch

import fbrain
from fbrain.checkpoint import Checkpointer
from conftest import RegressionBrain


def setup(opt_class):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(5)]
    brain = RegressionBrain({"model": model}, opt_class, run_opts={"noprogressbar": True, "max_grad_norm": None})
    return brain, twin, data


def torch_run(twin, opt_class, data):
    opt = opt_class(twin.parameters())
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        opt.step()
    return opt


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    # The adaptive twins (fbrain.optim.adaptive) keep their buffers under torch's own keys.
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "adamax": lambda p: torch.optim.Adamax(p, lr=2e-3),
    "nadam": lambda p: torch.optim.NAdam(p, lr=2e-3),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-3),
}


@pytest.mark.parametrize("opt_class", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_state_dict_has_torchs_shape_and_values(opt_class):
    brain, twin, data = setup(opt_class)
    brain.fit(range(1), data, train_loader_kwargs={"batch_size": None})
    ours, theirs = brain.optimizer.state_dict(), torch_run(twin, opt_class, data).state_dict()
    assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in theirs["param_groups"]]
    assert sorted(ours["param_groups"][0]) == sorted(theirs["param_groups"][0])
    assert ours["param_groups"][0]["lr"] == theirs["param_groups"][0]["lr"]
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for i, entry in theirs["state"].items():
        assert sorted(ours["state"][i]) == sorted(entry)
        for key, value in entry.items():
            assert torch.allclose(ours["state"][i][key], value, rtol=1e-5, atol=1e-7), (i, key)


def test_load_state_dict_round_trips_and_takes_torchs_own():
    opt_class = lambda p: torch.optim.Adam(p, lr=1e-2)  # noqa: E731
    brain, twin, data = setup(opt_class)
    brain.fit(range(1), data, train_loader_kwargs={"batch_size": None})
    saved = brain.optimizer.state_dict()
    brain.fit(range(2, 3), data, train_loader_kwargs={"batch_size": None})
    assert not torch.equal(brain.optimizer.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
    brain.optimizer.load_state_dict(saved)
    back = brain.optimizer.state_dict()
    assert all(torch.equal(back["state"][i][k], v) for i, e in saved["state"].items() for k, v in e.items())
    theirs = torch_run(twin, opt_class, data).state_dict()
    brain.optimizer.load_state_dict(theirs)
    assert torch.equal(brain.optimizer.state_dict()["state"][2]["exp_avg_sq"], theirs["state"][2]["exp_avg_sq"])
    with pytest.raises(fbrain.checkpoint.CheckpointError, match="momentum_buffer"):
        brain.optimizer.load_state_dict(torch_run(twin, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                                  data).state_dict())


@pytest.mark.parametrize("name", ["adagrad", "adadelta", "adamax", "nadam", "radam"])
def test_the_adaptive_twins_load_torchs_state_dict_and_give_it_back(name):
    opt_class = OPTIMIZERS[name]
    brain, twin, data = setup(opt_class)
    brain.fit(range(1), data[:1], train_loader_kwargs={"batch_size": None})
    theirs = torch_run(twin, opt_class, data).state_dict()
    brain.optimizer.load_state_dict(theirs)
    ours = brain.optimizer.state_dict()
    assert sorted(ours["state"]) == sorted(theirs["state"])
    for i, entry in theirs["state"].items():
        assert sorted(ours["state"][i]) == sorted(entry)
        assert all(torch.equal(ours["state"][i][k], v) for k, v in entry.items()), (i, entry)


class AddsItsOptimizer(RegressionBrain):
    def init_optimizers(self):  # SpeechBrain's default init_optimizers does this
        super().init_optimizers()
        if self.checkpointer is not None and "optimizer" not in self.checkpointer.recoverables:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)


def test_a_recipe_that_checkpoints_its_optimizer_saves_and_recovers(tmp_path):
    def make():
        torch.manual_seed(0)
        return AddsItsOptimizer({"model": torch.nn.Linear(3, 1)}, lambda p: torch.optim.Adam(p, lr=1e-2),
                                run_opts={"noprogressbar": True}, checkpointer=Checkpointer(tmp_path / "ckpts"))

    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(3)]
    first = make()
    first.fit(range(1), data, train_loader_kwargs={"batch_size": None})
    first.checkpointer.save_checkpoint()
    again = make()
    again.ensure_state()  # init_optimizers adds the optimizer to the checkpointer, as fit's start does
    assert again.checkpointer.recover_if_possible() is not None
    assert "optimizer" in again.checkpointer.recoverables and all(torch.equal(a, b) for a, b in zip(fbrain.tree.tree_leaves(again.state.opt_state),
                                                   fbrain.tree.tree_leaves(first.state.opt_state)))
