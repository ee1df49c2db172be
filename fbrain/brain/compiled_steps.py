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

import torch

from fbrain.compiling import compile_pure
from fbrain.torch_compat import COMPILE_FAILURES

logger = logging.getLogger(__name__)

# What torch.compile raises when it cannot (or may no longer) compile a step. The second is not
# a TorchDynamoException: under fullgraph, running out of recompiles is a hard error.

# CUDA graph modes overwrite a graph's outputs at its next replay, and the Brain keeps step outputs
# (the running loss, losses given to hooks); the same modes without CUDA graphs are used instead.
_WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


class StepCompiler:
    """Runs a Brain's steps of one kind ("train" or "eval") compiled: one compiled function for all
    of them (the Brain makes new steps at every fit), eager for good once compiling fails.

    ``compiler(step, state, batch)`` is ``step(state, batch)``, compiled.
    """

    def __init__(self, kind: str, mode: str | None = None, dynamic: bool | None = None):
        self.kind = kind
        mode = _WITHOUT_CUDA_GRAPHS.get(mode, mode)
        self.compiled = compile_pure(kind, fullgraph=True, mode=mode, dynamic=dynamic)
        self.failed = False

    def __call__(self, step, state, batch):
        if self.failed:
            return step(state, batch)
        try:
            return step.run_compiled(self.compiled, state, batch)
        except COMPILE_FAILURES as error:
            failure = error
        # Outside the except block, so an error of the recipe's own (which torch.compile reports
        # as a failure to trace) is raised by the eager step as itself, not chained to the
        # compiler's. Running the step again is safe: a failed compiled call ran nothing (dynamo
        # fails while tracing) and a pure step changes no input.
        result = step(state, batch)
        self.failed = True
        logger.warning("compile_steps: the %s step cannot be compiled and runs eagerly (%s: %s)", self.kind,
                       type(failure).__name__, _first_line(failure))
        logger.debug("compile_steps: why the %s step could not be compiled", self.kind, exc_info=failure)
        return result


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip() and not line.rstrip().endswith("raised:")]
    return lines[0] if lines else "no message"
