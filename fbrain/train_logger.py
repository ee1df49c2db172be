"""Train loggers with SpeechBrain's ``log_stats`` interface: a text file, TensorBoard, W&B.

- :class:`FileTrainLogger`: one line of statistics per epoch in a text file, formatted as
  SpeechBrain's (``loss: 1.23e-01``);
- :class:`TensorboardLogger`: the same statistics as TensorBoard scalars (``loss/train`` ...), with
  SpeechBrain's tags and steps; needs the ``tensorboard`` package (``pip install fbrain[loggers]``);
- :class:`WandBLogger`: the same into Weights & Biases, ``mode="offline"`` for machines without
  network; needs ``wandb``.

Only rank 0 logs in a distributed run. The optional packages are imported when a logger is made.

Example::

    >>> import os, tempfile
    >>> from fbrain.train_logger import FileTrainLogger
    >>> path = os.path.join(tempfile.mkdtemp(), "train_log.txt")
    >>> logger = FileTrainLogger(path)
    >>> logger.log_stats({"epoch": 1, "lr": 0.1}, train_stats={"loss": 1.23456}, valid_stats={"loss": 0.1233})
    >>> open(path).read()
    'epoch: 1, lr: 1.00e-01 - train loss: 1.23 - valid loss: 1.23e-01\\n'
"""

from __future__ import annotations

import logging
import os

from fbrain import distributed


def _format(value, precision: int) -> str:
    if isinstance(value, float):
        # SpeechBrain's rule: fixed point between 1 and 100, scientific notation otherwise, so a
        # loss of 0.1233 reads 1.23e-01 (precision + 1 significant digits), never 0.12.
        return f"{value:.{precision}f}" if 1.0 < value < 100.0 else f"{value:.{precision}e}"
    if isinstance(value, list):
        return "[" + ", ".join(_format(v, precision) for v in value) + "]"
    return str(value)


class FileTrainLogger:
    """Append ``key: value`` statistics to ``save_file``, one line per call."""

    def __init__(self, save_file: str, precision: int = 2):
        self.save_file, self.precision = save_file, precision
        directory = os.path.dirname(os.path.abspath(save_file))
        os.makedirs(directory, exist_ok=True)

    def _item(self, stats: dict, prefix: str | None) -> str:
        head = f"{prefix} " if prefix else ""
        return ", ".join(f"{head}{k}: {_format(_plain(v), self.precision)}" for k, v in stats.items())

    def log_stats(self, stats_meta: dict, train_stats: dict | None = None, valid_stats: dict | None = None,
                  test_stats: dict | None = None, verbose: bool = False) -> None:
        if not distributed.is_main_process():
            return  # one log per run: rank 0 writes it
        parts = [self._item(stats_meta, None)]
        for prefix, stats in (("train", train_stats), ("valid", valid_stats), ("test", test_stats)):
            if stats is not None:
                parts.append(self._item(stats, prefix))
        line = " - ".join(parts)
        with open(self.save_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if verbose:
            logging.getLogger("fbrain").info(line)


def _plain(value):
    """Tensors and numpy scalars as Python numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _series(stats_meta: dict, train_stats, valid_stats, test_stats):
    """``(group, name, [values])`` of one ``log_stats`` call: the meta statistics, then each set's;
    a list value is one value per batch (SpeechBrain's convention)."""
    for name, value in stats_meta.items():
        yield "meta", name, [_plain(value)]
    for group, stats in (("train", train_stats), ("valid", valid_stats), ("test", test_stats)):
        for name, value in (stats or {}).items():
            yield group, name, [_plain(v) for v in value] if isinstance(value, list) else [_plain(value)]


class TensorboardLogger:
    """SpeechBrain's ``TensorboardLogger``: meta statistics under their own name (one step per
    call), others as ``<stat>/<set>`` (one step per value). Event files go to ``save_dir``, flushed
    after every call so TensorBoard shows a run as it trains.

    Example::

        logger = TensorboardLogger("results/exp/tensorboard")
        logger.log_stats({"epoch": 1, "lr": 1e-3}, train_stats={"loss": 0.5}, valid_stats={"loss": 0.6})
    """

    def __init__(self, save_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(f"TensorboardLogger needs the tensorboard package ({err}); install it with "
                              "`pip install tensorboard` or the extra `fbrain[loggers]`") from None
        self.save_dir = save_dir
        self.writer = SummaryWriter(save_dir) if distributed.is_main_process() else None
        self.global_step: dict = {"train": {}, "valid": {}, "test": {}, "meta": 0}

    def log_stats(self, stats_meta: dict, train_stats: dict | None = None, valid_stats: dict | None = None,
                  test_stats: dict | None = None, verbose: bool = False) -> None:
        if self.writer is None:
            return
        self.global_step["meta"] += 1
        for group, name, values in _series(stats_meta, train_stats, valid_stats, test_stats):
            if group == "meta":
                self.writer.add_scalar(name, values[0], self.global_step["meta"])
                continue
            for value in values:
                step = self.global_step[group][name] = self.global_step[group].get(name, 0) + 1
                self.writer.add_scalar(f"{name}/{group}", value, step)
        self.writer.flush()

    def log_audio(self, name: str, value, sample_rate: int) -> None:
        if self.writer is not None:
            self.writer.add_audio(name, value, self.global_step["meta"], sample_rate=sample_rate)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandBLogger:
    """Statistics into Weights & Biases with SpeechBrain's ``log_stats`` interface: keys
    ``<set>/<stat>`` (a per-batch list logs its last value), at the step of the statistics' epoch
    (so a resumed run continues its curves), or one step per call without one. ``init_kwargs`` go to
    ``wandb.init`` (``project``, ``name``, ``config`` ...); ``mode="offline"`` writes the run under
    ``dir`` for a later ``wandb sync``.

    Example::

        logger = WandBLogger(project="enhancement", mode="offline", dir="results/exp")
    """

    def __init__(self, **init_kwargs):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(f"WandBLogger needs the wandb package ({err}); install it with `pip install wandb` "
                              "or the extra `fbrain[loggers]`") from None
        self.run = wandb.init(**init_kwargs) if distributed.is_main_process() else None
        self.step = 0

    def log_stats(self, stats_meta: dict, train_stats: dict | None = None, valid_stats: dict | None = None,
                  test_stats: dict | None = None, verbose: bool = False) -> None:
        if self.run is None:
            return
        # The epoch when the statistics name one (a resumed run continues its steps), else a count.
        epoch = next((v for k, v in stats_meta.items() if k.lower() == "epoch" and isinstance(v, int)), None)
        self.step = epoch if epoch is not None and epoch > self.step else self.step + 1
        record = {name if group == "meta" else f"{group}/{name}": values[-1]
                  for group, name, values in _series(stats_meta, train_stats, valid_stats, test_stats) if values}
        self.run.log(record, step=self.step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
