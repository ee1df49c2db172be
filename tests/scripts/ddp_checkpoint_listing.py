"""Launched by tests/test_speechbrain_checkpoint_contracts.py: SpeechBrain's test_parallel_checkpoint.

usage: ddp_checkpoint_listing.py OUT_DIR   (writes OUT_DIR/rank{R}.json)

Two gloo ranks share one Checkpointer folder and save once; every rank then lists the folder, which
must hold the checkpoint and nothing else (no lock file, no leftover of the save).
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from fbrain.checkpoint import Checkpointer

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
checkpointer = Checkpointer(os.path.join(sys.argv[1], "ckpts"), {"recoverable": torch.nn.Linear(2, 2)})
saved = checkpointer.save_checkpoint(name="test")  # every rank waits until rank 0 has written it
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"listing": sorted(os.listdir(checkpointer.checkpoints_dir)),
               "saved": None if saved is None else saved.path.name}, f)
dist.barrier()

# Leave without torch's process-group teardown (see tests/scripts/ddp_run_on_main.py).
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
