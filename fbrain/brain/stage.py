"""The three stages of an experiment, numbered as in SpeechBrain, and equal to SpeechBrain's.

SpeechBrain's library code compares stages (``stage == sb.Stage.TRAIN``, ``stage in {...}``); a
recipe that runs on fbrain passes fbrain's ``Stage``. Importing SpeechBrain to share its enum would
turn on TF32 and patch the DataLoader, so instead a stage equals any other ``Stage`` enum member of
the same name (SpeechBrain's included) and hashes as Enum members do (by name): the two are
interchangeable in comparisons, sets and dict keys.

Example::

    >>> from enum import Enum
    >>> from fbrain.brain.stage import Stage
    >>> Stage.TRAIN.value, Stage.TEST.name
    (1, 'TEST')
    >>> OtherStage = Enum("Stage", ["TRAIN", "VALID", "TEST"])   # e.g. speechbrain.Stage
    >>> Stage.VALID == OtherStage.VALID, OtherStage.VALID in {Stage.VALID}, Stage.TRAIN == OtherStage.TEST
    (True, True, False)
"""

from enum import Enum


class Stage(Enum):
    """Which loop a hook is called from: training, validation or testing."""

    TRAIN = 1
    VALID = 2
    TEST = 3

    def __eq__(self, other) -> bool:
        if isinstance(other, Enum) and type(other).__name__ == "Stage":
            return self.name == other.name
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._name_)  # what Enum members hash to: equal stages hash alike
