"""Data parallel training on 2 CPU processes launched with torchrun (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fbrain
from fbrain import optim
from conftest import REPO, max_abs_diff

SCRIPT = REPO / "tests" / "scripts" / "ddp_train.py"


def torchrun(out_dir, *args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(SCRIPT), str(out_dir), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


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
