"""The benchmark suite in its tiny mode: every system runs every quick workload and they train alike.

Timings are not checked here (they belong to the suite itself, on a quiet machine); this test
proves the suite runs end to end, writes its JSON, table and chart, and that the systems agree.
"""

from __future__ import annotations

import json
import time
import os
import subprocess
import sys

import pytest

from benchmarks.systems import SYSTEMS
from benchmarks.workloads import QUICK
from conftest import REPO

# torch.compile cannot trace nn.LSTM in torch 2.11 (Dynamo refuses it; with its experimental
# allow_rnn switch the backward then fails): the one combination the suite reports as unsupported.
UNSUPPORTED = {("enhance-blstm", "fbrain-step-compiled"): "LSTM"}


@pytest.mark.speechbrain
def test_tiny_suite_has_every_system_and_workload_and_they_agree(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        report = json.load(f)
    rows = {(r["workload"], r["system"]): r for r in report["rows"]}
    assert set(rows) == {(w, s.name) for w in QUICK for s in SYSTEMS}
    for key, row in rows.items():
        if key in UNSUPPORTED:
            assert UNSUPPORTED[key] in row["error"], row
            continue
        assert row["error"] is None, row
        assert row["us_per_step"] > 0 and row["steps_per_s"] > 0
        assert row["cold_start_s"] > 0  # building the system and its first step, timed
        if row["trains"]:
            assert row["check_loss"] == rows[(key[0], "torch-loop")]["check_loss"] or \
                abs(row["check_loss"] / rows[(key[0], "torch-loop")]["check_loss"] - 1) < 1e-4
    assert {"cpu", "cores", "torch", "device", "date"} <= set(report["machine"])
    assert os.path.getsize(tmp_path / "chart.png") > 1000
    for workload in QUICK:
        assert f"### {workload}:" in done.stdout


def test_the_chart_shows_each_systems_median_and_spread_against_torch_loop_of_the_same_run():
    from benchmarks.suite import chart_bars
    rows = [{"workload": "mlp", "system": "torch-loop", "us_per_step": 100.0, "us_min": 90.0, "us_max": 150.0},
            {"workload": "mlp", "system": "speechbrain", "us_per_step": 200.0, "us_min": 180.0, "us_max": 400.0},
            {"workload": "mlp", "system": SYSTEMS[-1].name, "us_per_step": None, "error": "unsupported"}]
    bars = chart_bars(rows)
    assert bars["torch-loop"] == [(1.0, 0.9, 1.5)] and bars["speechbrain"] == [(2.0, 1.8, 4.0)]
    assert bars[SYSTEMS[-1].name] == [(0.0, 0.0, 0.0)]  # did not run: no bar


def test_contention_runs_busy_processes_only_while_the_suite_runs():
    from benchmarks.suite import contention

    def cpu_ticks(pid):  # user + system clock ticks of a process (/proc/PID/stat fields 14 and 15)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    with contention(2) as busy:
        assert len(busy) == 2 and all(p.poll() is None for p in busy)
        time.sleep(1.0)
        assert all(cpu_ticks(p.pid) > 0 for p in busy)  # they burn CPU
    assert all(p.poll() is not None for p in busy)  # gone once the block ends
