"""One update path: every way of training gives the pure step's state, bit for bit.

The pure step, an imperative ``fit_batch`` in SpeechBrain's default style (``scaler.scale(loss)``,
``backward()``, ``optimizers_step()``), and the LibriMix seed's style (``unscale_``, the recipe's own
``clip_grad_norm_``, ``scaler.step``, ``scaler.update``) all end in ``fbrain.update.apply_gradients``.
On the same batches (so the same gradients) they must leave the same parameters, optimizer state,
loss scale and counters, through every kind of trouble: a non-finite loss, non-finite gradients
under a finite loss, finite gradients whose global norm overflows, and fp16 loss-scale back-offs.
"""

from __future__ import annotations

import pytest
import torch

import fbrain
from conftest import trees_equal

NORMAL, NAN_LOSS, NAN_GRADS, NORM_OVERFLOW = range(4)
# Eight batches of four examples per epoch: two of each kind of trouble among normal ones.
SCHEDULE = [NORMAL, NAN_LOSS, NORMAL, NAN_GRADS, NORM_OVERFLOW, NORMAL, NORMAL, NAN_LOSS]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)
        # Stays zero: its gradient is 0 except in NORM_OVERFLOW batches, whose steps are skipped.
        self.probe = torch.nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return self.linear(x)


def make_data(kinds=SCHEDULE):
    g = torch.Generator().manual_seed(1)
    examples = []
    for kind in kinds:
        for _ in range(4):
            x = torch.randn(4, generator=g)
            if kind == NAN_LOSS:
                x[0] = float("nan")
            examples.append({"x": x, "y": torch.randn(1, generator=g), "kind": torch.tensor(kind),
                             # 16 gradients of 1e38 each: every one finite, their global norm (4e38) not.
                             "big": torch.full((16,), 1e38 if kind == NORM_OVERFLOW else 0.0)})
    return examples


class PureBrain(fbrain.Brain):
    """The default fit_batch: the pure train step."""

    def compute_forward(self, batch, stage):
        return self.modules.net(batch["x"])

    def compute_objectives(self, predictions, batch, stage):
        net = self.modules.net
        # The probe's gradient is mean(big) per element: 1e38 in NORM_OVERFLOW batches.
        loss = torch.nn.functional.mse_loss(predictions.float(), batch["y"]) + (net.probe * batch["big"]).mean(0).sum() / 4
        if int(batch["kind"][0]) == NAN_GRADS:
            # sqrt'(0) = inf: NaN gradients while the loss stays finite.
            loss = loss + torch.sqrt(torch.abs(predictions.sum() * 0.0))
        return loss


class SpeechBrainStyle(PureBrain):
    """SpeechBrain 1.1's own default fit_batch, written out (imperative, optimizers_step)."""

    def fit_batch(self, batch):
        k = self.grad_accumulation_factor
        should_step = self.step % k == 0
        with self.no_sync(not should_step):
            with self.training_ctx:
                outputs = self.compute_forward(batch, fbrain.Stage.TRAIN)
                loss = self.compute_objectives(outputs, batch, fbrain.Stage.TRAIN)
            scaled_loss = self.scaler.scale(loss / k)
            self.check_loss_isfinite(scaled_loss)  # SpeechBrain's own check: counted once, not twice
            scaled_loss.backward()
        if should_step:
            self.optimizers_step()
        return loss.detach()


class LibriMixStyle(PureBrain):
    """The LibriMix seed's fit_batch: unscale_, its own clip_grad_norm_, scaler.step, scaler.update."""

    def fit_batch(self, batch):
        with self.training_ctx:
            outputs = self.compute_forward(batch, fbrain.Stage.TRAIN)
            loss = self.compute_objectives(outputs, batch, fbrain.Stage.TRAIN)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 5.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        return loss.detach()


def train(cls, precision="fp32", accumulation=1, epochs=2):
    brain = cls({"net": Net()}, opt_class=lambda p: torch.optim.Adam(p, lr=1e-2),
                run_opts={"noprogressbar": True, "precision": precision, "max_grad_norm": 5.0,
                          "grad_accumulation_factor": accumulation, "nonfinite_patience": 1000})
    brain.fit(range(1, epochs + 1), make_data(), train_loader_kwargs={"batch_size": 4})
    return brain


def comparable(state):
    # The pure step also advances state.rng (its random draws come from it); an imperative recipe
    # draws from its own generators, so the key is not part of what must agree.
    return {"params": state.params, "opt_state": state.opt_state, "scaler": state.scaler, "counters": state.counters}


def test_the_trouble_is_real():
    """Preconditions: each batch kind gives the trouble it is named for."""
    net = Net()
    data = make_data([NAN_LOSS, NAN_GRADS, NORM_OVERFLOW])
    brain = PureBrain({"net": net}, run_opts={"noprogressbar": True})
    for i, kind in enumerate([NAN_LOSS, NAN_GRADS, NORM_OVERFLOW]):
        batch = torch.utils.data.default_collate(data[4 * i:4 * i + 4])
        net.zero_grad()
        loss = brain.compute_objectives(net(batch["x"]), batch, fbrain.Stage.TRAIN)
        loss.backward()
        grads = [p.grad for p in net.parameters()]
        finite_grads = all(bool(torch.isfinite(g).all()) for g in grads)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        assert (bool(torch.isfinite(loss)), finite_grads, bool(torch.isfinite(norm))) == {
            NAN_LOSS: (False, False, False), NAN_GRADS: (True, False, False), NORM_OVERFLOW: (True, True, False),
        }[kind]


@pytest.mark.parametrize("style,precision,accumulation", [
    (SpeechBrainStyle, "fp32", 1), (SpeechBrainStyle, "fp16", 1), (SpeechBrainStyle, "fp32", 2),
    (SpeechBrainStyle, "fp16", 2), (LibriMixStyle, "fp32", 1), (LibriMixStyle, "fp16", 1),
], ids=["speechbrain-fp32", "speechbrain-fp16", "speechbrain-fp32-accumulate2", "speechbrain-fp16-accumulate2",
        "librimix-fp32", "librimix-fp16"])
def test_imperative_and_pure_paths_give_bitwise_equal_states(style, precision, accumulation):
    pure = train(PureBrain, precision, accumulation)
    imperative = train(style, precision, accumulation)
    assert trees_equal(comparable(pure.state), comparable(imperative.state))
    c = pure.state.counters
    steps = 2 * len(SCHEDULE) // accumulation
    assert int(c.step) == steps
    # Every trouble batch skipped its step; the other steps were applied.
    troubled = 4  # per epoch; with accumulation=2 each trouble batch shares its step with a normal one
    if precision == "fp32":
        assert int(c.optimizer_step) == steps - 2 * troubled
        assert int(c.nonfinite_count) == 2 * troubled  # an overflowing norm counts as non-finite too
    else:
        # fp16 also backs off while the scale is too large; only non-finite losses count as non-finite
        # steps: a back-off is the loss scale doing its job.
        assert int(c.nonfinite_count) == 2 * 2  # two NaN-loss batches per epoch
        assert float(pure.state.scaler.scale) < 2.0 ** 16
    assert torch.equal(pure.state.params["net.probe"], torch.zeros(16))  # the overflow step never applied
    assert pure.nonfinite_count == imperative.nonfinite_count
    if style is SpeechBrainStyle:
        assert pure.optimizer_step == imperative.optimizer_step == steps


def test_a_plain_optimizer_step_skips_a_non_finite_loss_like_the_pure_step():
    class PlainBrain(PureBrain):
        def fit_batch(self, batch):
            outputs = self.compute_forward(batch, fbrain.Stage.TRAIN)
            loss = self.compute_objectives(outputs, batch, fbrain.Stage.TRAIN)
            self.scaler.scale(loss).backward()  # fp32: scale() only records whether the loss is finite
            self.optimizer.step()
            self.optimizer.zero_grad()
            return loss.detach()

    kinds = [NORMAL, NAN_LOSS, NAN_GRADS, NORMAL]
    brains = []
    for cls in (PureBrain, PlainBrain):
        brain = cls({"net": Net()}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1),
                    run_opts={"noprogressbar": True, "max_grad_norm": None, "nonfinite_patience": 10})
        brain.fit(range(1), make_data(kinds), train_loader_kwargs={"batch_size": 4})
        brains.append(brain)
    assert trees_equal(comparable(brains[0].state), comparable(brains[1].state))
    assert int(brains[1].state.counters.nonfinite_count) == 2


def test_a_step_a_recipe_skipped_leaves_nothing_behind_for_the_next():
    # A recipe that sees a non-finite loss and skips the step (zero_grad, no optimizer.step) must
    # not make the next, healthy step skip too.
    class Skipping(PureBrain):
        def fit_batch(self, batch):
            self.optimizer.zero_grad()
            outputs = self.compute_forward(batch, fbrain.Stage.TRAIN)
            loss = self.compute_objectives(outputs, batch, fbrain.Stage.TRAIN)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            if torch.isfinite(loss):
                self.optimizer.step()
            return loss.detach()

    brain = Skipping({"net": Net()}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1), run_opts={"noprogressbar": True})
    brain.fit(range(1), make_data([NAN_LOSS, NORMAL, NAN_LOSS, NORMAL]), train_loader_kwargs={"batch_size": 4})
    c = brain.state.counters
    assert (int(c.step), int(c.optimizer_step), int(c.nonfinite_count)) == (2, 2, 0)


class DeepNet(Net):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        for layer in self.hidden:
            x = torch.tanh(layer(x))
        return self.linear(x)


class TwoOptimizers(PureBrain):
    """Two SGD optimizers whose parameters are listed against the modules' order: the global norm
    over their gradients (whose rounding depends on the order) is taken in the state's order on both
    paths."""

    def init_optimizers(self):
        params = list(self.modules.net.parameters())[::-1]
        self.first = torch.optim.SGD(params[:5], lr=0.05)
        self.second = torch.optim.SGD(params[5:], lr=0.1, momentum=0.9)
        self.optimizers_dict = {"first": self.first, "second": self.second}


class TwoOptimizersImperative(TwoOptimizers, SpeechBrainStyle):
    pass


def test_several_optimizers_in_any_order_give_the_pure_steps_state():
    states = []
    for cls in (TwoOptimizers, TwoOptimizersImperative):
        brain = cls({"net": DeepNet()}, run_opts={"noprogressbar": True, "max_grad_norm": 0.05, "nonfinite_patience": 100})
        brain.fit(range(2), make_data(), train_loader_kwargs={"batch_size": 4})
        states.append(comparable(brain.state))
    assert trees_equal(*states)


def test_an_optimizer_a_recipe_replaces_is_adopted_before_the_next_step():
    class Replacing(SpeechBrainStyle):
        def on_stage_start(self, stage, epoch=None):
            if epoch == 2:  # a recipe switching optimizers between epochs
                self.optimizer = torch.optim.SGD(self.modules.parameters(), lr=0.1)
                self.optimizers_dict = {"optimizer": self.optimizer}

    brain = Replacing({"net": Net()}, opt_class=lambda p: torch.optim.Adam(p, lr=1e-2),
                      run_opts={"noprogressbar": True, "nonfinite_patience": 100})
    brain.fit(range(1, 3), make_data([NORMAL] * 3), train_loader_kwargs={"batch_size": 4})
    assert isinstance(brain.optimizer, fbrain.brain.views.OptimizerView)
    assert type(brain.state.opt_state["optimizer"]).__name__ == "SGDState"
    assert int(brain.state.opt_state["optimizer"].count) == 3  # the SGD steps of epoch 2 applied
