"""optim.with_ema: an exponential moving average of the weights, in the optimizer state."""

from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import fbrain
from fbrain import checkpoint, optim
from conftest import RegressionBrain, batches, mlp, regression_loss, trees_equal

DECAY = 0.9


def trained(steps: int, state=None, start: int = 0):
    """(state, per-step params) of 100 Adam steps with an EMA, from ``state`` (fresh if None)."""
    model = mlp(0)
    opt = optim.with_ema(optim.adam(1e-2), DECAY)
    state = fbrain.TrainState.create(model, opt) if state is None else state
    step = fbrain.make_train_step(regression_loss(model), opt)
    seen = []
    for batch in batches(start + steps)[start:]:
        state, _ = step(state, batch)
        seen.append({k: v.clone() for k, v in state.params.items()})
    return state, seen


def test_the_average_equals_torchs_averaged_model_and_a_hand_written_ema_over_100_steps():
    state, seen = trained(100)
    reference = AveragedModel(mlp(0), multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    shadow = mlp(0)
    by_hand = None
    for params in seen:
        with torch.no_grad():
            for name, p in shadow.named_parameters():
                p.copy_(params[name])
        reference.update_parameters(shadow)
        by_hand = dict(params) if by_hand is None else {k: DECAY * by_hand[k] + (1 - DECAY) * params[k] for k in params}
    ours = optim.ema_params(state.opt_state)
    theirs = {name: p for name, p in reference.module.named_parameters()}
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # the same lerp, bit for bit
    assert max(float((ours[k] - by_hand[k]).abs().max()) for k in ours) < 1e-6
    assert not torch.equal(ours["0.weight"], state.params["0.weight"])


def test_a_skipped_step_leaves_the_average_as_it_was():
    model = mlp(0)
    opt = optim.with_ema(optim.sgd(0.1), DECAY)
    state = fbrain.TrainState.create(model, opt)
    step = fbrain.make_train_step(regression_loss(model), opt)
    x, y = batches(1)[0]
    state, _ = step(state, (x, y))
    before = optim.ema_params(state.opt_state)
    state, metrics = step(state, (x * float("nan"), y))
    assert bool(metrics["skipped"])
    assert trees_equal(optim.ema_params(state.opt_state), before) and int(state.opt_state.count) == 1


def test_the_average_survives_a_checkpoint_bit_for_bit(tmp_path):
    straight, _ = trained(20)
    half, _ = trained(10)
    checkpoint.save(tmp_path / "half.fbrain", half)
    resumed, _ = trained(10, checkpoint.load(tmp_path / "half.fbrain", template=half), start=10)
    assert trees_equal(resumed, straight)


def test_without_an_average_the_error_says_how_to_get_one():
    state = fbrain.TrainState.create(mlp(0), optim.adam(1e-3))
    with pytest.raises(KeyError, match="optim.with_ema"):
        optim.ema_params(state.opt_state)
    with pytest.raises(ValueError, match=r"with_ema: decay: expected a finite number in \[0, 1\], got 1.5"):
        optim.with_ema(optim.adam(1e-3), 1.5)


class Recorded(RegressionBrain):
    """A regression Brain that records its parameters after every step."""

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        self.seen = getattr(self, "seen", []) + [{k: v.clone() for k, v in self.state.params.items()}]


def test_the_brains_ema_decay_averages_every_optimizer_and_eval_with_ema_uses_it(tmp_path):
    data = [(x, y) for x, y in batches(12, batch_size=4)]

    def brain(**opts):
        torch.manual_seed(0)
        return Recorded({"model": mlp(0)}, lambda p: torch.optim.Adam(p, lr=1e-2),
                        run_opts={"noprogressbar": True, **opts})

    plain, averaged = brain(), brain(ema_decay=DECAY, eval_with_ema=True)
    for b in (plain, averaged):
        b.fit(range(2), data, train_loader_kwargs={"batch_size": None})
    assert trees_equal(plain.state.params, averaged.state.params)  # the average changes no step
    reference = AveragedModel(mlp(0), multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    shadow = mlp(0)
    for params in plain.seen:
        with torch.no_grad():
            for name, p in shadow.named_parameters():
                p.copy_(params["model." + name])
        reference.update_parameters(shadow)
    ema = optim.ema_params(averaged.state.opt_state)
    assert all(torch.equal(ema["model." + n], p) for n, p in reference.module.named_parameters())
    # Evaluating with the average: the loss of the averaged weights.
    with torch.no_grad():
        for name, p in plain.modules.model.named_parameters():
            p.copy_(ema["model." + name])
    plain.state = plain.state.replace(params={**plain.state.params, **ema})
    assert averaged.evaluate(data, progressbar=False) == plain.evaluate(data, progressbar=False)
    with pytest.raises(ValueError, match="eval_with_ema: needs ema_decay"):
        brain(eval_with_ema=True)


class ImperativeEval(Recorded):
    """A Brain whose evaluate_batch uses its modules directly (as SpeechBrain recipes do)."""

    def evaluate_batch(self, batch, stage):
        return torch.nn.functional.mse_loss(self.modules.model(batch[0]), batch[1]).detach()


def test_eval_with_ema_also_serves_an_overridden_evaluate_batch():
    data = [(x, y) for x, y in batches(6, batch_size=4)]
    torch.manual_seed(0)
    default = Recorded({"model": mlp(0)}, lambda p: torch.optim.Adam(p, lr=1e-2),
                       run_opts={"noprogressbar": True, "ema_decay": DECAY, "eval_with_ema": True})
    torch.manual_seed(0)
    overridden = ImperativeEval({"model": mlp(0)}, lambda p: torch.optim.Adam(p, lr=1e-2),
                                run_opts={"noprogressbar": True, "ema_decay": DECAY, "eval_with_ema": True})
    for b in (default, overridden):
        b.fit(range(1), data, train_loader_kwargs={"batch_size": None})
    assert overridden.evaluate(data, progressbar=False) == default.evaluate(data, progressbar=False)


class ImperativeFit(Recorded):
    """A SpeechBrain-style fit_batch: backward, optimizer.step, zero_grad."""

    def fit_batch(self, batch):
        loss = self.compute_objectives(self.compute_forward(batch, fbrain.Stage.TRAIN), batch, fbrain.Stage.TRAIN)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()


def test_the_imperative_fit_batch_keeps_the_same_average_as_the_default_step():
    # The average follows the one update path (apply_gradients), whichever fit_batch drives it.
    data = [(x, y) for x, y in batches(6, batch_size=4)]
    brains = []
    for cls in (Recorded, ImperativeFit):
        torch.manual_seed(0)
        brain = cls({"model": mlp(0)}, lambda p: torch.optim.Adam(p, lr=1e-2),
                    run_opts={"noprogressbar": True, "ema_decay": DECAY, "max_grad_norm": None})
        brain.fit(range(1), data, train_loader_kwargs={"batch_size": None})
        brains.append(brain)
    assert trees_equal(brains[0].state.params, brains[1].state.params)
    assert trees_equal(optim.ema_params(brains[0].state.opt_state), optim.ema_params(brains[1].state.opt_state))
