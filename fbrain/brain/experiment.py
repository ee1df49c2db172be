"""``create_experiment_directory``: the output folder of a run, with its hyperparameters and log.

Creates the folder, writes ``hyperparams.yaml`` (references resolved with HyperPyYAML when it is
installed, the file copied as is otherwise), copies the calling script, logs to ``log.txt``
(uncaught exceptions included) and records the environment in ``env.log``.

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
import inspect
import logging
import logging.config
import os
import platform
import shutil
import sys

import torch

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


def environment_description() -> str:
    return (f"Python: {sys.version.split()[0]} ({platform.platform()})\n"
            f"torch: {torch.__version__}\n"
            f"CUDA available: {torch.cuda.is_available()}\n")


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
    sys.excepthook = _log_exceptions
    logger.info("Beginning experiment! Experiment folder: %s", experiment_directory)
    if save_env_desc:
        with open(os.path.join(experiment_directory, "env.log"), "w", encoding="utf-8") as f:
            f.write(environment_description())
