"""``import fbrain as sb``: SpeechBrain's names resolve, to fbrain's objects where fbrain has them.
Run in subprocesses: importing SpeechBrain changes global torch state."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

FBRAIN_NAMES = textwrap.dedent("""
    import sys
    import fbrain as sb
    from fbrain import checkpoint, distributed, metrics, data, train_logger
    assert sb.utils.checkpoints.Checkpointer is checkpoint.Checkpointer is sb.Checkpointer
    assert sb.utils.checkpoints.average_checkpoints is checkpoint.average_checkpoints
    assert sb.utils.epoch_loop.EpochCounter is sb.EpochCounter
    assert sb.utils.distributed.run_on_main is distributed.run_on_main
    assert sb.utils.distributed.if_main_process() and sb.utils.distributed.main_process_only(lambda: 3)() == 3
    assert sb.utils.metric_stats.MetricStats is metrics.MetricStats
    assert sb.utils.train_logger.FileTrainLogger is train_logger.FileTrainLogger
    assert sb.dataio.batch.PaddedBatch is data.PaddedBatch
    assert sb.core.Brain is sb.Brain and sb.core.Stage is sb.Stage
    assert sys.modules.get("speechbrain") is None, "fbrain's own objects must not import SpeechBrain"
""")


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)


def test_fbrains_objects_under_speechbrains_paths_need_no_speechbrain():
    done = run(FBRAIN_NAMES)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_speechbrain_name_without_speechbrain_is_an_error_naming_the_extra():
    done = run("import sys\nsys.modules['speechbrain'] = None  # as if not installed\n" + FBRAIN_NAMES + textwrap.dedent("""
        try:
            sb.dataio.dataset.DynamicItemDataset
        except ImportError as err:
            assert "pip install 'fbrain[speechbrain]'" in str(err) and "speechbrain.dataio" in str(err), err
        else:
            raise AssertionError("no ImportError")
        try:
            sb.not_a_package
        except AttributeError as err:
            assert "not_a_package" in str(err)
    """))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.speechbrain
def test_the_enhancement_templates_names_are_speechbrains_where_fbrain_has_none():
    done = run(textwrap.dedent("""
        import fbrain as sb
        import speechbrain
        # Every name SpeechBrain's enhancement template reaches for (templates/enhancement/train.py).
        assert sb.dataio.dataset.DynamicItemDataset is speechbrain.dataio.dataset.DynamicItemDataset
        assert sb.utils.data_pipeline.takes is speechbrain.utils.data_pipeline.takes
        assert sb.utils.data_pipeline.provides is speechbrain.utils.data_pipeline.provides
        assert sb.dataio.dataio.read_audio is speechbrain.dataio.dataio.read_audio
        assert sb.nnet.losses.mse_loss is speechbrain.nnet.losses.mse_loss
        assert sb.processing.features.spectral_magnitude is speechbrain.processing.features.spectral_magnitude
        assert sb.nnet.loss.stoi_loss.stoi_loss is speechbrain.nnet.loss.stoi_loss.stoi_loss
        assert sb.utils.metric_stats.MetricStats is sb.MetricStats  # fbrain's
        assert sb.utils.distributed.get_rank is speechbrain.utils.distributed.get_rank
        assert "DynamicItemDataset" in dir(sb.dataio.dataset)
        try:
            sb.nnet.losses.no_such_loss
        except AttributeError as err:
            assert "speechbrain.nnet.losses" in str(err)
    """))
    assert done.returncode == 0, done.stderr[-3000:]
