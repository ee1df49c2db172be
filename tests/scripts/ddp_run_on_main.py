"""Launched by tests/test_distributed.py: run_on_main's result and post_func on every rank.

usage: ddp_run_on_main.py OUT_DIR   (writes OUT_DIR/rank{R}.json)
"""

import json
import os
import sys

import torch.distributed as dist

import fbrain

dist.init_process_group("gloo")
rank = dist.get_rank()
posts = []
result = fbrain.run_on_main(lambda: {"made by": dist.get_rank()}, post_func=lambda: posts.append("post"))
everywhere = fbrain.run_on_main(lambda: 7, post_func=lambda: posts.append("everywhere"), run_post_on_main=True)
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"result": result, "everywhere": everywhere, "posts": posts}, f)
dist.barrier()

# Every result is written. torch 2.13's CPU build once aborted a rank while the interpreter tore
# down the process group ("terminate called without an active exception", CI of 2026-12-02):
# leave without the teardown, so the test sees this script's work, not torch's exit path.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
