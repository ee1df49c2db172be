"""``create_experiment_directory``: the output folder of a run, with its hyperparameters and log.

Creates the folder, writes ``hyperparams.yaml`` (references resolved with HyperPyYAML when it is
installed, the file copied as is otherwise), copies the calling script, logs to ``log.txt``
(uncaught exceptions included) and to the console (INFO and up, written between progress bars),
and records the environment in ``env.log``: versions, the installed packages, and the git revision
of the calling script's repository.

Under torchrun only rank 0 writes (folder, files, log handler); the other ranks wait for it at a
barrier, as in SpeechBrain, so they never race on the same files or read a half-made folder.

Example::

    >>> import os, tempfile
    >>> from fbrain.brain.experiment import create_experiment_directory
    >>> folder = os.path.join(tempfile.mkdtemp(), "exp")
    >>> create_experiment_directory(folder, save_env_desc=False, copy_caller=False)
    >>> sorted(os.listdir(folder))
    ['log.txt']
"""

from __future__ import annotations

import datetime
import importlib.metadata
import inspect
import logging
import logging.config
import os
import platform
import shutil
import subprocess
import sys

import torch
from tqdm import tqdm

from fbrain import distributed as _distributed

logger = logging.getLogger("fbrain")


def _resolved_yaml(path: str, overrides) -> str:
    try:
        from hyperpyyaml import resolve_references
    except ImportError:  # a plain copy: still a faithful record of the run
        with open(path, encoding="utf-8") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return resolve_references(f, overrides or {}).getvalue()


def _log_exceptions(exc_type, exc_value, exc_traceback):
    """Record an uncaught exception in the experiment's log, and still show it on stderr."""
    logger.error("Exception:", exc_info=(exc_type, exc_value, exc_traceback))
    sys.__excepthook__(exc_type, exc_value, exc_traceback)


class ConsoleHandler(logging.Handler):
    """Log records on the terminal through ``tqdm.write``, so a progress bar in progress is redrawn
    below the message instead of being torn by it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def installed_packages() -> list[str]:
    """``name==version`` of every installed distribution, sorted (what ``pip freeze`` lists)."""
    found = {(d.metadata["Name"] or "?", d.version) for d in importlib.metadata.distributions()}
    return sorted(f"{name}=={version}" for name, version in found)


def git_revision(folder: str) -> str | None:
    """The commit checked out in the git repository holding ``folder`` (with ``-dirty`` when it has
    uncommitted changes), or None outside a repository or without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def environment_description(folder: str | None = None) -> str:
    """Versions, the git revision of ``folder``'s repository (when it is in one) and the installed
    packages: what it takes to run the experiment again."""
    revision = git_revision(folder) if folder else None
    return (f"Python: {sys.version.split()[0]} ({platform.platform()})\n"
            f"torch: {torch.__version__}\n"
            f"CUDA available: {torch.cuda.is_available()}\n"
            f"Git revision: {revision or 'not in a git repository'}\n"
            "Installed packages:\n" + "".join(f"{line}\n" for line in installed_packages()))


def create_experiment_directory(experiment_directory, hyperparams_to_save=None, overrides=None, log_config=None,
                                save_env_desc=True, copy_caller=True):
    """Prepare ``experiment_directory`` for a run (SpeechBrain's signature, plus ``copy_caller``).

    Only the main process (rank 0) writes; under torchrun the others wait for it at a barrier.
    """
    caller = inspect.getmodule(inspect.currentframe().f_back) if copy_caller else None
    try:
        if _distributed.is_main_process():
            _prepare(experiment_directory, hyperparams_to_save, overrides, log_config, save_env_desc, caller)
    finally:
        _distributed.barrier()  # a no-op outside a distributed run


def _prepare(experiment_directory, hyperparams_to_save, overrides, log_config, save_env_desc, caller):
    os.makedirs(experiment_directory, exist_ok=True)
    if hyperparams_to_save is not None:
        text = _resolved_yaml(hyperparams_to_save, overrides)
        with open(os.path.join(experiment_directory, "hyperparams.yaml"), "w", encoding="utf-8") as w:
            w.write(f"# Generated {datetime.date.today()} from:\n# {os.path.abspath(hyperparams_to_save)}\n"
                    "# yamllint disable\n")
            w.write(text)
    if caller is not None and getattr(caller, "__file__", None):
        shutil.copy(os.path.realpath(caller.__file__), experiment_directory)
    if log_config is not None:
        import yaml

        with open(log_config, encoding="utf-8") as f:
            logging.config.dictConfig(yaml.safe_load(f))
    log_file = os.path.abspath(os.path.join(experiment_directory, "log.txt"))
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == log_file for h in root.handlers):
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    if log_config is None and not any(isinstance(h, (ConsoleHandler, logging.StreamHandler))
                                      and not isinstance(h, logging.FileHandler) for h in root.handlers):
        console = ConsoleHandler(logging.INFO)
        console.setFormatter(logging.Formatter("%(name)s - %(levelname)s - %(message)s"))
        root.addHandler(console)
    sys.excepthook = _log_exceptions
    logger.info("Beginning experiment! Experiment folder: %s", experiment_directory)
    if save_env_desc:
        with open(os.path.join(experiment_directory, "env.log"), "w", encoding="utf-8") as f:
            script = getattr(caller, "__file__", None)
            f.write(environment_description(os.path.dirname(os.path.realpath(script)) if script else os.getcwd()))
