"""The three stages of an experiment, numbered as in SpeechBrain.

Example::

    >>> from fbrain.brain.stage import Stage
    >>> Stage.TRAIN.value, Stage.TEST.name
    (1, 'TEST')
"""

from enum import Enum


class Stage(Enum):
    """Which loop a hook is called from: training, validation or testing."""

    TRAIN = 1
    VALID = 2
    TEST = 3
