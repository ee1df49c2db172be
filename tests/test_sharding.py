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
import fbrain
from fbrain import optim, sharding, update

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
                                  "adam-arithmetic-clipNone", "adam-arithmetic-clip0.05",
                                  "adam-arithmetic-buckets-clipNone", "adam-arithmetic-buckets-clip0.05"])
def test_sharded_state_trains_as_the_replicated_step_over_20_steps(ranks, case):
    for rank in ranks:
        r = rank[case]
        if case in ("adam-arithmetic-clipNone", "adam-arithmetic-buckets-clipNone"):
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


def test_buckets_keep_large_parameters_alone_and_group_the_small_ones_in_order():
    params = {"w1": torch.zeros(7, 13), "b1": torch.zeros(13), "w2": torch.zeros(13, 3), "b2": torch.zeros(3)}
    layout = sharding.ShardLayout.of(params, list(params), 2, 0)  # 46, 7, 20, 2 elements per rank
    assert sharding.buckets(layout, cap=40) == [(0,), (1, 2, 3)]
    assert sharding.buckets(layout, cap=10) == [(0,), (1,), (2,), (3,)]
    assert sharding.buckets(layout) == [(0, 1, 2, 3)]


def test_an_optimizer_that_is_not_elementwise_is_refused():
    params = {"w": torch.randn(4)}
    with pytest.raises(ValueError, match="max_grad_norm"):
        sharding.require_elementwise(optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(1.0)), ["w"])
    for opt in (optim.adam(1e-3), optim.sgd(0.1, momentum=0.9, weight_decay=1e-2), optim.rmsprop(1e-3, centered=True),
                optim.with_ema(optim.adamw(1e-3), 0.9), optim.adadelta(1.0)):
        sharding.require_elementwise(opt, list(params))


BRAIN_SCRIPT = REPO / "tests" / "scripts" / "ddp_brain.py"


def brain_run(out, *args, nproc=2, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
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
    # Each rank wrote its own shard of the optimizer state; the Brain's file (rank 0's) holds none.
    for folder in (tmp_path / "sharded" / "ckpts").glob("CKPT+*"):
        assert sorted(f.name for f in (folder / "brain.shards").iterdir()) == \
            ["rank-00000-of-00002.fbrain", "rank-00001-of-00002.fbrain"]
        assert checkpoint.load(folder / "brain.fbrain")["state"].opt_state is None
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


def test_a_rank_that_cannot_write_its_shard_saves_nothing_and_every_rank_says_which(tmp_path):
    """Rank 1's third shard write fails (a full disk): no checkpoint folder appears for that save
    (none half-written is left either), and both ranks raise a CheckpointError naming rank 1."""
    brain_run(tmp_path, 4, "--epochs", 1, "--shard", "--fail-shard-write", 3)
    for rank in (0, 1):
        message = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert "rank 1: OSError" in message and "No space left on device" in message and "nothing was saved" in message
    folders = sorted(p.name for p in (tmp_path / "ckpts").iterdir() if p.name.startswith("CKPT"))
    assert len(folders) == 1 and ".incomplete-" not in folders[0], folders  # the 2nd save, kept; no 3rd
    assert len(list((tmp_path / "ckpts" / folders[0] / "brain.shards").iterdir())) == 2


def _sharded_checkpoint(folder, world=2):
    """An Adam state whose optimizer state is saved as ``world`` ranks' shard files in ``folder``,
    as a sharded Brain saves it: (the Brain's state without it, the shards record, the whole state)."""
    from fbrain import checkpoint
    from fbrain.checkpoint import shards

    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 1))
    opt = optim.adam(1e-2)
    state = fbrain.TrainState.create(model, opt)
    grads = {n: torch.randn_like(p) for n, p in state.params.items()}
    state = update.apply_gradients(state, grads, update.UpdateRule(opt))[0]
    names = list(state.params)
    for rank in range(world):
        layout = sharding.ShardLayout.of(state.params, names, world, rank)
        shards.write(folder, rank, world, sharding.shard_opt_state(state.opt_state, layout))
    checkpoint.save(folder.parent / "saved.fbrain", state.replace(opt_state=None))
    return checkpoint.load(folder.parent / "saved.fbrain"), {"world": world, "names": names}, state


def test_shard_files_join_into_the_whole_optimizer_state_and_refuse_damage(tmp_path):
    from fbrain.checkpoint import CheckpointError
    from conftest import trees_equal

    folder = tmp_path / "brain.shards"
    saved, record, whole = _sharded_checkpoint(folder)
    assert trees_equal(sharding.read_opt_state_shards(saved, record, folder).opt_state, whole.opt_state)
    for crafted in ({"world": 10 ** 9, "names": record["names"]}, {"world": 2, "names": ["no-such"]},
                    {"world": 2, "names": record["names"] * 2}, {"world": True, "names": record["names"]}, [1]):
        with pytest.raises(CheckpointError):
            sharding.read_opt_state_shards(saved, crafted, folder)
    rank0, rank1 = folder / "rank-00000-of-00002.fbrain", folder / "rank-00001-of-00002.fbrain"
    good = rank1.read_bytes()
    rank1.write_bytes(rank0.read_bytes())  # rank 0's file in rank 1's place
    with pytest.raises(CheckpointError, match="not rank 1 of 2"):
        sharding.read_opt_state_shards(saved, record, folder)
    rank1.unlink()
    with pytest.raises(CheckpointError, match="rank-00001-of-00002.fbrain: missing"):
        sharding.read_opt_state_shards(saved, record, folder)
    rank1.write_bytes(good)
    assert trees_equal(sharding.read_opt_state_shards(saved, record, folder).opt_state, whole.opt_state)


def test_fuzzed_shard_files_fail_as_checkpoint_errors_or_load_exactly(tmp_path):
    """The damage of ``python -m benchmarks.checkpoint_fuzz`` applied to one rank's shard file:
    every outcome is a CheckpointError or the exact whole state."""
    import random
    from benchmarks.checkpoint_fuzz import damaged
    from fbrain.checkpoint import CheckpointError
    from conftest import trees_equal

    folder = tmp_path / "brain.shards"
    saved, record, whole = _sharded_checkpoint(folder)
    target = folder / "rank-00001-of-00002.fbrain"
    original, rng, outcomes = target.read_bytes(), random.Random(0), {"rejected": 0, "exact": 0}
    for _ in range(300):
        target.write_bytes(bytes(damaged(original, rng)))
        try:
            joined = sharding.read_opt_state_shards(saved, record, folder)
        except CheckpointError:
            outcomes["rejected"] += 1
            continue
        assert trees_equal(joined.opt_state, whole.opt_state), "a damaged shard loaded as other values"
        outcomes["exact"] += 1
    assert outcomes["rejected"] > 250, outcomes


def test_a_sharded_brain_with_compiled_steps_trains_as_the_eager_one(tmp_path):
    """compile_steps=True with shard_optimizer_state: the collectives (functional, traceable) are in
    the compiled graph; the logged losses equal the eager sharded run's within 1e-5."""
    brain_run(tmp_path / "eager", 4, "--epochs", 2, "--shard")
    brain_run(tmp_path / "compiled", 4, "--epochs", 2, "--shard", env={"FBRAIN_RUN_OPTS": "compile_steps=true"})
    eager, compiled = ([line.split() for line in open(tmp_path / run / "losses.txt")] for run in ("eager", "compiled"))
    assert [e[:2] for e in eager] == [c[:2] for c in compiled] and len(eager) == 8
    for e, c in zip(eager, compiled):
        assert abs(float.fromhex(e[2]) - float.fromhex(c[2])) <= 1e-5 * abs(float.fromhex(e[2]))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_a_bucket_size_that_is_not_a_positive_int_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match="bucket_elements: expected an int >= 1"):
        fbrain.make_train_step(lambda p, b, x, r: x.sum(), optim.sgd(0.1), bucket_elements=bad)
