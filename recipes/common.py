"""What the recipes share: reading the config, the output folder, the curves and their plot.

Example::

    >>> import os, tempfile
    >>> from fbrain.recipes.common import Curves
    >>> curves = Curves(os.path.join(tempfile.mkdtemp(), "curves.jsonl"))
    >>> curves.add(1, train_loss=2.0, valid_loss=1.5)
    >>> curves.add(2, train_loss=1.0, valid_loss=1.2)
    >>> Curves(curves.path).series("train_loss")
    ([1, 2], [2.0, 1.0])
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import fbrain
from fbrain import distributed

logger = logging.getLogger(__name__)

_EXTRA_HINT = 'the recipes need the "recipes" extra: pip install "fbrain[recipes]"'


def load_config(default_config: str, argv: list[str] | None = None):
    """``(hparams, run_opts, hparams_file, overrides)`` from the command line, SpeechBrain-style.

    The first argument is the config file; it may be left out (or be an option), in which case
    ``default_config`` (the one shipped beside the recipe) is used.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("--"):
        argv = [default_config, *argv]
    hparams_file, run_opts, overrides = fbrain.parse_arguments(argv)
    try:
        from hyperpyyaml import load_hyperpyyaml
    except ImportError:
        raise SystemExit(f"hyperpyyaml is not installed: {_EXTRA_HINT}") from None
    if not os.path.isfile(hparams_file):
        raise SystemExit(f"{hparams_file}: config file not found")
    with open(hparams_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    return hparams, run_opts, hparams_file, overrides


def setup_run(default_config: str, argv, make_default_data) -> tuple[dict, dict]:
    """``(hparams, run_opts)`` of a recipe run: the config read, the process group joined, the output
    folder made (rank 0 writes it), and ``data_folder`` filled by ``make_default_data(folder=, seed=)``
    when the config leaves it null."""
    hparams, run_opts, hparams_file, overrides = load_config(default_config, argv)
    fbrain.ddp_init_group(run_opts)
    fbrain.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=hparams_file,
                                       overrides=overrides, copy_caller=False)
    if hparams["data_folder"] is None:
        hparams["data_folder"] = os.path.join(hparams["output_folder"], "data")
        fbrain.run_on_main(make_default_data, kwargs={"folder": hparams["data_folder"], "seed": hparams["seed"]})
    return hparams, run_opts


def mean_of(scores: list[dict], key: str) -> float:
    """The mean of ``key`` over per-example score rows (0.0 for none)."""
    return sum(row[key] for row in scores) / max(len(scores), 1)


class Curves:
    """Per-epoch figures in a JSON-lines file: survives a restart, and is what the plot reads."""

    def __init__(self, path: str):
        self.path = path

    def add(self, epoch: int, **values: float) -> None:
        if not distributed.is_main_process():
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"epoch": epoch, **{k: float(v) for k, v in values.items()}}) + "\n")

    def rows(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        by_epoch: dict[int, dict] = {}
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    by_epoch.setdefault(row["epoch"], {}).update(row)  # a re-run epoch replaces the old figures
        return [by_epoch[e] for e in sorted(by_epoch)]

    def series(self, name: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.rows() if name in r and math.isfinite(r[name])]
        return [r["epoch"] for r in rows], [r[name] for r in rows]

    def plot(self, png_path: str, panels: list[tuple[str, list[str]]], title: str) -> None:
        """One panel per ``(y label, [series names])``, epochs on the x axis."""
        if not distributed.is_main_process():
            return
        try:
            import matplotlib
        except ImportError:
            raise SystemExit(f"matplotlib is not installed: {_EXTRA_HINT}") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
        for ax, (label, names) in zip(axes[0], panels):
            for name in names:
                epochs, values = self.series(name)
                if epochs:
                    ax.plot(epochs, values, marker="." if len(epochs) < 50 else None, label=name)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(png_path, dpi=110)
        plt.close(fig)


class TimeBudget:
    """Stops training after the epoch in which ``minutes`` have passed (None: no limit)."""

    def __init__(self, minutes: float | None):
        self.minutes = minutes
        self.start = time.monotonic()

    def elapsed_minutes(self) -> float:
        return (time.monotonic() - self.start) / 60

    def spent(self) -> bool:
        return self.minutes is not None and self.elapsed_minutes() >= self.minutes
