"""Stopping a run cleanly on SIGTERM (a cluster's pre-emption) or Ctrl-C (SIGINT).

While ``fit`` runs, the first such signal only raises a flag: the Brain finishes the step in
progress, saves an intra-epoch checkpoint (when it has a checkpointer), says so, and exits with the
conventional status (128 + the signal: 143 for SIGTERM, 130 for Ctrl-C). The next run of the same
command resumes from that checkpoint bit for bit. A second Ctrl-C stops at once (KeyboardInterrupt).

Under torchrun the ranks must stop at the same step (they save one checkpoint together, and a rank
that left early would hang the others' collectives), yet a signal may reach only some of them. So
after every step each rank adds what it has seen to a small all-reduce (MAX of the signal number,
on a CPU group, started without waiting); the next step reads that result, which every rank reads
at the same step. A signal therefore stops the run one step after it arrives, on every rank, and the
end of an epoch settles it with one blocking exchange. Handlers are installed only in the main
thread, and the previous handlers are restored when ``fit`` returns.

Example::

    watch = Preemption()
    with watch.watching():
        for batch in loader:
            train(batch)
            if watch.poll():
                save_and_exit(watch.exit_status())
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import torch
import torch.distributed as dist

from fbrain import distributed as _distributed

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """The signal received during ``fit`` (None until one arrives), and the ranks' agreement on it."""

    def __init__(self):
        self.signal: int | None = None
        self.agreed: int | None = None  # the signal every rank stops for
        self._group = None  # the CPU process group the flags travel on (distributed runs)
        self._flag: torch.Tensor | None = None
        self._exchange = None  # the all-reduce in flight

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum
        logger.warning("%s received: finishing the current step, then saving a checkpoint and stopping "
                       "(Ctrl-C again to stop at once)", signal.Signals(signum).name)

    @contextlib.contextmanager
    def watching(self):
        """Catch SIGTERM and SIGINT for the duration of the block (where that is possible)."""
        self.signal = self.agreed = self._exchange = None
        if _distributed.active() and self._group is None:
            # Collective: every rank calls its first fit, so every rank creates this group at the same
            # point; later fits reuse it.
            self._group = (dist.group.WORLD if dist.get_backend() == "gloo"
                           else dist.new_group(backend="gloo"))
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.signal = None

    def _finish_exchange(self) -> None:
        if self._exchange is not None:
            self._exchange.wait()
            self._exchange = None
            if int(self._flag):  # a CPU tensor: no device synchronisation
                self.agreed = int(self._flag)

    def _start_exchange(self) -> None:
        self._flag = torch.tensor([self.signal or 0], dtype=torch.int32)
        self._exchange = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)

    def poll(self) -> bool:
        """Call after every step on every rank: whether every rank stops now."""
        if self._group is None or not _distributed.active():
            self.agreed = self.agreed or self.signal
            return self.agreed is not None
        if self.agreed is None:
            self._finish_exchange()  # what the ranks had seen by the previous step
            if self.agreed is None:
                self._start_exchange()
        return self.agreed is not None

    def settle(self) -> bool:
        """At the end of an epoch, on every rank: whether any rank has seen a signal (blocking)."""
        if self._group is None or not _distributed.active():
            return self.poll()
        if self.agreed is None:
            self._finish_exchange()
        if self.agreed is None:
            self._start_exchange()
            self._finish_exchange()
        return self.agreed is not None

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (blocking, on the CPU group; every rank calls it at the
        same point). Outside a distributed run: ``flag``."""
        if self._group is None or not _distributed.active():
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group)
        return bool(int(value))

    def exit_status(self) -> int:
        return 128 + int(self.agreed or self.signal)
