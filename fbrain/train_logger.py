"""``FileTrainLogger``: one line of statistics per epoch in a text file.

The interface of ``speechbrain.utils.train_logger.FileTrainLogger``.

Example::

    >>> import os, tempfile
    >>> from fbrain.train_logger import FileTrainLogger
    >>> path = os.path.join(tempfile.mkdtemp(), "train_log.txt")
    >>> logger = FileTrainLogger(path)
    >>> logger.log_stats({"epoch": 1, "lr": 0.1}, train_stats={"loss": 1.23456}, valid_stats={"loss": 2.0})
    >>> open(path).read()
    'epoch: 1, lr: 0.10 - train loss: 1.23 - valid loss: 2.00\\n'
"""

from __future__ import annotations

import os

from fbrain import distributed


def _format(value, precision: int) -> str:
    if isinstance(value, float):
        # Small values (learning rates) in scientific notation, others fixed point, like SpeechBrain.
        return f"{value:.{precision}e}" if (value != 0 and abs(value) < 0.1) or abs(value) >= 1e6 \
            else f"{value:.{precision}f}"
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
            print(line)


def _plain(value):
    """Tensors and numpy scalars as Python numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value
