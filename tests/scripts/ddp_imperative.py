"""Launched by tests/test_distributed.py: an imperative fit_batch Brain under torchrun (or alone, for
the reference).

usage: ddp_imperative.py OUT_DIR PER_RANK_BATCH MODE

MODE "plain": ``loss.backward(); self.optimizer.step(); self.optimizer.zero_grad()``.
MODE "speechbrain": SpeechBrain's fit_batch: ``no_sync`` while accumulating 2 micro-batches, then
``optimizers_step()`` (clipping to max_grad_norm=0.5 after the gradients are averaged).

Trains 2 epochs on 32 examples with shuffle=False (one process with WORLD x PER_RANK_BATCH sees the
same examples per step). Creates the experiment folder OUT_DIR/exp. Writes OUT_DIR/rank{R}.pt: the params, the stage-end train losses, and
how many gradient all-reduces ran.
"""

import os
import sys

import torch

import fbrain
from fbrain import distributed

out_dir, batch_size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.makedirs(out_dir, exist_ok=True)
g = torch.Generator().manual_seed(0)
data = [(torch.randn(6, generator=g), torch.randn(2, generator=g)) for _ in range(32)]
grad_collectives = []
_mean = distributed.mean_across_ranks


def counting_mean(grads, loss, group):
    if grads:
        grad_collectives.append(1)
    return _mean(grads, loss, group)


distributed.mean_across_ranks = counting_mean


class Imperative(fbrain.Brain):
    def compute_forward(self, batch, stage):
        return self.modules.model(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])

    def fit_batch(self, batch):
        if mode == "plain":
            loss = self.compute_objectives(self.compute_forward(batch, fbrain.Stage.TRAIN), batch, fbrain.Stage.TRAIN)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            return loss.detach()
        should_step = self.step % self.grad_accumulation_factor == 0
        with self.no_sync(not should_step):
            outputs = self.compute_forward(batch, fbrain.Stage.TRAIN)
            loss = self.compute_objectives(outputs, batch, fbrain.Stage.TRAIN)
            (loss / self.grad_accumulation_factor).backward()
        if should_step:
            self.optimizers_step()
        return loss.detach()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == fbrain.Stage.TRAIN:
            stage_losses.append(stage_loss)


stage_losses = []
# Every rank calls it (before the Brain joins the process group); only rank 0 writes.
fbrain.create_experiment_directory(os.path.join(out_dir, "exp"), copy_caller=False)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
run_opts = {"noprogressbar": True, "max_grad_norm": 0.0}
if mode == "speechbrain":
    run_opts.update(grad_accumulation_factor=2, max_grad_norm=0.5)
brain = Imperative({"model": model}, lambda p: torch.optim.Adam(p, lr=1e-2), run_opts=run_opts)
brain.fit(range(2), data, train_loader_kwargs={"batch_size": batch_size, "shuffle": False})
torch.save({"params": {k: v.clone() for k, v in brain.state.params.items()}, "losses": stage_losses,
            "optimizer_steps": int(brain.state.counters.optimizer_step), "grad_collectives": len(grad_collectives)},
           os.path.join(out_dir, f"rank{distributed.rank()}.pt"))
distributed.barrier()

# Every result is written. torch 2.13's CPU build once aborted a rank while the interpreter tore
# down the process group ("terminate called without an active exception", CI of 2026-12-02):
# leave without the teardown, so the test sees this script's work, not torch's exit path.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
