"""TensorboardLogger and WandBLogger: SpeechBrain's log_stats API into TensorBoard and W&B."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import pytest

import fbrain

CALLS = [
    ({"epoch": 1, "lr": 1e-3}, {"loss": 0.5}, {"loss": 0.6, "si-snr": -3.0}),
    ({"epoch": 2, "lr": 5e-4}, {"loss": [0.45, 0.40]}, {"loss": 0.55, "si-snr": -4.5}),
    ({"epoch": 3, "lr": 2.5e-4}, {"loss": 0.35}, {"loss": 0.5, "si-snr": -6.0}),
]


def read_scalars(folder) -> dict:
    """``{tag: [(step, value)]}`` read back with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_event_files_hold_every_statistic_at_speechbrains_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (the test extra) reads the event files")
    logger = fbrain.TensorboardLogger(str(tmp_path / "tb"))
    for meta, train, valid in CALLS:
        logger.log_stats(meta, train_stats=train, valid_stats=valid)
    scalars = read_scalars(tmp_path / "tb")  # readable before close: every call is flushed
    assert scalars["epoch"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert scalars["loss/train"] == [(1, 0.5), (2, 0.45), (3, 0.4), (4, 0.35)]  # a list: one step per value
    assert scalars["si-snr/valid"] == [(1, -3.0), (2, -4.5), (3, -6.0)]
    logger.close()


@pytest.mark.speechbrain
def test_tensorboard_files_read_back_as_speechbrains_do(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (the test extra) reads the event files")
    script = ("from speechbrain.utils.train_logger import TensorboardLogger\n"
              f"logger = TensorboardLogger({str(tmp_path / 'sb')!r})\n"
              f"for meta, train, valid in {CALLS!r}:\n"
              "    logger.log_stats(meta, train_stats=train, valid_stats=valid)\n"
              "logger.writer.close()\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
    logger = fbrain.TensorboardLogger(str(tmp_path / "fbrain"))
    for meta, train, valid in CALLS:
        logger.log_stats(meta, train_stats=train, valid_stats=valid)
    logger.close()
    assert read_scalars(tmp_path / "fbrain") == read_scalars(tmp_path / "sb")


def test_wandb_logger_logs_one_step_per_call(monkeypatch):
    calls = []

    class Run:
        def log(self, record, step):
            calls.append((step, record))

        def finish(self):
            calls.append("finished")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = fbrain.WandBLogger(project="p", mode="offline", dir="d")
    for meta, train, valid in CALLS[:2]:
        logger.log_stats(meta, train_stats=train, valid_stats=valid)
    logger.close()
    assert calls == [{"project": "p", "mode": "offline", "dir": "d"},
                     (1, {"epoch": 1, "lr": 1e-3, "train/loss": 0.5, "valid/loss": 0.6, "valid/si-snr": -3.0}),
                     (2, {"epoch": 2, "lr": 5e-4, "train/loss": 0.40, "valid/loss": 0.55, "valid/si-snr": -4.5}),
                     "finished"]


def test_wandb_offline_run_writes_its_files(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (optional; WandBLogger's adapter is checked with a stand-in above)")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = fbrain.WandBLogger(project="fbrain-test", mode="offline", dir=str(tmp_path))
    logger.log_stats(*CALLS[0])
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        fbrain.WandBLogger()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="fbrain\\[loggers\\]"):
        fbrain.TensorboardLogger("x")
