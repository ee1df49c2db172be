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

import importlib.util
import json
import logging
import math
import os
import re
import sys
import time

import fbrain
from fbrain import distributed
from fbrain.brain.arguments import command_line_options, option_help

logger = logging.getLogger(__name__)

_EXTRA_HINT = 'the recipes need the "recipes" extra: pip install "fbrain[recipes]"'


def config_settings(config_file: str) -> list[tuple[str, str, str]]:
    """``(name, default, comment)`` of the top-level settings of a recipe's YAML that take a plain
    value (numbers, strings, lists, null; not objects the config builds), in file order."""
    settings = []
    pending_comment: list[str] = []
    with open(config_file, encoding="utf-8") as f:
        for line in f:
            stripped = line.strip()
            if stripped.startswith("#"):
                pending_comment.append(stripped.lstrip("# "))
                continue
            match = re.match(r"^([A-Za-z][\w]*):\s*([^#]*?)\s*(?:#\s*(.*))?$", line.rstrip("\n"))
            if match and match.group(2) and not match.group(2).startswith("!"):
                comment = match.group(3) or (pending_comment[-1] if pending_comment else "")
                settings.append((match.group(1), match.group(2), comment))
            if not line.startswith((" ", "\t")):
                pending_comment = []
    return settings


def usage(recipe: str, config_file: str) -> str:
    """The recipe's ``--help``: how to call it, its own settings with their defaults, the run options."""
    lines = [f"usage: python -m fbrain.recipes.{recipe} [CONFIG.yaml] [--setting value ...]", "",
             f"CONFIG.yaml defaults to {config_file}. Any of its settings can be given on the command line:", ""]
    run_options = command_line_options()
    in_config = {}
    for name, default, comment in config_settings(config_file):
        if name in run_options:  # listed once, with the run options, at the config's value
            in_config[name] = default
            continue
        lines.append(f"  --{name:<26} {default:<22} {comment}".rstrip())
    lines += ["", "Run options (SpeechBrain's, and fbrain's own; the config's value where it sets one):", ""]
    width = max(map(len, run_options))
    for name, option in run_options.items():
        default = in_config.get(name, str(option.default))
        lines.append(f"  --{name:<{width}} {default:<10} {option_help(option).rsplit(' (default: ', 1)[0]}")
    return "\n".join(lines)


def load_config(default_config: str, argv: list[str] | None = None, recipe: str = "recipe"):
    """``(hparams, run_opts, hparams_file, overrides)`` from the command line, SpeechBrain-style.

    The first argument is the config file; it may be left out (or be an option), in which case
    ``default_config`` (the one shipped beside the recipe) is used. ``--help`` prints the recipe's
    settings and the run options, and exits.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("--") or argv[0] == "-h":
        argv = [default_config, *argv]
    if "--help" in argv or "-h" in argv:
        print(usage(recipe, argv[0] if os.path.isfile(argv[0]) else default_config))
        raise SystemExit(0)
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


def setup_run(default_config: str, argv, make_default_data, recipe: str = "recipe") -> tuple[dict, dict]:
    """``(hparams, run_opts)`` of a recipe run: the config read, the process group joined, the output
    folder made (rank 0 writes it), and ``data_folder`` filled by ``make_default_data(folder=, seed=)``
    when the config leaves it null."""
    hparams, run_opts, hparams_file, overrides = load_config(default_config, argv, recipe)
    data_folder = hparams["data_folder"]
    if data_folder is not None and not os.path.isdir(data_folder):
        raise SystemExit(f"--data_folder {data_folder}: no such folder. Give the folder holding the data, "
                         "or leave data_folder out (null) and the recipe builds its own small data set")
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("matplotlib is not installed: training goes on, but no curves.png is drawn (%s)",
                       _EXTRA_HINT)
    fbrain.ddp_init_group(run_opts)
    fbrain.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=hparams_file,
                                       overrides=overrides, copy_caller=False)
    if data_folder is None:
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

    def add_steps(self, epoch: int, losses: list[float]) -> None:
        """The train loss of every step of ``epoch`` (one host read per epoch, by the caller)."""
        if not distributed.is_main_process() or not losses:
            return
        with open(self.steps_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"epoch": epoch, "losses": [float(x) for x in losses]}) + "\n")

    @property
    def steps_path(self) -> str:
        return os.path.splitext(self.path)[0] + ".steps.jsonl"

    def step_losses(self) -> list[tuple[float, float]]:
        """``(fractional epoch, loss)`` of every recorded step (a re-run epoch replaces the old one)."""
        if not os.path.isfile(self.steps_path):
            return []
        by_epoch: dict[int, list[float]] = {}
        with open(self.steps_path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    by_epoch[row["epoch"]] = row["losses"]
        out = []
        for epoch in sorted(by_epoch):
            n = len(by_epoch[epoch])
            out += [(epoch - 1 + (i + 1) / n, loss) for i, loss in enumerate(by_epoch[epoch])]
        return out

    def plot(self, png_path: str, panels: list[tuple], title: str, best: str | None = None) -> None:
        """Draw ``png_path`` (rewritten after every epoch, so a run can be watched): one panel per
        ``(y label, [series], [baseline series])``, plus the train loss of every step and the learning
        rate when they were recorded. A series keeps its colour in every panel; a baseline (a figure
        of the untrained input, e.g. the noisy speech's STOI) is a dashed line; ``best`` names the
        series whose maximum marks the best epoch (a dotted line in every panel). No matplotlib:
        nothing is drawn (``setup_run`` warned)."""
        if not distributed.is_main_process() or importlib.util.find_spec("matplotlib") is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        panels = [(p[0], p[1], p[2] if len(p) > 2 else []) for p in panels]
        steps = self.step_losses()
        _, lrs = self.series("lr")
        extra = [("train loss per step", "steps")] if steps else []
        extra += [("learning rate", "lr")] if lrs else []
        names = [n for _, series, baselines in panels for n in series + baselines]
        colour = {n: f"C{i}" for i, n in enumerate(dict.fromkeys(names + ["train_loss", "lr"]))}
        best_epoch = None
        if best is not None:
            trained = [(v, e) for e, v in zip(*self.series(best)) if e > 0]  # epoch 0: the untrained model
            best_epoch = max(trained)[1] if trained else None
        count = len(panels) + len(extra)
        fig, axes = plt.subplots(1, count, figsize=(4.6 * count, 3.6), squeeze=False)
        for ax, (label, series, baselines) in zip(axes[0], panels):
            for name in series:
                epochs, values = self.series(name)
                if epochs:
                    ax.plot(epochs, values, marker="." if len(epochs) < 50 else None, label=name, color=colour[name])
            for name in baselines:
                _, values = self.series(name)
                if values:
                    ax.axhline(sum(values) / len(values), linestyle="--", color=colour[name], label=name)
            ax.set_ylabel(label)
        for ax, (label, kind) in zip(axes[0][len(panels):], extra):
            if kind == "steps":
                ax.plot([x for x, _ in steps], [y for _, y in steps], linewidth=0.8, color=colour["train_loss"],
                        label="train_loss (each step)")
            else:
                ax.plot(*self.series("lr"), marker=".", color=colour["lr"], label="lr")
                ax.set_yscale("log")
            ax.set_ylabel(label)
        for ax in axes[0]:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if best_epoch is not None:
                ax.axvline(best_epoch, linestyle=":", color="black", alpha=0.6, label=f"best (epoch {best_epoch})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        tmp = png_path + ".tmp.png"
        fig.savefig(tmp, dpi=110)  # replaced whole: a viewer never reads half a picture
        os.replace(tmp, png_path)
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
