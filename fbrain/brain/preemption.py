"""Stopping a run cleanly on SIGTERM (a cluster's pre-emption) or Ctrl-C (SIGINT).

While ``fit`` runs, the first such signal only raises a flag: the Brain finishes the step in
progress, saves an intra-epoch checkpoint (when it has a checkpointer), says so, and exits with the
conventional status (128 + the signal: 143 for SIGTERM, 130 for Ctrl-C). The next run of the same
command resumes from that checkpoint bit for bit. A second Ctrl-C stops at once (KeyboardInterrupt).
Handlers are installed only in the main thread and outside torchrun (whose ranks would have to
agree on the step to stop at), and the previous handlers are restored when ``fit`` returns.

Example::

    watch = Preemption()
    with watch.watching():
        for batch in loader:
            train(batch)
            if watch.signal is not None:
                save_and_exit()
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from fbrain import distributed as _distributed

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """The signal received during ``fit`` (None until one arrives)."""

    def __init__(self):
        self.signal: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum
        logger.warning("%s received: finishing the current step, then saving a checkpoint and stopping "
                       "(Ctrl-C again to stop at once)", signal.Signals(signum).name)

    @contextlib.contextmanager
    def watching(self):
        """Catch SIGTERM and SIGINT for the duration of the block (where that is possible)."""
        if threading.current_thread() is not threading.main_thread() or _distributed.active():
            yield
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        self.signal = None
        for s in SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.signal = None

    def exit_status(self) -> int:
        return 128 + int(self.signal)
