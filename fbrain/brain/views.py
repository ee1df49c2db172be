"""``brain.optimizer`` and ``brain.scaler`` for imperative recipes: views over the TrainState.

A recipe that overrides ``fit_batch`` keeps writing ``loss.backward()``,
``self.scaler.scale(loss).backward()``, ``self.scaler.unscale_(self.optimizer)``,
``self.scaler.step(self.optimizer)``, ``self.optimizer.step()``, ``self.optimizer.zero_grad()``.
The modules' parameters hold the state's tensors, so ``backward()`` leaves gradients in ``.grad``;
a view's ``step`` turns them into the next TrainState through
:class:`~fbrain.brain.imperative.ImperativeUpdates` (the same :func:`~fbrain.update.apply_gradients`
as the pure step).

``optimizer.param_groups[i]["lr"]`` reads and writes the learning rate kept in the state, so
SpeechBrain's schedulers (and torch's, which accept the view as a ``torch.optim.Optimizer``) work.

Example (``brain`` is a fitted :class:`fbrain.Brain`)::

    lr = brain.optimizer.param_groups[0]["lr"]          # from brain.state.opt_state
    brain.optimizer.param_groups[0]["lr"] = lr / 2      # a new state with the new lr
"""

from __future__ import annotations

from typing import Any

import torch

from fbrain.checkpoint.speechbrain_import import _import_optimizer, export_optimizer

# torch.optim's names for hyperparameters fbrain keeps under other names.
_PAIRS = {"betas": ("beta1", "beta2")}


class GroupView(dict):
    """One ``param_groups`` entry: ``params`` and extras as a dict, hyperparameters from the state."""

    def __init__(self, updates, label: str, params: list, extras: dict):
        super().__init__(extras)
        dict.__setitem__(self, "params", params)
        self._updates, self._label = updates, label
        for key in self._hyper_keys():
            dict.__setitem__(self, key, None)  # so `in`, keys() and len() list them

    def _hyper(self) -> dict:
        return self._updates.hyperparams(self._label)

    def _hyper_keys(self) -> list[str]:
        hp = self._hyper()
        paired = {name for pair in _PAIRS.values() for name in pair}
        keys = [k for k in hp if k not in paired]
        keys += [k for k, pair in _PAIRS.items() if all(p in hp for p in pair)]
        return keys

    def _is_hyper(self, key) -> bool:
        hp = self._hyper()
        return key in hp or (key in _PAIRS and all(p in hp for p in _PAIRS[key]))

    def __getitem__(self, key):
        if key != "params" and self._is_hyper(key):
            hp = self._hyper()
            if key in _PAIRS:
                return tuple(float(hp[p]) for p in _PAIRS[key])
            return float(hp[key])  # one host read: schedulers read the lr a few times per epoch
        return dict.__getitem__(self, key)

    def __setitem__(self, key, value):
        if key != "params" and self._is_hyper(key):
            values = dict(zip(_PAIRS[key], value)) if key in _PAIRS else {key: value}
            self._updates.set_hyperparams(self._label, **values)
        else:
            dict.__setitem__(self, key, value)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    def values(self):
        return [self[k] for k in self.keys()]

    def copy(self):
        return {k: self[k] for k in self.keys()}


class OptimizerView(torch.optim.Optimizer):
    """A torch-optimizer-shaped handle on some labels of the Brain's optimizer layout.

    ``labels``: the layout labels it steps; ``named``: its (name, parameter) pairs.
    """

    def __init__(self, updates, groups: list[tuple[str, list[tuple[str, torch.nn.Parameter]], dict]]):
        params = [{"params": [p for _, p in named]} for _, named, _ in groups]
        torch.optim.Optimizer.__init__(self, params, {})
        self._updates = updates
        self.labels = [label for label, _, _ in groups]
        self.named = [(n, p) for _, named, _ in groups for n, p in named]
        self.param_groups = [GroupView(updates, label, [p for _, p in named], extras)
                             for label, named, extras in groups]

    def __repr__(self) -> str:
        return f"OptimizerView(labels={self.labels})"

    @torch.no_grad()
    def step(self, closure=None):
        """Apply the gradients in ``.grad`` to the state (skipped on the device if not finite)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._updates.step(self)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._updates.gradients_cleared(self)
        for _, p in self.named:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def _names_per_group(self) -> list[list[str]]:
        names = {id(p): n for n, p in self.named}
        return [[names[id(p)] for p in group["params"]] for group in self.param_groups]

    def state_dict(self) -> dict:
        """This optimizer's part of ``brain.state`` in ``torch.optim``'s shape (a copy): what a
        recipe that adds its optimizer to the checkpointer saves, and what ``torch.save`` takes."""
        return export_optimizer(self._updates.owner.state.opt_state, self.labels, self._names_per_group(),
                                [group.copy() for group in self.param_groups])

    def load_state_dict(self, state_dict: dict) -> None:
        """Put a ``torch.optim``-shaped state dict (this view's, or the torch optimizer's it stands
        for) into ``brain.state``; a mismatch (another optimizer class, other shapes) is an error
        naming the parameter."""
        owner = self._updates.owner
        names = [n for group in self._names_per_group() for n in group]
        opt_state = _import_optimizer(owner.state.opt_state, state_dict, names, "optimizer.load_state_dict",
                                      optimizer_step=None, labels=self.labels)
        owner.state = owner.state.replace(opt_state=opt_state)


class ScalerView:
    """``torch.amp.GradScaler``'s interface over ``brain.state.scaler`` (enabled for fp16 only)."""

    def __init__(self, updates, enabled: bool):
        self._updates, self._enabled = updates, enabled

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        return float(self._updates.owner.state.scaler.scale) if self._enabled else 1.0

    def scale(self, outputs: Any) -> Any:
        return self._updates.scale(outputs)

    def unscale_(self, optimizer: OptimizerView) -> None:
        if self._is_view(optimizer):
            self._updates.unscale(optimizer)

    def step(self, optimizer: OptimizerView, *args, **kwargs):
        self._is_view(optimizer)
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale=None) -> None:
        self._updates.update_loss_scale(new_scale)

    def _is_view(self, optimizer) -> bool:
        """Whether ``optimizer`` is one of the Brain's views; any other optimizer is an error in fp16
        (its gradients would be applied scaled) and passes through otherwise, as with a disabled
        GradScaler."""
        if isinstance(optimizer, OptimizerView):
            return True
        if self._enabled:
            raise TypeError(f"scaler: expected the Brain's optimizer view, got {type(optimizer).__name__}")
        return False

    def state_dict(self) -> dict:
        s = self._updates.owner.state.scaler
        return {"scale": s.scale, "growth_tracker": s.growth_tracker} if self._enabled else {}

    def load_state_dict(self, state: dict) -> None:
        if self._enabled and state:
            owner = self._updates.owner
            owner.state = owner.state.replace(scaler=owner.state.scaler._replace(
                scale=torch.as_tensor(state["scale"]), growth_tracker=torch.as_tensor(state["growth_tracker"])))
