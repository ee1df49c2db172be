"""The benchmark suite in its tiny mode: every system runs every quick workload and they train alike.

Timings are not checked here (they belong to the suite itself, on a quiet machine); this test
proves the suite runs end to end, writes its JSON, table and chart, and that the systems agree.
"""

from __future__ import annotations

import importlib.util
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
    assert set(report["workload_seconds"]) == set(QUICK)
    assert done.stdout.startswith("tiny mode, 4 workloads") and "expected: about" in done.stdout.splitlines()[0]
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.getsize(tmp_path / "chart.png") > 1000
    else:
        assert "chart not drawn: matplotlib is not installed" in done.stdout
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


def test_without_matplotlib_the_chart_step_says_how_to_get_it_and_the_suite_ends_well(monkeypatch, tmp_path, capsys):
    from benchmarks import suite
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec reports it missing
    monkeypatch.setattr(suite, "run_workload", lambda name, *args, **kwargs: [
        {"workload": name, "system": "torch-loop", "error": "not run in this test", "us_per_step": None}])
    suite.main(["--tiny", "--workloads", "mlp", "--out", str(tmp_path)])  # no exception, no exit
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("tiny mode, 1 workload (mlp): expected: about 16 seconds on a quiet 2-core CPU; "
                        "a busy machine takes several times longer")
    assert any(line.startswith("### mlp: ") for line in lines)  # the table as usual
    hint = [line for line in lines if line.startswith("chart not drawn")]
    assert len(hint) == 1 and "pip install matplotlib" in hint[0] and 'pip install -e ".[bench]"' in hint[0], lines
    assert lines[-1].startswith(f"wrote {tmp_path}/results.json in ")
    assert (tmp_path / "results.json").exists() and not (tmp_path / "chart.png").exists()


def test_the_start_line_names_the_expected_duration_of_the_chosen_mode_and_workloads(monkeypatch):
    from benchmarks import suite
    # The arithmetic, on a table of its own (the real figures are measurements that will be refreshed).
    monkeypatch.setattr(suite, "EXPECTED_SECONDS", {"quick": {"a": 200, "b": 130}, "tiny": {"a": 16}})
    assert suite.expected_duration("quick", ["a", "b"]).startswith("expected: about 6 minutes on a quiet 2-core CPU; ")
    assert suite.expected_duration("quick", ["b"]).startswith("expected: about 2 minutes")
    assert suite.expected_duration("tiny", ["a"]).startswith("expected: about 16 seconds")
    full = suite.expected_duration("full", ["a", "b", "c"])
    assert full.startswith("expected: more than about 6 minutes") and "not timed: c" in full
    monkeypatch.undo()
    # Every quick workload has a measured figure.
    assert set(QUICK) <= set(suite.EXPECTED_SECONDS["quick"])
    assert "a busy machine takes several times longer" in full
