"""Launched by tests/test_resume.py: a Brain training run that can be killed and resumed.

usage: resume_train.py OUT_DIR [slow-save | preempt]

Trains an MLP with dropout on a shuffled loader for 2 epochs, with an intra-epoch checkpoint after
every step. Every step's loss is appended to OUT_DIR/losses.txt (as float.hex, exact) and announced
on stdout as "STEP <epoch> <step>", so the test can SIGKILL the process at a chosen point. With
"slow-save", the 6th checkpoint announces "SAVING" half-way through its write and then stalls. With
"preempt", no intra-epoch checkpoints are saved on a schedule: only the one a SIGTERM makes.
"""

import os
import sys
import time

import torch

import fbrain
from fbrain import checkpoint

out_dir = sys.argv[1]
slow_save = len(sys.argv) > 2 and sys.argv[2] == "slow-save"
preempt = len(sys.argv) > 2 and sys.argv[2] == "preempt"
g = torch.Generator().manual_seed(0)
data = [(torch.randn(6, generator=g), torch.randn(2, generator=g)) for _ in range(40)]


class Regression(fbrain.Brain):
    def compute_forward(self, batch, stage):
        return self.modules.model(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        with open(os.path.join(out_dir, "losses.txt"), "a") as f:
            f.write(f"{counter.current} {self.step} {float(loss).hex()}\n")
        print(f"STEP {counter.current} {self.step}", flush=True)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == fbrain.Stage.TRAIN:
            with open(os.path.join(out_dir, "epochs.txt"), "a") as f:
                f.write(f"{epoch} {float(stage_loss).hex()}\n")
            checkpointer.save_and_keep_only(meta={"epoch": epoch})


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 2))
counter = fbrain.EpochCounter(2)
checkpointer = checkpoint.Checkpointer(os.path.join(out_dir, "ckpts"), {"counter": counter})
saves = [0]


def stalling_save(obj, path):
    saves[0] += 1
    with open(path, "wb") as f:
        f.write(b"half a file")
    if slow_save and saves[0] == 6:
        print("SAVING", flush=True)
        time.sleep(120)


checkpointer.add_recoverable("probe", object(), custom_save_hook=stalling_save, custom_load_hook=lambda *a: None)
brain = Regression({"model": model}, lambda p: torch.optim.Adam(p, lr=1e-2), hparams={"seed": 3},
                   run_opts={"ckpt_interval_steps": 0 if preempt else 1, "noprogressbar": True},
                   checkpointer=checkpointer)
brain.fit(counter, data, train_loader_kwargs={"batch_size": 4, "shuffle": True})
checkpoint.save(os.path.join(out_dir, "final.fbrain"), brain.state)
print("DONE", flush=True)
