"""The ``compile_steps`` run option: the Brain's pure steps, compiled whole.

SpeechBrain's ``compile`` compiles modules; the optimizer, clipping and the bookkeeping around
them stay eager Python, which for a small model is most of a step. A pure step is one function of
(state, batch), so it compiles whole: forward, backward, clipping, the update and the counters in
one graph. The step is always compiled whole (``fullgraph=True``): a graph break inside the
gradient transform makes a step slower than eager (5x for the enhancement BiLSTM), so a step that
torch.compile cannot capture whole runs eagerly instead, with a warning, as SpeechBrain does for a
module that fails to compile.

Example::

    brain = fbrain.Brain(modules, opt_class, run_opts={"compile_steps": True})
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


class CompiledOrEager:
    """Calls ``step.compile(**compile_kwargs)``; on a compiler failure, warns once and calls
    ``step`` itself from then on (the state is untouched by a failed call: the step is pure)."""

    def __init__(self, step, what: str, **compile_kwargs):
        self.eager = step
        self.what = what
        self._call: Callable[..., Any] = step.compile(**{**compile_kwargs, "fullgraph": True})

    def __call__(self, state, batch):
        try:
            return self._call(state, batch)
        except torch._dynamo.exc.TorchDynamoException as error:
            if self._call is self.eager:
                raise
            logger.warning("compile_steps: the %s step failed to compile and runs eagerly: %s",
                           self.what, str(error).splitlines()[0] if str(error) else type(error).__name__)
            self._call = self.eager
            return self.eager(state, batch)
