"""The Brain facade's less travelled paths, each compared with plain torch (or SpeechBrain):
an imperative fp16 ``fit_batch`` through ``self.scaler``, ``optimizers_step`` over several optimizers,
a pretrained encoder plus a head with two optimizers, SpeechBrain's LR schedulers on the optimizer
view, a batch PaddedBatch cannot pad, ``check_gradients`` / ``update_average`` / ``evaluation_ctx``,
and the ``compile`` run option."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import fbrain
from conftest import RegressionBrain
from fbrain import optim

QUIET = {"noprogressbar": True, "device": "cpu"}
TRAIN = fbrain.Stage.TRAIN


# -- helpers ----------------------------------------------------------------------------------------------

def regression_data(n=12, seed=1, features=4):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(features, generator=g), "y": torch.randn(1, generator=g)} for _ in range(n)]


def batched(data, batch_size):
    """What the Brain's unshuffled DataLoader gives: consecutive examples, stacked."""
    return [torch.utils.data.default_collate(data[i:i + batch_size]) for i in range(0, len(data), batch_size)]


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_params_close(a: dict, b: dict, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


class EncoderHeadBrain(fbrain.Brain):
    def compute_forward(self, batch, stage):
        return self.modules.head(self.modules.encoder(batch["x"]))

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch["y"])


def encoder_and_head(seed=0):
    torch.manual_seed(seed)
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
    head = torch.nn.Linear(8, 1)
    return encoder, head


# -- 1. imperative fp16 through self.scaler ---------------------------------------------------------------

INF_STEP = 3  # the step whose gradient gets an inf: skipped, scale halved


def test_imperative_fp16_scaler_matches_torch_gradscaler():
    class Fp16Imperative(RegressionBrain):
        def fit_batch(self, batch):
            with self.training_ctx:
                loss = self.compute_objectives(self.compute_forward(batch, TRAIN), batch, TRAIN)
            self.scaler.scale(loss).backward()
            if self.step == INF_STEP:
                self.modules.model[0].weight.grad[0, 0] = float("inf")
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 0.5)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad()
            self.trace.append((self.scaler.get_scale(), float(loss.detach()), snapshot(self.modules)))
            return loss.detach()

    data = regression_data(12)
    brain = Fp16Imperative({"model": small_mlp()}, opt_class=lambda p: torch.optim.Adam(p, lr=0.05),
                           run_opts={**QUIET, "precision": "fp16"})
    brain.trace = []
    assert brain.scaler.is_enabled()
    brain.fit(range(1), data, train_loader_kwargs={"batch_size": 2})

    model = small_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    reference = []
    for step, batch in enumerate(batched(data, 2), start=1):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        scaler.scale(loss).backward()
        if step == INF_STEP:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        reference.append((scaler.get_scale(), float(loss.detach()), snapshot(model)))

    assert len(brain.trace) == len(reference) == 6
    scales = [s for s, _, _ in brain.trace]
    # Step 1 overflows by itself (the output's fp16 gradient times 2**16), step 3 by the injected inf.
    assert scales == [s for s, _, _ in reference] == [2.0**15] * 2 + [2.0**14] * 4
    for (_, loss, params), (_, ref_loss, ref_params) in zip(brain.trace, reference):
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        assert_params_close({f"model.{n}": p for n, p in ref_params.items()}, params)
    # The inf step changed nothing; the others did (fp16 autocast really ran: the loss is not fp32's).
    before, skipped, after = (brain.trace[i][2] for i in (INF_STEP - 2, INF_STEP - 1, INF_STEP))
    assert all(torch.equal(before[n], skipped[n]) for n in before)
    assert not torch.equal(skipped["model.0.weight"], after["model.0.weight"])
    assert torch.equal(brain.trace[0][2]["model.0.weight"], small_mlp()[0].weight.detach())
    # Both skipped steps were back-offs (finite losses): the loss scale doing its job, not non-finite
    # steps, as in the pure step (counting them ended healthy fp16 runs at nonfinite_patience).
    assert brain.nonfinite_count == 0
    assert int(brain.state.counters.optimizer_step) == 4
    assert float(brain.state.scaler.scale) == 2.0**14


@pytest.mark.parametrize("loss", [
    torch.tensor(0.25),
    torch.full((3,), 2.0, dtype=torch.float16),  # not 0-dim: the float32 scale does not promote it
    torch.tensor(2.0, dtype=torch.float16),
], ids=["fp32", "fp16-vector", "fp16-0dim"])
def test_scaler_view_scale_keeps_torch_dtypes(loss):
    brain = RegressionBrain({"model": small_mlp()}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1),
                            run_opts={**QUIET, "precision": "fp16"})
    brain.fit(range(1), regression_data(2), train_loader_kwargs={"batch_size": 2})
    scaler = torch.amp.GradScaler("cpu", init_scale=brain.scaler.get_scale())
    ours, theirs = brain.scaler.scale(loss), scaler.scale(loss)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


def test_fp16_backoffs_of_a_fresh_loss_scale_are_not_nonfinite_losses():
    class Scales(RegressionBrain):
        def on_fit_batch_end(self, batch, outputs, loss, should_step):
            self.scales.append(self.scaler.get_scale())
            self.losses.append(float(loss))

    data = [{"x": d["x"], "y": d["y"] * 30} for d in regression_data(16)]
    brain = Scales({"model": small_mlp()}, opt_class=lambda p: torch.optim.SGD(p, lr=1e-3),
                   run_opts={**QUIET, "precision": "fp16", "max_grad_norm": None})
    brain.scales, brain.losses = [], []
    brain.fit(range(1), data, train_loader_kwargs={"batch_size": 2})  # nonfinite_patience 3, 6 backoffs

    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler, scales = torch.amp.GradScaler("cpu"), []
    for batch in batched(data, 2):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        assert torch.isfinite(loss)  # SpeechBrain's check_loss_isfinite would not count any step
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    assert scales == brain.scales and len(set(scales)) > 3


# -- 2. optimizers_step: one global norm over every optimizer ---------------------------------------------

MAX_NORM = 0.05


def _two_optimizers(encoder, head):
    enc_opt = torch.optim.SGD([{"params": [encoder[0].weight], "lr": 0.1},
                               {"params": [encoder[0].bias], "lr": 0.02}], lr=0.1, momentum=0.9)
    head_opt = torch.optim.Adam(head.parameters(), lr=0.01)
    return enc_opt, head_opt


def _torch_imperative(data, clip):
    encoder, head = encoder_and_head()
    enc_opt, head_opt = _two_optimizers(encoder, head)
    losses = []
    for batch in batched(data, 4):
        loss = torch.nn.functional.mse_loss(head(encoder(batch["x"])), batch["y"])
        loss.backward()
        clip(enc_opt, head_opt)
        enc_opt.step()
        head_opt.step()
        enc_opt.zero_grad()
        head_opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, {**{f"encoder.{n}": p for n, p in snapshot(encoder).items()},
                    **{f"head.{n}": p for n, p in snapshot(head).items()}}


def test_optimizers_step_clips_every_optimizer_by_one_global_norm():
    class TwoOptimizers(EncoderHeadBrain):
        def init_optimizers(self):
            self.enc_opt, self.head_opt = _two_optimizers(self.modules.encoder, self.modules.head)
            self.optimizers_dict = {"enc": self.enc_opt, "head": self.head_opt}

        def fit_batch(self, batch):
            loss = self.compute_objectives(self.compute_forward(batch, TRAIN), batch, TRAIN)
            loss.backward()
            self.norms.append(float(torch.nn.utils.get_total_norm(
                [p.grad for p in self.modules.parameters()])))
            self.optimizers_step()
            assert all(p.grad is None for p in self.modules.parameters())
            self.losses.append(float(loss.detach()))
            return loss.detach()

    data = regression_data(16)
    encoder, head = encoder_and_head()
    brain = TwoOptimizers({"encoder": encoder, "head": head}, run_opts={**QUIET, "max_grad_norm": MAX_NORM})
    brain.losses, brain.norms = [], []
    brain.fit(range(1), data, train_loader_kwargs={"batch_size": 4})
    assert min(brain.norms) > MAX_NORM  # clipping acted on every step

    def global_clip(*opts):
        params = [p for o in opts for g in o.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)

    def speechbrain_clip(*opts):  # SpeechBrain's optimizers_step: each optimizer's param_groups[0] alone
        for o in opts:
            torch.nn.utils.clip_grad_norm_(o.param_groups[0]["params"], MAX_NORM)

    ref_losses, ref_params = _torch_imperative(data, global_clip)
    sb_losses, sb_params = _torch_imperative(data, speechbrain_clip)
    assert brain.losses == pytest.approx(ref_losses, abs=1e-6)
    assert_params_close(ref_params, brain.state.params)
    # The comparison can tell the two clippings apart.
    assert max(float((sb_params[n] - ref_params[n]).abs().max()) for n in ref_params) > 1e-3
    assert brain.optimizer_step == 4
    assert brain.enc_opt.param_groups[1]["lr"] == pytest.approx(0.02)


# -- 3. a pretrained encoder and a head, two optimizers, default fit_batch ---------------------------------

def test_pretrained_encoder_and_head_with_two_optimizers_match_torch():
    pretrained = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
    with torch.no_grad():
        for p in pretrained.parameters():
            p.copy_(torch.linspace(-0.5, 0.5, p.numel()).reshape(p.shape))

    def models():
        encoder, head = encoder_and_head(seed=3)
        encoder.load_state_dict(pretrained.state_dict())
        return encoder, head

    class Finetune(EncoderHeadBrain):
        def init_optimizers(self):
            self.enc_opt = torch.optim.Adam(self.modules.encoder.parameters(), lr=1e-3)
            self.head_opt = torch.optim.SGD(self.modules.head.parameters(), lr=0.05, momentum=0.5)
            self.optimizers_dict = {"encoder": self.enc_opt, "head": self.head_opt}

        def on_fit_batch_end(self, batch, outputs, loss, should_step):
            self.losses.append(float(loss))

    data = regression_data(16, seed=4)
    encoder, head = models()
    brain = Finetune({"encoder": encoder, "head": head}, run_opts={**QUIET, "max_grad_norm": 0.5})
    brain.losses = []
    brain.fit(range(3), data, train_loader_kwargs={"batch_size": 4})

    encoder, head = models()
    enc_opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    head_opt = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.5)
    losses, clipped = [], 0
    for _ in range(3):
        for batch in batched(data, 4):
            loss = torch.nn.functional.mse_loss(head(encoder(batch["x"])), batch["y"])
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_([*encoder.parameters(), *head.parameters()], 0.5)
            clipped += int(norm > 0.5)
            enc_opt.step()
            head_opt.step()
            enc_opt.zero_grad()
            head_opt.zero_grad()
            losses.append(float(loss.detach()))

    assert clipped > 0  # the global clipping is part of what is compared
    assert brain.losses == pytest.approx(losses, abs=1e-6)
    assert abs(losses[0] - losses[-1]) > 1e-2
    reference = {**{f"encoder.{n}": p for n, p in snapshot(encoder).items()},
                 **{f"head.{n}": p for n, p in snapshot(head).items()}}
    assert_params_close(reference, brain.state.params)
    assert sorted(brain.state.opt_state) == ["encoder", "head"]
    assert brain.enc_opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert brain.head_opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert brain.head_opt.param_groups[0]["momentum"] == pytest.approx(0.5)


# -- 4. SpeechBrain's LR schedulers on the optimizer view (speechbrain in a subprocess) -------------------

SCHEDULERS = textwrap.dedent('''
    import json, sys
    import torch
    import speechbrain  # noqa: F401  (global flags: this is why it runs in a subprocess)
    from speechbrain.nnet.schedulers import (NewBobScheduler, NoamScheduler, ReduceLROnPlateau,
                                             update_learning_rate)
    import fbrain
    from fbrain import optim

    def data(seed, n):
        g = torch.Generator().manual_seed(seed)
        return [{"x": torch.randn(4, generator=g), "y": torch.randn(1, generator=g)} for _ in range(n)]

    TRAIN, VALID = data(1, 12), data(2, 8)  # unrelated targets: the valid loss goes up and down

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def make_scheduler(kind):
        if kind == "newbob":
            return NewBobScheduler(initial_value=0.3, annealing_factor=0.5, improvement_threshold=0.05)
        if kind == "plateau":
            return ReduceLROnPlateau(lr_min=1e-3, factor=0.5, patience=0, dont_halve_until_epoch=1)
        if kind == "noam":
            return NoamScheduler(lr_initial=0.3, n_warmup_steps=4)
        return None

    def epoch_end(kind, scheduler, opt, loss, epoch):
        """What recipes write in on_stage_end(VALID); returns the lr the scheduler chose."""
        if kind == "newbob":
            _, new = scheduler(loss)
        elif kind == "plateau":
            _, new = scheduler([opt], current_epoch=epoch, current_loss=loss)
        elif kind == "manual":
            new = 0.3 / (epoch + 1)
        else:
            return None
        update_learning_rate(opt, new)
        return new

    def batch_end(kind, scheduler, opt):
        return scheduler(opt)[1] if kind == "noam" else None

    class Brain(fbrain.Brain):
        def compute_forward(self, batch, stage):
            return self.modules.model(batch["x"])

        def compute_objectives(self, predictions, batch, stage):
            return torch.nn.functional.mse_loss(predictions, batch["y"])

        def on_fit_batch_end(self, batch, outputs, loss, should_step):
            chosen = batch_end(self.kind, self.scheduler, self.optimizer)
            self.log["train"].append(float(loss))
            if chosen is not None:
                self.log["chosen"].append(chosen)
                self.log["state_lr"].append(float(optim.get_hyperparams(self.state.opt_state)["lr"]))

        def on_stage_end(self, stage, stage_loss, epoch=None):
            if stage != fbrain.Stage.VALID:
                return
            chosen = epoch_end(self.kind, self.scheduler, self.optimizer, stage_loss, epoch)
            self.log["valid"].append(stage_loss)
            if chosen is not None:
                self.log["chosen"].append(chosen)
                self.log["state_lr"].append(float(optim.get_hyperparams(self.state.opt_state)["lr"]))
                self.log["prev_lr"].append(self.optimizer.param_groups[0].get("prev_lr"))

    def run_fbrain(kind):
        brain = Brain({"model": model()}, opt_class=lambda p: torch.optim.SGD(p, lr=0.3),
                      run_opts={"device": "cpu", "noprogressbar": True, "max_grad_norm": None})
        brain.kind, brain.scheduler = kind, make_scheduler(kind)
        brain.log = {"train": [], "valid": [], "chosen": [], "state_lr": [], "prev_lr": []}
        brain.fit(range(1, 7), TRAIN, valid_set=VALID, train_loader_kwargs={"batch_size": 4},
                  valid_loader_kwargs={"batch_size": 8})
        return brain.log

    def run_torch(kind):
        net, scheduler = model(), make_scheduler(kind)
        opt = torch.optim.SGD(net.parameters(), lr=0.3)
        log = {"train": [], "valid": [], "chosen": [], "lr": []}
        collate = torch.utils.data.default_collate
        for epoch in range(1, 7):
            for i in range(0, 12, 4):
                b = collate(TRAIN[i:i + 4])
                loss = torch.nn.functional.mse_loss(net(b["x"]), b["y"])
                loss.backward()
                opt.step()
                opt.zero_grad()
                log["train"].append(float(loss.detach()))
                chosen = batch_end(kind, scheduler, opt)
                if chosen is not None:
                    log["chosen"].append(chosen)
                    log["lr"].append(opt.param_groups[0]["lr"])
            with torch.no_grad():
                b = collate(VALID)
                valid = float(torch.nn.functional.mse_loss(net(b["x"]), b["y"]))
            log["valid"].append(valid)
            chosen = epoch_end(kind, scheduler, opt, valid, epoch)
            if chosen is not None:
                log["chosen"].append(chosen)
                log["lr"].append(opt.param_groups[0]["lr"])
        return log

    kinds = ["manual", "newbob", "plateau", "noam"]
    json.dump({k: {"fbrain": run_fbrain(k), "torch": run_torch(k)} for k in kinds}, open(sys.argv[1], "w"))
''')


@pytest.fixture(scope="module")
def scheduler_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("schedulers") / "runs.json"
    done = subprocess.run([sys.executable, "-c", SCHEDULERS, str(out)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"the scheduler run failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.mark.speechbrain
@pytest.mark.parametrize("kind", ["manual", "newbob", "plateau", "noam"])
def test_speechbrain_schedulers_drive_the_state_lr(kind, scheduler_runs):
    ours, ref = scheduler_runs[kind]["fbrain"], scheduler_runs[kind]["torch"]
    # The state's lr is what the scheduler chose, and the same schedule as on a torch optimizer.
    assert ours["state_lr"] == pytest.approx(ours["chosen"], rel=1e-6)
    assert ours["chosen"] == pytest.approx(ref["chosen"], rel=1e-6)
    assert ref["lr"] == pytest.approx(ref["chosen"], rel=1e-12)
    assert len(set(round(lr, 12) for lr in ours["chosen"])) > 2, ours["chosen"]  # the schedule moved
    # The changed lr is the one the steps used: the whole training run is torch's.
    assert ours["train"] == pytest.approx(ref["train"], abs=1e-6)
    assert ours["valid"] == pytest.approx(ref["valid"], abs=1e-6)
    if kind != "noam":
        assert any(prev is not None for prev in ours["prev_lr"])  # update_learning_rate's extra key stuck


# -- 5. a batch PaddedBatch cannot pad, through fit ---------------------------------------------------------

class SignalSet(torch.utils.data.Dataset):
    fbrain_padded_batch = True  # collated by fbrain.PaddedBatch

    def __init__(self, trailing):
        self.trailing = trailing

    def __len__(self):
        return len(self.trailing)

    def __getitem__(self, i):
        return {"id": f"utt{i}", "sig": torch.ones(3 + i, self.trailing[i]), "y": torch.zeros(1)}


class SignalBrain(fbrain.Brain):
    def compute_forward(self, batch, stage):
        wavs, lens = batch.sig
        return self.modules.model(wavs.mean(dim=1))

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch.y.data)


def test_fit_on_a_batch_padded_batch_cannot_pad_names_the_field():
    brain = SignalBrain({"model": torch.nn.Linear(2, 1)}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1),
                        run_opts=QUIET)
    brain.fit(range(1), SignalSet([2, 2, 2, 2]), train_loader_kwargs={"batch_size": 4})  # pads the first axis
    assert int(brain.state.counters.optimizer_step) == 1
    with pytest.raises(ValueError, match=r"field 'sig' cannot be padded: example 0 has shape \(3, 2\), "
                                         r"example 2 has shape \(5, 5\)"):
        brain.fit(range(1), SignalSet([2, 2, 5, 2]), train_loader_kwargs={"batch_size": 4})


# -- 6. check_gradients, update_average, evaluation_ctx ------------------------------------------------------

def test_check_gradients_drops_nonfinite_gradients_like_speechbrain(caplog):
    class Checked(RegressionBrain):
        def fit_batch(self, batch):
            loss = self.compute_objectives(self.compute_forward(batch, TRAIN), batch, TRAIN)
            loss.backward()
            self.modules.model[2].bias.grad[0] = float("nan")
            self.check_gradients()
            self.grads = {n: p.grad for n, p in self.modules.named_parameters()}
            self.optimizer.step()
            self.optimizer.zero_grad()
            return loss.detach()

    data = regression_data(4)
    brain = Checked({"model": small_mlp()}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1), run_opts=QUIET)
    with caplog.at_level(logging.WARNING, logger="fbrain.brain.core"):
        brain.fit(range(1), data, train_loader_kwargs={"batch_size": 4})
    assert brain.grads["model.2.bias"] is None
    assert all(g is not None and torch.isfinite(g).all() for n, g in brain.grads.items() if n != "model.2.bias")
    assert "model.2.bias" in caplog.text

    # torch: a parameter whose gradient is None is left alone, the others take their step.
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = batched(data, 4)[0]
    torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]).backward()
    model[2].bias.grad = None
    opt.step()
    assert_params_close({f"model.{n}": p for n, p in snapshot(model).items()}, brain.state.params)
    assert torch.equal(brain.state.params["model.2.bias"], small_mlp()[2].bias.detach())
    assert brain.nonfinite_count == 0  # nothing left to skip


def test_update_average_override_is_used_for_train_and_valid_losses():
    class Ema(RegressionBrain):
        def update_average(self, loss, avg_loss):
            self.calls.append(self.step)
            return 0.5 * avg_loss + 0.5 * float(loss)

        def on_fit_batch_end(self, batch, outputs, loss, should_step):
            self.train_losses.append(float(loss))

        def evaluate_batch(self, batch, stage):
            loss = super().evaluate_batch(batch, stage)
            self.valid_losses.append(float(loss))
            return loss

        def on_stage_end(self, stage, stage_loss, epoch=None):
            self.stage_losses[stage] = stage_loss

    brain = Ema({"model": small_mlp()}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1), run_opts=QUIET)
    brain.calls, brain.train_losses, brain.valid_losses, brain.stage_losses = [], [], [], {}
    data = regression_data(12)
    brain.fit(range(1), data, valid_set=data[:6], train_loader_kwargs={"batch_size": 3},
              valid_loader_kwargs={"batch_size": 2})

    def ema(values):
        avg = 0.0
        for v in values:
            avg = 0.5 * avg + 0.5 * v
        return avg

    assert brain.calls == [1, 2, 3, 4, 1, 2, 3]  # self.step counts the batches of each stage
    assert len(set(brain.train_losses)) == 4
    assert brain.stage_losses[fbrain.Stage.TRAIN] == pytest.approx(ema(brain.train_losses), abs=1e-7)
    assert brain.stage_losses[fbrain.Stage.VALID] == pytest.approx(ema(brain.valid_losses), abs=1e-7)
    # ... and it is not the plain mean the default would give.
    assert brain.stage_losses[fbrain.Stage.TRAIN] != pytest.approx(sum(brain.train_losses) / 4, abs=1e-4)


def test_evaluation_ctx_and_eval_precision_autocast_like_torch():
    class CtxEval(RegressionBrain):
        def evaluate_batch(self, batch, stage):
            with self.evaluation_ctx:
                out = self.compute_forward(batch, stage)
                self.dtypes.append(out.dtype)
                return self.compute_objectives(out, batch, stage).detach()

    data = regression_data(8, features=4)
    run_opts = {**QUIET, "eval_precision": "bf16"}
    with_ctx = CtxEval({"model": small_mlp()}, run_opts=run_opts)
    with_ctx.dtypes = []
    default = RegressionBrain({"model": small_mlp()}, run_opts=run_opts)
    fp32 = RegressionBrain({"model": small_mlp()}, run_opts=QUIET)
    kwargs = {"test_loader_kwargs": {"batch_size": 8}}
    ours_ctx, ours_default, ours_fp32 = (b.evaluate(data, **kwargs) for b in (with_ctx, default, fp32))

    model, batch = small_mlp(), batched(data, 8)[0]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = float(torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]))
        plain = float(torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]))
    assert with_ctx.dtypes == [torch.bfloat16]
    assert ours_ctx == pytest.approx(bf16, abs=1e-6) and ours_default == pytest.approx(bf16, abs=1e-6)
    assert ours_fp32 == pytest.approx(plain, abs=1e-7)
    assert abs(bf16 - plain) > 1e-5  # bf16 autocast really ran
    with with_ctx.training_ctx:  # precision fp32: no autocast
        assert model(batch["x"]).dtype == torch.float32


# -- 7. compile=True ---------------------------------------------------------------------------------------

def _compiled_run(run_opts, steps=4):
    class Logged(EncoderHeadBrain):
        def on_fit_batch_end(self, batch, outputs, loss, should_step):
            self.losses.append(float(loss))

    encoder, head = encoder_and_head(seed=5)
    brain = Logged({"encoder": encoder, "head": head}, opt_class=lambda p: torch.optim.Adam(p, lr=0.05),
                   run_opts={**QUIET, **run_opts})
    brain.losses = []
    data = regression_data(4 * steps, seed=6)
    brain.fit(range(2), data, train_loader_kwargs={"batch_size": 4})
    return brain, brain.evaluate(data, test_loader_kwargs={"batch_size": 8})


def test_compile_gives_the_uncompiled_losses():
    import torch._dynamo

    torch._dynamo.reset()
    eager, eager_test = _compiled_run({})
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled, compiled_test = _compiled_run({"compile": True, "compile_mode": "default"})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames_before  # dynamo really compiled
    assert all(m._compiled_call_impl is not None for m in compiled.modules.values())
    # Names and Parameter objects are those of the uncompiled modules: state, binding, checkpoints agree.
    assert list(compiled.state.params) == list(eager.state.params)
    assert dict(compiled.modules.named_parameters()).keys() == compiled.state.params.keys()
    for name, p in compiled.modules.named_parameters():
        assert p.data_ptr() == compiled.state.params[name].data_ptr()
    assert len(compiled.losses) == 8
    assert max(abs(a - b) for a, b in zip(compiled.losses, eager.losses)) < 1e-5
    assert abs(eager.losses[0] - eager.losses[-1]) > 1e-3
    assert compiled_test == pytest.approx(eager_test, abs=1e-5)
    assert_params_close(eager.state.params, compiled.state.params, atol=1e-5)
    torch._dynamo.reset()


class NormedBrain(RegressionBrain):
    """Logs its losses; trains a model with BatchNorm (buffers the step returns) and, optionally, dropout."""

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        self.losses.append(float(loss))


STEPS_DATA = regression_data(24, seed=7)
COMPILED = {"compile_steps": True, "compile_mode": "default"}


def _steps_run(run_opts, dropout=0.0, brain_class=NormedBrain, seed=0):
    torch.manual_seed(3)
    # No bias before the BatchNorm: its gradient is rounding noise, which Adam would amplify.
    model = torch.nn.Sequential(torch.nn.Linear(4, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Dropout(dropout), torch.nn.Linear(16, 1))
    brain = brain_class({"model": model}, opt_class=lambda p: torch.optim.Adam(p, lr=0.05),
                        hparams={"seed": seed}, run_opts={**QUIET, **run_opts})
    brain.losses = []
    brain.fit(range(2), STEPS_DATA, valid_set=STEPS_DATA[:8], train_loader_kwargs={"batch_size": 4},
              valid_loader_kwargs={"batch_size": 4})
    return brain, brain.evaluate(STEPS_DATA, test_loader_kwargs={"batch_size": 8})


def test_compile_steps_compiles_the_whole_step_and_gives_the_eager_results():
    import torch._dynamo

    torch._dynamo.reset()
    eager, eager_test = _steps_run({})
    torch._dynamo.utils.counters.clear()
    compiled, compiled_test = _steps_run(COMPILED)
    # Each step is captured whole, with no graph break: one graph for the train step, two for the
    # eval step (validation batches of 4, test batches of 8).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    assert not torch._dynamo.utils.counters["graph_break"]
    assert not any(c.failed for c in compiled._steps._compilers.values()) and len(compiled._steps._compilers) == 2
    assert len(compiled.losses) == 12 and abs(eager.losses[0] - eager.losses[-1]) > 1e-3
    assert max(abs(a - b) for a, b in zip(compiled.losses, eager.losses)) < 1e-5
    assert compiled_test == pytest.approx(eager_test, abs=1e-5)
    assert_params_close(eager.state.params, compiled.state.params, atol=1e-5)
    assert_params_close(eager.state.buffers, compiled.state.buffers, atol=1e-5)  # BatchNorm statistics
    assert int(compiled.state.counters.optimizer_step) == 12
    # A second fit makes new steps (new optimizers) but reuses the Brain's compiled graphs.
    compiled.fit(range(2, 3), STEPS_DATA, train_loader_kwargs={"batch_size": 4})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3 and len(compiled.losses) == 18
    torch._dynamo.reset()


def test_compile_steps_auto_compiles_the_train_step_of_a_fit_long_enough_only(caplog):
    """The default compile_steps="auto": a fit planning fewer than auto_compile_min_steps train
    steps runs eagerly; one planning at least that many runs its train step compiled (eval stays
    eager), says so, and trains as the eager run within 1e-5."""
    import logging

    import torch._dynamo

    torch._dynamo.reset()
    eager, eager_test = _steps_run({})  # 2 epochs x 6 batches: 12 planned steps, far below 20,000
    assert eager.compile_steps == "auto" and not eager._steps._compilers
    with caplog.at_level(logging.INFO, logger="fbrain.brain.default_steps"):
        auto, auto_test = _steps_run({"auto_compile_min_steps": 12})
    assert "compile_steps=auto: this fit plans 12 train steps" in caplog.text
    assert list(auto._steps._compilers) == ["train"] and not auto._steps._compilers["train"].failed
    assert max(abs(a - b) for a, b in zip(auto.losses, eager.losses)) < 1e-5 and len(auto.losses) == 12
    assert auto_test == pytest.approx(eager_test, abs=1e-5)
    auto.fit(range(2, 3), STEPS_DATA, train_loader_kwargs={"batch_size": 4})  # plans 6: eager
    assert not auto._steps.compile_train and len(auto.losses) == 18
    torch._dynamo.reset()


def test_the_planned_train_steps_count_epochs_left_batches_and_limits():
    from fbrain.brain.auto_compile import planned_train_steps

    counter = fbrain.EpochCounter(limit=5)
    counter.current = 2  # resumed after epoch 2
    assert planned_train_steps(counter, range(10)) == 30
    assert planned_train_steps(counter, range(10), done_in_epoch=4) == 26  # resumed mid-epoch
    assert planned_train_steps(counter, range(10), step_limit=7) == 7
    assert planned_train_steps(range(3), range(10)) == 30
    assert planned_train_steps(iter(range(3)), range(10)) is None  # a counter without a length
    assert planned_train_steps(range(3), iter(range(10))) is None  # a loader without a length
    with pytest.raises(ValueError, match="compile_steps: expected true, false or auto"):
        fbrain.Brain({"m": torch.nn.Linear(1, 1)}, run_opts={"compile_steps": "yes"})


def test_compile_steps_dropout_is_a_function_of_the_brains_seed():
    import torch._dynamo

    torch._dynamo.reset()
    first, _ = _steps_run(COMPILED, dropout=0.3)
    again, _ = _steps_run(COMPILED, dropout=0.3)
    other_seed, _ = _steps_run(COMPILED, dropout=0.3, seed=1)
    no_dropout, _ = _steps_run(COMPILED)
    assert first.losses == again.losses  # the same seed: the same masks, bit for bit
    assert first.losses != other_seed.losses  # masks come from the state's key ...
    assert first.losses != no_dropout.losses  # ... and dropout really ran
    # Masks change from step to step: the same batch gives a different loss at the next epoch.
    assert first.losses[:6] != first.losses[6:]
    torch._dynamo.reset()


def test_compile_steps_falls_back_to_eager_with_a_warning(caplog):
    import torch._dynamo

    class Untraceable(NormedBrain):
        def compute_forward(self, batch, stage):
            torch._dynamo.graph_break()  # a step that cannot be captured whole
            return super().compute_forward(batch, stage)

    torch._dynamo.reset()
    eager, _ = _steps_run({})
    with caplog.at_level("WARNING", logger="fbrain.brain.compiled_steps"):
        brain, _ = _steps_run(COMPILED, brain_class=Untraceable)
        brain.fit(range(2, 3), STEPS_DATA, train_loader_kwargs={"batch_size": 4})  # new steps: no new attempt
    assert "the train step cannot be compiled and runs eagerly (Unsupported" in caplog.text
    assert "the eval step cannot be compiled and runs eagerly (Unsupported" in caplog.text
    assert caplog.text.count("cannot be compiled") == 2  # once per kind, not once per batch or fit
    assert brain.losses[:12] == eager.losses  # the eager step, from an untouched state
    torch._dynamo.reset()


def test_compile_steps_falls_back_when_torch_runs_out_of_recompiles(caplog):
    import torch._dynamo

    torch._dynamo.reset()
    eager, eager_test = _steps_run({})
    # One graph per compiled function: the eval step's second batch size (8 after 4) needs a second.
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level("WARNING", logger="fbrain.brain.compiled_steps"):
        brain, test_loss = _steps_run(COMPILED)
    assert "the eval step cannot be compiled and runs eagerly (FailOnRecompileLimitHit" in caplog.text
    assert not brain._steps._compilers["train"].failed and brain._steps._compilers["eval"].failed
    assert test_loss == pytest.approx(eager_test, abs=1e-5)
    torch._dynamo.reset()


def test_compile_steps_raises_a_recipes_own_error_as_itself_and_keeps_compiling(caplog):
    import torch._dynamo

    class FailsOnce(NormedBrain):
        def compute_objectives(self, predictions, batch, stage):
            if self.fail:
                raise ValueError("the recipe's own error")
            return super().compute_objectives(predictions, batch, stage)

    torch._dynamo.reset()
    FailsOnce.fail = True
    with caplog.at_level("WARNING", logger="fbrain.brain.compiled_steps"):
        with pytest.raises(ValueError, match="the recipe's own error") as raised:
            _steps_run(COMPILED, brain_class=FailsOnce)
    assert raised.value.__context__ is None  # not chained to torch.compile's report of it
    assert "cannot be compiled" not in caplog.text
    FailsOnce.fail = False
    eager, _ = _steps_run({})
    brain, _ = _steps_run(COMPILED, brain_class=FailsOnce)
    assert not brain._steps._compilers["train"].failed
    assert max(abs(a - b) for a, b in zip(brain.losses, eager.losses)) < 1e-5
    torch._dynamo.reset()


def test_compile_module_keys_and_errors():
    encoder, head = encoder_and_head()
    brain = EncoderHeadBrain({"encoder": encoder, "head": head}, opt_class=lambda p: torch.optim.SGD(p, lr=0.1),
                             run_opts={**QUIET, "compile": True, "compile_module_keys": ["head"]})
    from fbrain.brain.module_compile import compile_modules
    compile_modules(brain.modules, brain)  # what on_fit_start does
    assert brain.modules.head._compiled_call_impl is not None
    assert brain.modules.encoder._compiled_call_impl is None
    for opts, error, match in [
        ({"compile": True, "compile_module_keys": ["decoder"]}, ValueError, "compile_module_keys: module 'decoder'"),
        ({"jit": True}, NotImplementedError, "jit"),
    ]:
        brain = EncoderHeadBrain({"encoder": encoder_and_head()[0]}, run_opts={**QUIET, **opts})
        with pytest.raises(error, match=match):
            brain.fit(range(1), regression_data(4))
    torch._dynamo.reset()



class NoisyEval(RegressionBrain):
    """Adds noise to its predictions when it evaluates, and logs each eval batch's loss."""

    def compute_objectives(self, predictions, batch, stage):
        if stage != fbrain.Stage.TRAIN:
            predictions = predictions + torch.randn_like(predictions)
        return super().compute_objectives(predictions, batch, stage)

    def evaluate_batch(self, batch, stage):
        loss = super().evaluate_batch(batch, stage)
        self.eval_losses.append(float(loss))
        return loss


@pytest.mark.parametrize("run_opts", [{}, COMPILED], ids=["eager", "compiled"])
def test_every_eval_batch_draws_fresh_noise_on_both_step_paths(run_opts):
    import torch._dynamo

    torch._dynamo.reset()
    brain = NoisyEval({"model": torch.nn.Linear(4, 1)}, run_opts={**QUIET, **run_opts})
    brain.eval_losses = []
    same_batch = regression_data(4, seed=1)[:1] * 3  # one batch three times: only the noise differs
    brain.evaluate(same_batch, test_loader_kwargs={"batch_size": None})
    first, brain.eval_losses = brain.eval_losses, []
    brain.evaluate(same_batch, test_loader_kwargs={"batch_size": None})
    assert len(set(first)) == 3  # fresh draws for each batch
    assert brain.eval_losses == first  # from the state's key: the same stage draws the same
    torch._dynamo.reset()
