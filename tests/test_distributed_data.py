"""Data under torchrun (2 CPU processes, gloo): batch samplers are sharded across the ranks, and ranks
that would take different numbers of steps are stopped before the first one, naming their counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "tests" / "scripts" / "ddp_data.py"


def run(out_dir, mode):
    os.makedirs(out_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
           str(out_dir), mode]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in (0, 1)]


def check_sharded(ranks, total):
    for epoch in ("1", "2"):
        steps = [ranks[r][epoch] for r in (0, 1)]
        assert len(steps[0]) == len(steps[1]) > 0  # the same number of steps on every rank
        ids = [i for rank in steps for batch in rank for i in batch]
        assert sorted(ids) == list(range(total)), f"epoch {epoch}: every example once, none twice"


def test_a_batch_sampler_is_sharded_across_ranks(tmp_path):
    # fbrain 0.2: every rank iterated the whole epoch (each saw 18 of 18 examples).
    ranks = run(tmp_path, "batch-sampler")
    check_sharded(ranks, 18)
    assert ranks[0]["1"] == [[0, 1, 2], [6, 7, 8], [12, 13, 14]]  # batches 0, 2, 4 of the epoch


@pytest.mark.speechbrain
def test_speechbrains_dynamic_batch_sampler_is_sharded_and_reshuffled_per_epoch(tmp_path):
    ranks = run(tmp_path, "dynamic")
    check_sharded(ranks, 24)
    assert ranks[0]["1"] != ranks[0]["2"]  # its seeded shuffle, the same on both ranks, per epoch


def test_ranks_with_different_step_counts_stop_before_the_first_step_naming_them(tmp_path):
    # fbrain 0.2: rank 0 paired its extra step with rank 1's next epoch, then rank 1 crashed.
    ranks = run(tmp_path, "uneven")
    for r in (0, 1):
        assert "rank 0: 4, rank 1: 3" in ranks[r]["error"], ranks[r]
