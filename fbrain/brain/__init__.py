"""SpeechBrain's ``Brain`` API over fbrain's pure steps: ``import fbrain as sb`` ports a recipe.

Modules: :mod:`~fbrain.brain.core` (``Brain``), :mod:`~fbrain.brain.run_options` and
:mod:`~fbrain.brain.arguments` (run options, ``parse_arguments``), :mod:`~fbrain.brain.views`
(``brain.optimizer`` / ``brain.scaler`` over the state), :mod:`~fbrain.brain.optimizers` (several
optimizers as one transformation), :mod:`~fbrain.brain.stage`, :mod:`~fbrain.brain.epoch_counter`,
:mod:`~fbrain.brain.experiment` (``create_experiment_directory``).

Example::

    >>> from fbrain.brain import Stage, EpochCounter
    >>> Stage.VALID.value, list(EpochCounter(2))
    (2, [1, 2])
"""

from fbrain.brain.arguments import parse_arguments
from fbrain.brain.core import Brain
from fbrain.brain.epoch_counter import EpochCounter
from fbrain.brain.experiment import create_experiment_directory
from fbrain.brain.run_options import DEFAULTS as RUN_OPTION_DEFAULTS
from fbrain.brain.run_options import resolve_run_options
from fbrain.brain.stage import Stage

__all__ = ["Brain", "EpochCounter", "RUN_OPTION_DEFAULTS", "Stage", "create_experiment_directory",
           "parse_arguments", "resolve_run_options"]
