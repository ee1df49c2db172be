"""Launched by tests/test_sharding.py under torchrun: sharded optimizer state against replicated.

usage: ddp_sharded.py OUT_DIR

On each rank, for Adam and SGD with momentum (and Adam with small collective buckets), with and without clipping (max_grad_norm=0.05, so it
clips), trains one state replicated and one with sharded optimizer state for 20 steps on the same
batches (rank-dependent), step 7's batch holding an inf on rank 1 (a non-finite step on every
rank). Writes OUT_DIR/rank{R}.json with the largest parameter difference per case, whether the
skipped step was skipped, the largest difference of the logged losses, the shard's share of the optimizer state's elements, and how far the
gathered optimizer state is from the replicated one.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

import fbrain
from fbrain import optim, sharding

dist.init_process_group("gloo")
rank, out_dir = dist.get_rank(), sys.argv[1]
group = dist.group.WORLD


def model():
    torch.manual_seed(0)  # odd sizes: the slices need padding
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


net = model()


def loss_fn(params, buffers, batch, rng):
    pred, _ = fbrain.apply_module(net, params, buffers, batch[0])
    return torch.nn.functional.mse_loss(pred, batch[1])


def elements(tree):
    return sum(t.numel() for t in fbrain.tree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.ndim > 0)


results = {}
for name, opt in {"adam": optim.adam(1e-2), "sgd": optim.sgd(0.05, momentum=0.9),
                  "adam-arithmetic": optim.adam(1e-2, fused=False),
                  "adam-arithmetic-buckets": optim.adam(1e-2, fused=False)}.items():
    # "-buckets": collectives of at most 40 elements per rank: the 7x13 weight alone, the rest together.
    bucket_elements = 40 if name.endswith("-buckets") else sharding.BUCKET_ELEMENTS
    for clip in (None, 0.05):
        replicated = fbrain.TrainState.create(net, opt, seed=0)
        sharded = sharding.shard_state(replicated, opt, group)
        direct = fbrain.TrainState.create(net, sharding.initialising_shards(opt, group), seed=0)
        direct_equal = all(torch.equal(a, b) for a, b in zip(fbrain.tree.tree_leaves(direct.opt_state),
                                                             fbrain.tree.tree_leaves(sharded.opt_state))
                           if isinstance(a, torch.Tensor))
        step = fbrain.make_train_step(loss_fn, opt, max_grad_norm=clip, process_group=group)
        sharded_step = fbrain.make_train_step(loss_fn, opt, max_grad_norm=clip, process_group=group,
                                              shard_optimizer_state=True, bucket_elements=bucket_elements)
        g = torch.Generator().manual_seed(100 + rank)
        worst, loss_gap, skipped = 0.0, 0.0, []
        for i in range(20):
            x, y = torch.randn(5, 7, generator=g), torch.randn(5, 3, generator=g)
            if i == 7 and rank == 1:
                x[0, 0] = float("inf")
            replicated, m1 = step(replicated, (x, y))
            sharded, m2 = sharded_step(sharded, (x, y))
            if m1["loss"].isfinite():
                loss_gap = max(loss_gap, abs(float(m1["loss"]) - float(m2["loss"])))
            else:
                assert not m2["loss"].isfinite()
            skipped.append([bool(m1["skipped"]), bool(m2["skipped"])])
            worst = max(worst, max((replicated.params[k] - sharded.params[k]).abs().max().item() for k in replicated.params))
        gathered = sharding.gather_opt_state(sharded, opt, group)
        state_gap = max((a - b).abs().max().item() for a, b in zip(fbrain.tree.tree_leaves(gathered.opt_state),
                                                                   fbrain.tree.tree_leaves(replicated.opt_state))
                        if isinstance(a, torch.Tensor) and a.is_floating_point())
        results[f"{name}-clip{clip}"] = {
            "max_param_diff": worst, "loss_gap": loss_gap, "skipped": skipped, "direct_init_equal": direct_equal, "state_gap": state_gap,
            "share": elements(sharded.opt_state) / elements(replicated.opt_state),
            "optimizer_step": [int(replicated.counters.optimizer_step), int(sharded.counters.optimizer_step)]}

with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(results, f)
dist.barrier()
sys.stdout.flush()
os._exit(0)  # see ddp_brain.py: leave without torch's process-group teardown
