"""How a Brain's optimizers map onto one functional transformation and one optimizer state.

A Brain may have one optimizer (``opt_class``) or several (an overridden ``init_optimizers``:
a GAN's two, a frozen encoder plus a head ...). Each parameter group of each optimizer becomes a
*label*; the state's optimizer state is the single transformation's state when there is exactly one
label covering every parameter (the fast path: fused kernels apply), and otherwise an
``optim.partition`` state ``{label: state}``. Parameters no optimizer owns are frozen.

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> from fbrain.brain.optimizers import OptimizerLayout
    >>> layout = OptimizerLayout({"g": (optim.sgd(0.1), ["a"]), "d": (optim.adam(1e-3), ["b"])}, ["a", "b", "c"])
    >>> sorted(layout.transformation().init({"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)}))
    ['__frozen__', 'd', 'g']
"""

from __future__ import annotations

import inspect
from typing import Iterable

import torch

from fbrain import distributed as _distributed
from fbrain import optim
from fbrain.optim.base import GradientTransformation
from fbrain.optim.clipping import global_norm
from fbrain.state import Counters, TrainState
from fbrain.tree import select

FROZEN = "__frozen__"


def hold(tx: GradientTransformation) -> GradientTransformation:
    """``tx`` paused: the same state, kept unchanged, and no gradients computed for its parameters
    (what an optimizer left out by ``freeze_optimizers`` does for a step)."""
    return GradientTransformation(init=tx.init, update=lambda grads, state, params=None: ({}, state),
                                  frozen=lambda params: frozenset(params))


class OptimizerLayout:
    """``groups``: label -> (transformation, parameter names); ``all_names``: every parameter."""

    def __init__(self, groups: dict[str, tuple[GradientTransformation, list[str]]], all_names: Iterable[str]):
        self.groups = dict(groups)
        self.all_names = list(all_names)
        owner: dict[str, str] = {}
        for label, (_, names) in self.groups.items():
            for name in names:
                if name in owner:
                    raise ValueError(f"optimizers: parameter {name!r} is in both {owner[name]!r} and {label!r}")
                owner[name] = label
        self.frozen = [n for n in self.all_names if n not in owner]
        self.label_of = {**owner, **{n: FROZEN for n in self.frozen}}
        self.single = len(self.groups) == 1 and not self.frozen

    def transformation(self, active: frozenset | None = None) -> GradientTransformation:
        """The whole layout as one transformation; labels not in ``active`` are held."""
        def maybe_hold(label, tx):
            return tx if active is None or label in active else hold(tx)

        if self.single:
            (label, (tx, _)), = self.groups.items()
            return maybe_hold(label, tx)
        parts = {label: maybe_hold(label, tx) for label, (tx, _) in self.groups.items()}
        if self.frozen:
            parts[FROZEN] = optim.frozen()
        return optim.partition(parts, self.label_of)

    def sub_state(self, opt_state, label: str):
        return opt_state if self.single else opt_state[label]

    def with_sub_state(self, opt_state, label: str, sub):
        return sub if self.single else {**opt_state, label: sub}


def twin_of_group(optimizer: torch.optim.Optimizer, group: dict) -> GradientTransformation:
    """The fbrain twin of one parameter group of a torch optimizer (its own hyperparameters)."""
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    hyper = {k: v for k, v in group.items() if k != "params" and k in accepted}
    probe = cls([torch.nn.Parameter(torch.zeros(1))], **hyper)
    return optim.twin_of(probe)


def apply_grads(layout: OptimizerLayout, state: TrainState, labels: Iterable[str], grads: dict,
                found_inf: torch.Tensor | None = None) -> TrainState:
    """The state after the optimizers of ``labels`` take one step with ``grads`` (name -> tensor).

    As in the pure train step, nothing changes if a gradient is not finite (or ``found_inf``):
    the decision is a ``torch.where`` on the device.
    """
    device = next(iter(state.params.values())).device
    norm = global_norm(list(grads.values())) if grads else torch.zeros((), device=device)
    finite = torch.isfinite(norm)
    if found_inf is not None:
        finite = finite & ~found_inf
    skip = ~finite
    params, opt_state = dict(state.params), state.opt_state
    for label in labels:
        tx, names = layout.groups[label]
        g = {n: grads[n] for n in names if n in grads}
        if not g:
            continue
        sub = layout.sub_state(opt_state, label)
        p = {n: params[n] for n in names}
        result = tx.fused_apply(g, sub, p, skip) if tx.fused_apply is not None else None
        if result is None:
            updates, new_sub = tx.update(g, sub, p)
            new_p = optim.apply_updates(p, updates)
            result = select(finite, new_p, p), select(finite, new_sub, sub)
        new_p, new_sub = result
        params.update(new_p)
        opt_state = layout.with_sub_state(opt_state, label, new_sub)
    c = state.counters
    return state.replace(params=params, opt_state=opt_state, counters=Counters(
        step=c.step, optimizer_step=c.optimizer_step + finite.long(), epoch=c.epoch,
        nonfinite_count=c.nonfinite_count + skip.long(),
        nonfinite_streak=torch.where(finite, torch.zeros_like(c.nonfinite_streak), c.nonfinite_streak + 1)))


@torch.no_grad()
def average_grads(params: list[torch.nn.Parameter], group, found_inf: torch.Tensor | None = None):
    """Average the ``.grad`` of ``params`` over the ranks of ``group``, in place, with one flat
    all-reduce (what DDP leaves in ``.grad``); returns ``found_inf`` made true on every rank if it
    was true on one.

    A parameter without a gradient on some rank counts as a zero gradient there (DDP's
    ``find_unused_parameters``); one without a gradient on every rank keeps ``.grad = None``.
    Every rank must call this with the same parameters (as every rank calls ``optimizer.step()``).
    """
    if not params:
        return found_inf
    device = params[0].device
    packed = {str(i): (p.grad if p.grad is not None else torch.zeros_like(p)) for i, p in enumerate(params)}
    packed["present"] = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flag = torch.zeros((), device=device) if found_inf is None else found_inf.to(device=device, dtype=torch.float32)
    mean, flag = _distributed.mean_across_ranks(packed, flag, group)
    present = mean.pop("present")
    # Which of this rank's missing gradients another rank had: a host read, only when one is missing.
    elsewhere = present.tolist() if any(p.grad is None for p in params) else None
    for i, p in enumerate(params):
        avg = mean[str(i)]
        if p.grad is not None:
            p.grad.copy_(avg)
        elif elsewhere[i] > 0:
            p.grad = avg.to(p.dtype).clone()
    return None if found_inf is None else flag > 0
