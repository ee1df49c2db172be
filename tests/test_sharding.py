"""Sharded optimizer state (ZeRO, fbrain.sharding): 2 CPU ranks under torchrun (gloo) against the
replicated data-parallel step, and the layout's arithmetic in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from fbrain import optim, sharding

SCRIPT = REPO / "tests" / "scripts" / "ddp_sharded.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.load(open(out / f"rank{r}.json")) for r in (0, 1)]


@pytest.mark.parametrize("case", ["adam-clipNone", "adam-clip0.05", "sgd-clipNone", "sgd-clip0.05",
                                  "adam-arithmetic-clipNone", "adam-arithmetic-clip0.05"])
def test_sharded_state_trains_as_the_replicated_step_over_20_steps(ranks, case):
    for rank in ranks:
        r = rank[case]
        if case == "adam-arithmetic-clipNone":
            # Two ranks: the same gradient sums; the multi-tensor arithmetic is elementwise: bit for bit.
            assert r["max_param_diff"] == 0.0 and r["loss_gap"] == 0.0
        else:
            # ATen's fused CPU kernels round an element by its position in the tensor (vector body or
            # tail), and a slice moves it; with clipping the global norm is summed in another order.
            assert r["max_param_diff"] <= 1e-6 and r["loss_gap"] <= 1e-6
        assert r["skipped"][7] == [True, True] and sum(a for a, _ in r["skipped"]) == 1  # a global decision
        assert r["optimizer_step"] == [19, 19]
        assert r["state_gap"] <= 1e-6  # gathered, the shards are the replicated optimizer state
        assert r["share"] <= 0.55  # each rank holds about half of it
        assert r["direct_init_equal"]  # initialising the shards directly = cutting the whole state


def test_the_layout_cuts_and_joins_every_per_parameter_tensor():
    params = {"w": torch.randn(5, 3), "b": torch.randn(1), "frozen": torch.randn(2)}
    opt = optim.nadam(1e-3)  # per-parameter 0-dim mu_product: kept whole on every rank
    state = opt.init(params)
    layouts = [sharding.ShardLayout.of(params, ["w", "b"], 3, r) for r in range(3)]
    assert layouts[0].chunks == (5, 1)
    pieces = [sharding.shard_opt_state(state, layout) for layout in layouts]
    assert pieces[1].slots["exp_avg"]["w"].shape == (5,) and pieces[2].slots["exp_avg"]["b"].shape == (1,)
    assert pieces[0].slots["mu_product"]["w"].shape == ()
    back = sharding.unshard_opt_state(pieces, layouts[0])
    for key in ("exp_avg", "exp_avg_sq", "mu_product"):
        for name in ("w", "b"):
            assert torch.equal(back.slots[key][name], state.slots[key][name])
    whole = sharding.unshard([sharding.shard(params, layout) for layout in layouts], layouts[0])
    assert all(torch.equal(whole[n], params[n]) for n in ("w", "b"))
    # Everything that is not a per-parameter tensor (hyperparameters, counts) comes back as it was.
    assert back.hyperparams.keys() == state.hyperparams.keys()
    assert all(type(back.hyperparams[k]) is type(v) for k, v in state.hyperparams.items())
    assert torch.equal(back.count, state.count)


def test_an_optimizer_that_is_not_elementwise_is_refused():
    params = {"w": torch.randn(4)}
    with pytest.raises(ValueError, match="max_grad_norm"):
        sharding.require_elementwise(optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(1.0)), ["w"])
    for opt in (optim.adam(1e-3), optim.sgd(0.1, momentum=0.9, weight_decay=1e-2), optim.rmsprop(1e-3, centered=True),
                optim.with_ema(optim.adamw(1e-3), 0.9), optim.adadelta(1.0)):
        sharding.require_elementwise(opt, list(params))


BRAIN_SCRIPT = REPO / "tests" / "scripts" / "ddp_brain.py"


def brain_run(out, *args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    done = subprocess.run([sys.executable, *launcher, str(BRAIN_SCRIPT), str(out), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_brain_with_sharded_state_resumes_on_another_number_of_ranks(tmp_path):
    from fbrain import checkpoint
    from fbrain.tree import tree_leaves
    from conftest import max_abs_diff

    brain_run(tmp_path / "replicated", 4, "--epochs", 3)
    brain_run(tmp_path / "sharded", 4, "--epochs", 3, "--shard")
    # 2 ranks -> 1 process (the same global batch of 8) -> 2 ranks, resuming from the checkpoints,
    # which hold the whole optimizer state whatever the number of ranks that saved them.
    brain_run(tmp_path / "resharded", 4, "--epochs", 1, "--shard")
    brain_run(tmp_path / "resharded", 8, "--epochs", 2, nproc=1)
    brain_run(tmp_path / "resharded", 4, "--epochs", 3, "--shard")
    # Each run went on from the last one's checkpoint (a failed recovery would restart at epoch 1).
    epochs = [int(line.split()[0]) for line in open(tmp_path / "resharded" / "losses.txt")]
    assert epochs == [1] * 4 + [2] * 4 + [3] * 4, epochs
    replicated = checkpoint.load(tmp_path / "replicated" / "rank0.fbrain")
    for run in ("sharded", "resharded"):
        for rank in (0, 1):
            state = checkpoint.load(tmp_path / run / f"rank{rank}.fbrain")
            assert int(state.counters.optimizer_step) == int(replicated.counters.optimizer_step) == 12
            assert max_abs_diff(state.params, replicated.params) <= 1e-5, run
            pairs = zip(tree_leaves(state.opt_state), tree_leaves(replicated.opt_state))
            assert max(float((a - b).abs().max()) for a, b in pairs if a.is_floating_point()) <= 1e-5, run
