"""SpeechBrain's ``profile_training`` run option: profile the first training steps, then stop.

With ``profile_training=True`` the Brain runs ``torch.profiler`` over its first
``profile_warmup + profile_steps`` training steps (the first ``profile_warmup`` only warm it up),
writes the trace of the last ``profile_steps`` into ``<output_folder>/profiler_logs`` (a Chrome /
TensorBoard trace: open it in ``chrome://tracing``, Perfetto, or TensorBoard's profiler plugin), logs
where, and ends the process with status 0, as SpeechBrain does: a profiling run is not a training run.

Example::

    profiler = TrainingProfiler(warmup=5, steps=5, folder="results/exp")
    profiler.start()
    for batch in loader:
        train(batch)
        if profiler.step():   # True once the profiled steps are done
            break
"""

from __future__ import annotations

import logging
import os

import torch
import torch.profiler

logger = logging.getLogger(__name__)


class TrainingProfiler:
    """``torch.profiler`` on a warm-up-then-record schedule, its trace written into ``folder``."""

    def __init__(self, warmup: int, steps: int, folder: str):
        for name, value in (("profile_warmup", warmup), ("profile_steps", steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "profile_warmup" else 1):
                raise ValueError(f"run option {name}: expected an int >= {0 if name == 'profile_warmup' else 1}, "
                                 f"got {value!r}")
        self.folder = os.path.join(folder, "profiler_logs")
        self.total = warmup + steps
        self._running = False
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=steps, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(self.folder),
            record_shapes=True, with_stack=True)

    def start(self) -> None:
        logger.info("PyTorch profiler started: %d steps, trace into %s", self.total, self.folder)
        self._profiler.start()
        self._running = True

    def step(self) -> bool:
        """Mark the end of one training step; True (and the trace written) after the last one."""
        self._profiler.step()
        if self._profiler.step_num < self.total:
            return False
        self._stop()
        logger.info("The profiler finished, training is stopped; the trace is in %s", self.folder)
        return True

    def finish(self) -> None:
        """Stop a profiler that ``fit`` left before its last step (fewer batches than profiled
        steps, a step limit, an error): what it recorded is written, and the log says so."""
        if self._running:
            self._stop()
            logger.warning("fit ended after %d of the %d profiled steps: the profiler is stopped (what it "
                           "recorded after the warm-up steps, if any, is in %s)",
                           self._profiler.step_num, self.total, self.folder)

    def _stop(self) -> None:
        self._running = False
        self._profiler.stop()
