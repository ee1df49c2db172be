"""``brain.optimizer`` and ``brain.scaler`` for imperative recipes: views over the TrainState.

A recipe that overrides ``fit_batch`` keeps writing ``loss.backward()``,
``self.scaler.scale(loss).backward()``, ``self.scaler.unscale_(self.optimizer)``,
``self.scaler.step(self.optimizer)``, ``self.optimizer.step()``, ``self.optimizer.zero_grad()``.
The modules' parameters hold the state's tensors, so ``backward()`` leaves gradients in ``.grad``;
a view's ``step`` turns them into the next TrainState with the functional optimizer (skipping the
update on the device if a gradient is not finite) and stores it in the Brain.

``optimizer.param_groups[i]["lr"]`` reads and writes the learning rate kept in the state, so
SpeechBrain's schedulers (and torch's, which accept the view as a ``torch.optim.Optimizer``) work.

Example (``brain`` is a fitted :class:`fbrain.Brain`)::

    lr = brain.optimizer.param_groups[0]["lr"]          # from brain.state.opt_state
    brain.optimizer.param_groups[0]["lr"] = lr / 2      # a new state with the new lr
"""

from __future__ import annotations

from typing import Any

import torch

from fbrain.optim.clipping import global_norm
from fbrain.optim.hyperparams import get_hyperparams, set_hyperparams
from fbrain.tree import map_tensors

# torch.optim's names for hyperparameters fbrain keeps under other names.
_PAIRS = {"betas": ("beta1", "beta2")}


class GroupView(dict):
    """One ``param_groups`` entry: ``params`` and extras as a dict, hyperparameters from the state."""

    def __init__(self, brain, label: str, params: list, extras: dict):
        super().__init__(extras)
        dict.__setitem__(self, "params", params)
        self._brain, self._label = brain, label
        for key in self._hyper_keys():
            dict.__setitem__(self, key, None)  # so `in`, keys() and len() list them

    def _hyper(self) -> dict:
        brain = self._brain
        return get_hyperparams(brain._layout.sub_state(brain.state.opt_state, self._label))

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
            self._brain._set_hyperparams(self._label, **values)
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
    """A torch-optimizer-shaped handle on some labels of the Brain's optimizer layout."""

    def __init__(self, brain, groups: list[tuple[str, list[tuple[str, torch.nn.Parameter]], dict]]):
        params = [{"params": [p for _, p in named]} for _, named, _ in groups]
        torch.optim.Optimizer.__init__(self, params, {})
        self._brain = brain
        self._labels = [label for label, _, _ in groups]
        self._named = [(n, p) for _, named, _ in groups for n, p in named]
        self.param_groups = [GroupView(brain, label, [p for _, p in named], extras)
                             for label, named, extras in groups]

    def __repr__(self) -> str:
        return f"OptimizerView(labels={self._labels})"

    def _grads(self) -> dict:
        return {n: p.grad for n, p in self._named if p.grad is not None}

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: torch.Tensor | None = None):
        """Apply the gradients in ``.grad`` to the state (skipped on the device if not finite)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Under torchrun the gradients are first averaged over the ranks (once per backward).
        found_inf = self._brain._sync_grads(self._named, found_inf)
        self._brain._apply_grads(self._labels, self._grads(), found_inf)
        self._brain._forget_synced(self._named)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self._named:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def state_dict(self):
        raise NotImplementedError(
            "OptimizerView.state_dict: the optimizer state lives in brain.state (a TrainState); "
            "checkpoint the TrainState instead of the optimizer"
        )

    def load_state_dict(self, state_dict):
        raise NotImplementedError("OptimizerView.load_state_dict: restore brain.state (a TrainState) instead")


class ScalerView:
    """``torch.amp.GradScaler``'s interface over ``brain.state.scaler`` (enabled for fp16 only)."""

    def __init__(self, brain, enabled: bool):
        self._brain, self._enabled = brain, enabled
        self._found_inf: dict[int, torch.Tensor] = {}

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        return float(self._brain.state.scaler.scale) if self._enabled else 1.0

    def scale(self, outputs: Any) -> Any:
        if not self._enabled:
            return outputs
        scale = self._brain.state.scaler.scale
        # As GradScaler: multiply by the float32 scale, so torch's type promotion decides the result
        # (a 0-dim fp16 loss is scaled in float32 and cannot overflow).
        return map_tensors(lambda t: t * scale.to(t.device), outputs)

    @torch.no_grad()
    def unscale_(self, optimizer: OptimizerView) -> None:
        if not self._enabled:
            return
        if id(optimizer) in self._found_inf:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update()")
        self._brain._sync_grads(optimizer._named)  # the ranks' average decides found_inf alike
        grads = [p.grad for _, p in optimizer._named if p.grad is not None]
        inv = self._brain.state.scaler.scale.double().reciprocal().float()
        if grads:
            torch._foreach_mul_(grads, inv)
        norm = global_norm(grads) if grads else torch.zeros(())
        self._found_inf[id(optimizer)] = ~torch.isfinite(norm)

    def step(self, optimizer: OptimizerView, *args, **kwargs):
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if not isinstance(optimizer, OptimizerView):
            raise TypeError(f"scaler.step: expected the Brain's optimizer view, got {type(optimizer).__name__}")
        if id(optimizer) not in self._found_inf:
            self.unscale_(optimizer)
        return optimizer.step(*args, found_inf=self._found_inf[id(optimizer)], **kwargs)

    def update(self, new_scale=None) -> None:
        if not self._enabled:
            return
        brain = self._brain
        scaler = brain.state.scaler
        if new_scale is not None:
            scale = torch.as_tensor(new_scale, dtype=scaler.scale.dtype, device=scaler.scale.device)
            new = scaler._replace(scale=scale)
        else:
            found = torch.zeros((), dtype=torch.bool, device=scaler.scale.device)
            for f in self._found_inf.values():
                found = found | f.to(found.device)
            new = brain._loss_scale.update(scaler, found)
        self._found_inf.clear()
        brain.state = brain.state.replace(scaler=new)

    def state_dict(self) -> dict:
        s = self._brain.state.scaler
        return {"scale": s.scale, "growth_tracker": s.growth_tracker} if self._enabled else {}

    def load_state_dict(self, state: dict) -> None:
        if self._enabled and state:
            brain = self._brain
            brain.state = brain.state.replace(scaler=brain.state.scaler._replace(
                scale=torch.as_tensor(state["scale"]), growth_tracker=torch.as_tensor(state["growth_tracker"])))
