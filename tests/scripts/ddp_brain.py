"""Launched by tests/test_distributed.py: fbrain.Brain under torchrun (or alone, for the reference).

usage: ddp_brain.py OUT_DIR PER_RANK_BATCH [--dropout] [--batch-sampler] [--epochs N] [--shard]
                    [--fail-shard-write N]
                   [--kill-at-step N | --signal-at-step N | --every-3-steps]

Trains an MLP with dropout for 2 epochs on 32 examples (shuffle=False, so the shards are
interleaved and one process with a batch of WORLD x PER_RANK_BATCH sees the same examples per
step), with an intra-epoch checkpoint after every step. Writes OUT_DIR/rank{R}.fbrain (the final
TrainState) and, on rank 0, OUT_DIR/losses.txt. With kill-at-step N, rank 0 SIGKILLs itself after
its N-th step of epoch 2. With signal-at-step N, rank 1 alone sends itself SIGTERM after its N-th
step of epoch 2, and intra-epoch checkpoints come every 3 steps (as with --every-3-steps, which
gives the same arithmetic without a signal). --dropout puts a Dropout(0.3) in the model.
--batch-sampler gives fit a batch_sampler (batches of PER_RANK_BATCH in order), which fbrain shards
across the ranks. --epochs N trains N epochs (default 2); --shard keeps the optimizer state sharded
(run option shard_optimizer_state). --fail-shard-write N makes rank 1's N-th shard write fail (a
full disk); fit's error is written to error-rank<R>.txt and the script ends there.
"""

import os
import signal
import sys

import torch

import fbrain
from fbrain import checkpoint

out_dir, batch_size, options = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
kill_at = int(options[options.index("--kill-at-step") + 1]) if "--kill-at-step" in options else None
signal_at = int(options[options.index("--signal-at-step") + 1]) if "--signal-at-step" in options else None
interval = 3 if signal_at is not None or "--every-3-steps" in options else 1
dropout = 0.3 if "--dropout" in options else 0.0
g = torch.Generator().manual_seed(0)
data = [(torch.randn(6, generator=g), torch.randn(2, generator=g)) for _ in range(32)]


class Regression(fbrain.Brain):
    def compute_forward(self, batch, stage):
        return self.modules.model(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch[1])

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        if fbrain.distributed.is_main_process():
            with open(os.path.join(out_dir, "losses.txt"), "a") as f:
                f.write(f"{counter.current} {self.step} {float(loss).hex()}\n")
        if kill_at is not None and counter.current == 2 and self.step == kill_at and fbrain.distributed.rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if signal_at is not None and counter.current == 2 and self.step == signal_at and fbrain.distributed.rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 2))
counter = fbrain.EpochCounter(int(options[options.index("--epochs") + 1]) if "--epochs" in options else 2)
checkpointer = checkpoint.Checkpointer(os.path.join(out_dir, "ckpts"), {"counter": counter})
brain = Regression({"model": model}, lambda p: torch.optim.Adam(p, lr=1e-2),
                   run_opts={"ckpt_interval_steps": interval, "noprogressbar": True,
                             "shard_optimizer_state": "--shard" in options}, checkpointer=checkpointer)
if "--batch-sampler" in options:
    loader_kwargs = {"batch_sampler": torch.utils.data.BatchSampler(range(len(data)), batch_size, drop_last=False)}
else:
    loader_kwargs = {"batch_size": batch_size, "shuffle": False}
if "--fail-shard-write" in options:
    fail_at, writes, write = int(options[options.index("--fail-shard-write") + 1]), [], fbrain.checkpoint.shards.write

    def failing_write(folder, rank, world, tree):
        writes.append(folder)
        if rank == 1 and len(writes) == fail_at:
            raise OSError(28, "No space left on device (injected)")
        write(folder, rank, world, tree)
    fbrain.checkpoint.shards.write = failing_write
try:
    brain.fit(counter, data, train_loader_kwargs=loader_kwargs)
except checkpoint.CheckpointError as err:
    if "--fail-shard-write" not in options:
        raise
    with open(os.path.join(out_dir, f"error-rank{fbrain.distributed.rank()}.txt"), "w") as f:
        f.write(str(err))
    sys.stdout.flush()
    os._exit(0)
except SystemExit as stop:
    # A signal stopped the run after its checkpoint (the Brain raises SystemExit(143)), and the
    # Brain left the process group first. Leave with that status, without the interpreter's exit
    # path (see the end of this file).
    with open(os.path.join(out_dir, f"stopped-rank{os.environ['RANK']}.txt"), "w") as f:
        f.write(f"group still up: {torch.distributed.is_initialized()}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(stop.code if isinstance(stop.code, int) else 1)
state = brain.state
if brain.shard_group is not None:  # the whole optimizer state, to compare with replicated runs
    state = fbrain.sharding.gather_opt_state(state, brain._layout.transformation(), brain.shard_group)
checkpoint.save(os.path.join(out_dir, f"rank{fbrain.distributed.rank()}.fbrain"), state)
fbrain.distributed.barrier()

# Every result is written. torch 2.13's CPU build once aborted a rank while the interpreter tore
# down the process group ("terminate called without an active exception", CI of 2026-12-02):
# leave without the teardown, so the test sees this script's work, not torch's exit path.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
