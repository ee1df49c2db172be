"""Gradient averaging across torchrun ranks for imperative ``fit_batch`` overrides.

The pure step averages gradients inside itself. A recipe that calls ``loss.backward()`` itself
leaves each rank's own gradients in ``.grad``; DDP would average them during ``backward()``. Here
they are averaged when they are first used (``scaler.unscale_``, ``optimizers_step``,
``optimizer.step()``), in one flat all-reduce, and not again until a step consumed them, so
micro-batches accumulated before a step are communicated once. Inside :meth:`GradientSync.paused`
(the Brain's ``no_sync``) nothing is sent.

Example::

    sync = GradientSync()
    sync.sync(named_params)      # no-op without torchrun
    ...                          # the step uses the averaged .grad
    sync.forget(named_params)
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from fbrain import distributed as _distributed


class GradientSync:
    """Which parameters' ``.grad`` have been averaged since they last changed."""

    def __init__(self):
        self._off = False
        self._synced: dict = {}  # id(param) -> (weakref to the .grad averaged, its version)

    @contextlib.contextmanager
    def paused(self):
        """Inside, no gradient is averaged (DDP's ``no_sync``)."""
        outer, self._off = self._off, True
        try:
            yield
        finally:
            self._off = outer

    def _is_synced(self, p) -> bool:
        entry = self._synced.get(id(p))
        if entry is None:
            return False
        if p.grad is None:
            return entry[0] is None
        return entry[0] is not None and entry[0]() is p.grad and entry[1] == p.grad._version

    def sync(self, named) -> None:
        """Average the ``.grad`` of ``named`` ((name, param) pairs) over the ranks, unless they already
        are."""
        if self._off or not _distributed.active():
            return
        pending = [p for _, p in named if p.requires_grad and not self._is_synced(p)]
        if not pending:
            return
        average_grads(pending, torch.distributed.group.WORLD)
        for p in pending:
            self._synced[id(p)] = (None, None) if p.grad is None else (weakref.ref(p.grad), p.grad._version)

    def forget(self, named) -> None:
        """After a step: the next gradients of ``named`` are new and must be averaged again."""
        for _, p in named:
            self._synced.pop(id(p), None)


@torch.no_grad()
def average_grads(params: list[torch.nn.Parameter], group) -> None:
    """Average the ``.grad`` of ``params`` over the ranks of ``group``, in place, with one flat
    all-reduce (what DDP leaves in ``.grad``).

    A parameter without a gradient on some rank counts as a zero gradient there (DDP's
    ``find_unused_parameters``); one without a gradient on every rank keeps ``.grad = None``.
    Every rank must call this with the same parameters (as every rank calls ``optimizer.step()``).
    """
    if not params:
        return
    device = params[0].device
    packed = {str(i): (p.grad if p.grad is not None else torch.zeros_like(p)) for i, p in enumerate(params)}
    packed["present"] = torch.tensor([float(p.grad is not None) for p in params], device=device)
    mean, _ = _distributed.mean_across_ranks(packed, torch.zeros((), device=device), group)
    present = mean.pop("present")
    # Which of this rank's missing gradients another rank had: a host read, only when one is missing.
    elsewhere = present.tolist() if any(p.grad is None for p in params) else None
    for i, p in enumerate(params):
        avg = mean[str(i)]
        if p.grad is not None:
            p.grad.copy_(avg)
        elif elsewhere[i] > 0:
            p.grad = avg.to(p.dtype).clone()
