"""Data parallel training on 2 CPU processes launched with torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import fbrain
from fbrain import checkpoint, optim
from conftest import REPO, max_abs_diff, trees_equal

SCRIPT = REPO / "tests" / "scripts" / "ddp_train.py"
BRAIN_SCRIPT = REPO / "tests" / "scripts" / "ddp_brain.py"


def torchrun(out_dir, *args, nproc=2, script=SCRIPT, expect_ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), str(out_dir), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def single_process_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = optim.adam(1e-2)
    state = fbrain.TrainState.create(model, opt)

    def loss_fn(params, buffers, batch, rng):
        pred, _ = fbrain.apply_module(model, params, buffers, batch[0])
        return torch.nn.functional.mse_loss(pred, batch[1])

    step = fbrain.make_train_step(loss_fn, opt, max_grad_norm=1.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(8):
        state, m = step(state, (torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)))
        losses.append(float(m["loss"]))
    return state.params, losses


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_ranks_agree_and_equal_one_process_on_the_combined_batch(tmp_path, accumulation):
    torchrun(tmp_path, accumulation)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert r0["losses"] == r1["losses"]  # logged losses are averaged over ranks
    params, losses = single_process_reference()
    assert max_abs_diff(r0["params"], params) <= 1e-6
    assert max(abs(a - b) for a, b in zip(r0["losses"], losses)) <= 1e-6


def test_brain_under_torchrun_equals_one_process_on_the_combined_batch(tmp_path):
    torchrun(tmp_path / "ddp", 4, script=BRAIN_SCRIPT)
    r0 = checkpoint.load(tmp_path / "ddp" / "rank0.fbrain")
    r1 = checkpoint.load(tmp_path / "ddp" / "rank1.fbrain")
    assert trees_equal(r0, r1)  # every rank holds the same state, bit for bit
    single = subprocess.run([sys.executable, str(BRAIN_SCRIPT), str(tmp_path / "one"), "8"],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    alone = checkpoint.load(tmp_path / "one" / "rank0.fbrain")
    assert max_abs_diff(r0.params, alone.params) <= 1e-6
    assert int(r0.counters.optimizer_step) == int(alone.counters.optimizer_step) == 8
    # Only rank 0 wrote checkpoints, and the logged losses are the ranks' average.
    ddp_losses = [float.fromhex(line.split()[2]) for line in open(tmp_path / "ddp" / "losses.txt")]
    one_losses = [float.fromhex(line.split()[2]) for line in open(tmp_path / "one" / "losses.txt")]
    assert max(abs(a - b) for a, b in zip(ddp_losses, one_losses)) <= 1e-6


@pytest.mark.parametrize("data", [[], ["--batch-sampler"]], ids=["sampler", "batch-sampler"])
def test_brain_killed_and_resumed_under_torchrun_is_bitwise_identical(tmp_path, data):
    torchrun(tmp_path / "straight", 4, "--dropout", *data, script=BRAIN_SCRIPT)
    start = time.monotonic()
    killed = torchrun(tmp_path / "resumed", 4, "--dropout", "--kill-at-step", 2, *data, script=BRAIN_SCRIPT,
                      expect_ok=False)
    assert killed.returncode != 0
    assert time.monotonic() - start < 120  # the surviving rank stopped; nothing hung
    assert not (tmp_path / "resumed" / "rank0.fbrain").exists()
    torchrun(tmp_path / "resumed", 4, "--dropout", *data, script=BRAIN_SCRIPT)
    for rank in (0, 1):
        assert trees_equal(checkpoint.load(tmp_path / "resumed" / f"rank{rank}.fbrain"),
                           checkpoint.load(tmp_path / "straight" / f"rank{rank}.fbrain"))

    def last(path):
        return {tuple(line.split()[:2]): line.split()[2] for line in open(path)}

    assert last(tmp_path / "resumed" / "losses.txt") == last(tmp_path / "straight" / "losses.txt")


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_and_the_run_resumes_bit_for_bit(tmp_path):
    # fbrain 0.2 caught no signal under torchrun: the rank it reached died, the run lost its epoch.
    torchrun(tmp_path / "straight", 4, "--dropout", "--every-3-steps", script=BRAIN_SCRIPT)
    stopped = torchrun(tmp_path / "resumed", 4, "--dropout", "--signal-at-step", 1, script=BRAIN_SCRIPT,
                       expect_ok=False)
    assert stopped.returncode != 0 and "exitcode  : 143" in stopped.stderr, stopped.stderr[-3000:]
    assert "saved a checkpoint at epoch step 2" in stopped.stderr  # the step after the signal
    for rank in (0, 1):  # each rank left the process group before exiting
        assert (tmp_path / "resumed" / f"stopped-rank{rank}.txt").read_text() == "group still up: False\n"
    assert not (tmp_path / "resumed" / "rank0.fbrain").exists()
    torchrun(tmp_path / "resumed", 4, "--dropout", "--every-3-steps", script=BRAIN_SCRIPT)
    for rank in (0, 1):
        assert trees_equal(checkpoint.load(tmp_path / "resumed" / f"rank{rank}.fbrain"),
                           checkpoint.load(tmp_path / "straight" / f"rank{rank}.fbrain"))
    steps = [tuple(line.split()[:2]) for line in open(tmp_path / "resumed" / "losses.txt")]
    assert steps.count(("2", "2")) == 1 and steps.count(("2", "3")) == 1  # nothing trained twice


IMPERATIVE_SCRIPT = REPO / "tests" / "scripts" / "ddp_imperative.py"


@pytest.mark.parametrize("mode", ["plain", "speechbrain"])
def test_an_imperative_fit_batch_averages_gradients_across_ranks(tmp_path, mode):
    # loss.backward(); self.optimizer.step() through the optimizer views, on 2 ranks.
    torchrun(tmp_path / "ddp", 4, mode, script=IMPERATIVE_SCRIPT)
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    assert trees_equal(r0["params"], r1["params"])  # the ranks did not drift apart
    single = subprocess.run([sys.executable, str(IMPERATIVE_SCRIPT), str(tmp_path / "one"), "8", mode],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    alone = torch.load(tmp_path / "one" / "rank0.pt")
    assert max_abs_diff(r0["params"], alone["params"]) <= 1e-6
    # The stage-end train loss is the ranks' average: equal on both, and to the combined batch's.
    assert r0["losses"] == r1["losses"]
    assert max(abs(a - b) for a, b in zip(r0["losses"], alone["losses"])) <= 1e-6
    steps = 8 if mode == "plain" else 4  # 2 epochs of 4 batches per rank, or of 2 accumulated pairs
    assert r0["optimizer_steps"] == alone["optimizer_steps"] == steps
    # One gradient all-reduce per optimizer step: none for the micro-batches inside no_sync.
    assert r0["grad_collectives"] == steps and alone["grad_collectives"] == 0
    # create_experiment_directory: only rank 0 logs (the Brain's first log line appears once).
    log = (tmp_path / "ddp" / "exp" / "log.txt").read_text()
    assert log.count("trainable parameters") == 1 and (tmp_path / "ddp" / "exp" / "env.log").exists()


def test_run_on_main_returns_the_result_on_every_rank(tmp_path):
    # fbrain 0.2 returned None and had no run_post_on_main (SpeechBrain: the result on every rank).
    torchrun(tmp_path, script=REPO / "tests" / "scripts" / "ddp_run_on_main.py")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["result"] for r in ranks] == [{"made by": 0}, {"made by": 0}]
    assert [r["everywhere"] for r in ranks] == [7, 7]
    assert ranks[0]["posts"] == ["everywhere"] and ranks[1]["posts"] == ["post", "everywhere"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_a_c10d_rendezvous_train_as_one_node_with_two_ranks(tmp_path):
    # Two torchrun processes, one "node" each, meeting at a c10d rendezvous on 127.0.0.1: what
    # `srun torchrun --nnodes=2 ...` starts on a cluster.
    torchrun(tmp_path / "one-node", 4, script=BRAIN_SCRIPT)
    port, out = free_port(), tmp_path / "two-nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=fbrain-test", str(BRAIN_SCRIPT), str(out), "4"]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    for rank in (0, 1):
        assert trees_equal(checkpoint.load(out / f"rank{rank}.fbrain"),
                           checkpoint.load(tmp_path / "one-node" / f"rank{rank}.fbrain"))
