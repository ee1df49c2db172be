"""Launched by tests/test_distributed_data.py under torchrun: which examples each rank trains on.

usage: ddp_data.py OUT_DIR {batch-sampler|dynamic|uneven}

batch-sampler: a torch BatchSampler over 18 examples (batches of 3: 6 batches) given to fit;
dynamic: SpeechBrain's DynamicBatchSampler over 24 examples of varied lengths;
uneven: each rank builds its own DataLoader, rank 0 with one batch more (fbrain must refuse).
Writes OUT_DIR/rank{R}.json: {epoch: [example ids of each step]}.
"""

import json
import os
import sys

import torch

import fbrain

out_dir, mode = sys.argv[1], sys.argv[2]
seen: dict = {}


class Dataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i)]), torch.ones(1)


class Recorder(fbrain.Brain):
    def compute_forward(self, batch, stage):
        return self.modules.model(batch[0])

    def compute_objectives(self, predictions, batch, stage):
        if stage == fbrain.Stage.TRAIN:
            seen.setdefault(str(self.hparams.counter.current), []).append([int(v) for v in batch[0].flatten()])
        return torch.nn.functional.mse_loss(predictions, batch[1])


counter = fbrain.EpochCounter(2)
brain = Recorder({"model": torch.nn.Linear(1, 1)}, lambda p: torch.optim.SGD(p, lr=1e-3),
                 hparams={"counter": counter}, run_opts={"noprogressbar": True})
if mode == "batch-sampler":
    data = Dataset(18)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(data), batch_size=3, drop_last=False)
    brain.fit(counter, data, train_loader_kwargs={"batch_sampler": sampler})
elif mode == "dynamic":
    from speechbrain.dataio.sampler import DynamicBatchSampler

    data = Dataset(24)
    lengths = [1 + (7 * i) % 13 for i in range(24)]

    class Lengths:  # what DynamicBatchSampler reads: the length of each example
        def __len__(self):
            return len(lengths)

    sampler = DynamicBatchSampler(Lengths(), max_batch_length=20, num_buckets=3, lengths_list=lengths, shuffle=True,
                                  batch_ordering="random")
    brain.fit(counter, data, train_loader_kwargs={"batch_sampler": sampler})
else:
    rank = fbrain.distributed.rank()
    loader = torch.utils.data.DataLoader(Dataset(12 if rank == 0 else 9), batch_size=3)
    try:
        brain.fit(counter, loader)
    except fbrain.distributed.RankMismatchError as err:
        seen = {"error": str(err)}

with open(os.path.join(out_dir, f"rank{fbrain.distributed.rank()}.json"), "w") as f:
    json.dump(seen, f)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # see ddp_brain.py: leave without torch's process-group teardown
