"""How a Brain's optimizers map onto one functional transformation and one optimizer state.

A Brain may have one optimizer (``opt_class``) or several (an overridden ``init_optimizers``:
a GAN's two, a frozen encoder plus a head ...). Each parameter group of each optimizer becomes a
*label*, and the whole is one ``optim.partition`` whose state is ``{label: state}``; parameters no
optimizer owns are frozen (label ``__frozen__``). A partition keeps each optimizer's fused kernel,
so one optimizer and several are the same case.

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

from fbrain import optim
from fbrain.brain.views import OptimizerView
from fbrain.optim.base import GradientTransformation
from fbrain.optim.hyperparams import get_hyperparams, set_hyperparams

FROZEN = "__frozen__"


def hold(tx: GradientTransformation) -> GradientTransformation:
    """``tx`` paused: the same state, kept unchanged, and no gradients computed for its parameters
    (what an optimizer left out by ``freeze_optimizers`` does for a step)."""
    return optim.frozen()._replace(init=tx.init)


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

    def transformation(self, active: frozenset | None = None) -> GradientTransformation:
        """The whole layout as one transformation; labels not in ``active`` are held."""
        parts = {label: tx if active is None or label in active else hold(tx)
                 for label, (tx, _) in self.groups.items()}
        if self.frozen:
            parts[FROZEN] = optim.frozen()
        return optim.partition(parts, self.label_of)

    def upgrade(self, opt_state):
        """``opt_state`` as this layout keeps it. Checkpoints of fbrain 0.1 hold a Brain with one
        optimizer and no frozen parameters as its optimizer's bare state, not ``{label: state}``."""
        if isinstance(opt_state, dict) or len(self.groups) != 1 or self.frozen:
            return opt_state
        (label,) = self.groups
        return {label: opt_state}

    @staticmethod
    def hyperparams(opt_state, label: str) -> dict:
        """The hyperparameters of optimizer ``label`` in ``opt_state``."""
        return get_hyperparams(opt_state[label])

    @staticmethod
    def with_hyperparams(opt_state, label: str, **values) -> dict:
        """``opt_state`` with hyperparameters of optimizer ``label`` set to ``values``."""
        return {**opt_state, label: set_hyperparams(opt_state[label], **values)}


def twin_of_group(optimizer: torch.optim.Optimizer, group: dict) -> GradientTransformation:
    """The fbrain twin of one parameter group of a torch optimizer (its own hyperparameters)."""
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    hyper = {k: v for k, v in group.items() if k != "params" and k in accepted}
    probe = cls([torch.nn.Parameter(torch.zeros(1))], **hyper)
    return optim.twin_of(probe)


def layout_of(optimizers: dict, modules: torch.nn.Module,
              ema_decay: float | None = None) -> tuple[OptimizerLayout, dict]:
    """The layout of the optimizers ``init_optimizers`` made (``{key: torch optimizer or
    transformation}``), and for each key the groups its view shows: ``[(label, [(name, param)],
    extras)]``. With ``ema_decay``, every group keeps an average of its weights (``optim.with_ema``)."""
    layout, specs = _layout_of(optimizers, modules)
    if ema_decay is not None:
        layout.groups = {label: (optim.with_ema(tx, ema_decay), names) for label, (tx, names) in layout.groups.items()}
    return layout, specs


def _layout_of(optimizers: dict, modules: torch.nn.Module) -> tuple[OptimizerLayout, dict]:
    names = {id(p): n for n, p in modules.named_parameters()}
    groups, specs = {}, {}
    for key, opt in optimizers.items():
        if isinstance(opt, GradientTransformation):
            named = list(modules.named_parameters())
            groups[key] = (opt, [n for n, p in named if p.requires_grad])
            specs[key] = [(key, named, {})]
            continue
        if not isinstance(opt, torch.optim.Optimizer) or isinstance(opt, OptimizerView):
            raise TypeError(
                f"optimizers_dict[{key!r}]: expected a torch.optim.Optimizer made by init_optimizers, "
                f"got {type(opt).__name__}"
            )
        specs[key] = []
        for i, group in enumerate(opt.param_groups):
            label = key if len(opt.param_groups) == 1 else f"{key}[{i}]"
            named = []
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"optimizer {key!r}: it optimizes a parameter of shape {tuple(p.shape)} that is not "
                        "in self.modules; every optimized parameter must belong to a module in `modules`"
                    )
                named.append((names[id(p)], p))
            groups[label] = (twin_of_group(opt, group), [n for n, p in named if p.requires_grad])
            specs[key].append((label, named, {k: v for k, v in group.items() if k != "params"}))
    return OptimizerLayout(groups, [n for n, _ in modules.named_parameters()]), specs


def vector_weight_decay_groups(modules: torch.nn.Module) -> list[dict]:
    """The trainable parameters of ``modules`` as two torch parameter groups: vectors (biases,
    norms' weights) with ``weight_decay`` 0, then the others (SpeechBrain's
    ``remove_vector_weight_decay``, in its order)."""
    trainable = [p for p in modules.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim == 1], "weight_decay": 0.0},
            {"params": [p for p in trainable if p.ndim != 1]}]
