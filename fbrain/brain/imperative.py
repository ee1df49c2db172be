"""The imperative path of a Brain: ``scaler.scale(loss).backward()``, ``scaler.unscale_``,
``optimizer.step()``, ``scaler.update()`` and ``optimizers_step``, each ending in
:func:`fbrain.update.apply_gradients`.

An imperative ``fit_batch`` spreads one update over several calls; :class:`ImperativeUpdates`
carries what they tell each other, so the result equals the pure step's on the same gradients,
bit for bit:

* ``scaler.scale(loss)`` records whether the loss was finite (in every precision: a step whose loss
  was not finite is skipped, and counted as non-finite, as in the pure step);
* ``scaler.unscale_(optimizer)`` divides ``.grad`` by the loss scale (fp16) and records whether the
  global norm was finite *before* a recipe's own ``clip_grad_norm_``, which would turn gradients
  whose norm overflows into zeros that look finite;
* ``optimizer.step()`` applies the gradients of its parameters (skipping on the device);
* ``scaler.update()`` grows or backs off the loss scale from the steps since the last update.

Example (inside an imperative ``fit_batch``)::

    self.scaler.scale(loss).backward()
    self.scaler.unscale_(self.optimizer)
    torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 5.0)
    self.scaler.step(self.optimizer)      # -> ImperativeUpdates.step
    self.scaler.update()
"""

from __future__ import annotations

from typing import Any

import torch

from fbrain import distributed as _distributed
from fbrain import optim
from fbrain.brain.grad_sync import GradientSync
from fbrain.loss_scale import DynamicLossScale
from fbrain.optim.clipping import global_norm
from fbrain.tree import device_of, map_tensors
from fbrain.update import UpdateRule, apply_gradients, is_finite, next_loss_scale


class ImperativeUpdates:
    """What a Brain's optimizer and scaler views share. ``owner`` is anything with a ``state``
    attribute (the Brain): updates read it and assign the next state to it."""

    def __init__(self, owner, precision: str, loss_scale: DynamicLossScale, sync: GradientSync):
        self.owner = owner
        self.rule = UpdateRule(optim.identity(), precision=precision, loss_scale=loss_scale)
        self.sync = sync
        self.layout = None
        self._transformations: dict = {}
        self._unscaled: dict = {}  # view -> its global norm was not finite before a recipe clipped
        # Sum of (x - x) over every loss scaled since the last step: 0, or NaN if one was not finite.
        self._loss_flag: torch.Tensor | None = None
        self._skipped: list[torch.Tensor] = []  # fp16: steps since the last scaler.update()

    def use_layout(self, layout) -> None:
        """A new layout (and new views): nothing recorded for the old ones carries over."""
        self.layout = layout
        self._transformations.clear()
        self._unscaled, self._loss_flag, self._skipped = {}, None, []

    def _rule_for(self, labels: frozenset, max_grad_norm=None) -> UpdateRule:
        if labels not in self._transformations:
            self._transformations[labels] = self.layout.transformation(labels)
        return self.rule.replace(optimizer=self._transformations[labels], max_grad_norm=max_grad_norm)

    def _grads(self, named, labels: frozenset) -> dict:
        """The ``.grad`` of ``named`` that ``labels`` train, in the state's parameter order (the order
        the pure step's gradients have: the global norm's rounding depends on it)."""
        label_of, by_name = self.layout.label_of, dict(named)
        return {n: by_name[n].grad for n in self.owner.state.params
                if n in by_name and by_name[n].grad is not None and label_of.get(n) in labels}

    # -- scaler.scale / unscale_ -------------------------------------------------------------------

    def scale(self, outputs: Any) -> Any:
        """``outputs`` times the loss scale (fp16), recording whether they are finite."""
        for t in (outputs if isinstance(outputs, (list, tuple)) else [outputs]):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                flag = (t.detach() - t.detach()).sum().float()
                self._loss_flag = flag if self._loss_flag is None else self._loss_flag + flag
        if not self.rule.fp16:
            return outputs
        scale = self.owner.state.scaler.scale
        # As GradScaler: multiply by the float32 scale, so torch's type promotion decides the result
        # (a 0-dim fp16 loss is scaled in float32 and cannot overflow).
        return map_tensors(lambda t: t * scale.to(t.device), outputs)

    def loss_pending(self) -> bool:
        """Whether a loss went through ``scale()`` since the last step (that step counts it if it
        was not finite)."""
        return self._loss_flag is not None

    @torch.no_grad()
    def unscale(self, view) -> None:
        """``scaler.unscale_(view)``: unscale ``.grad`` in place (fp16); note whether its norm is finite."""
        if self.rule.fp16 and view in self._unscaled:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update()")
        self.sync.sync(view.named)  # the ranks' average decides alike
        grads = list(self._grads(view.named, frozenset(view.labels)).values())
        if self.rule.fp16 and grads:
            torch._foreach_mul_(grads, self.owner.state.scaler.scale.double().reciprocal().float())
        self._unscaled[view] = ~is_finite(global_norm(grads)) if grads else \
            torch.zeros((), dtype=torch.bool, device=device_of(self.owner.state.params))

    def gradients_cleared(self, view) -> None:
        """``view.zero_grad()``: the losses scaled so far no longer have gradients in ``.grad`` (a
        recipe that skipped a step must not skip the next one for them), nor does a fp32
        ``unscale_`` record (fp16's last until ``scaler.update()``, as GradScaler's)."""
        self._loss_flag = None
        if not self.rule.fp16:
            self._unscaled.pop(view, None)

    # -- the updates -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, view) -> None:
        """``view.step()``: apply the ``.grad`` of the view's parameters."""
        unscaled = view in self._unscaled
        if not unscaled:
            # After unscale_ the gradients were averaged already; a recipe's clipping since changed
            # them alike on every rank.
            self.sync.sync(view.named)
        found_inf = self._unscaled.get(view) if self.rule.fp16 else self._unscaled.pop(view, None)
        labels = frozenset(view.labels)
        self._apply(self._grads(view.named, labels), self._rule_for(labels), found_inf=found_inf,
                    scaled=not unscaled)
        self.sync.forget(view.named)

    @torch.no_grad()
    def optimizers_step(self, views: list, max_grad_norm) -> None:
        """The Brain's ``optimizers_step``: unscale, clip (every parameter of every view together),
        apply, and update the loss scale, in one :func:`apply_gradients`."""
        if self.rule.fp16 and any(v in self._unscaled for v in views):
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update()")
        named = [pair for v in views for pair in v.named]
        self.sync.sync(named)  # averaged over the ranks once, before unscaling and clipping
        labels = frozenset(label for v in views for label in v.labels)
        self._apply(self._grads(named, labels), self._rule_for(labels, max_grad_norm), found_inf=None, scaled=True)
        self.sync.forget(named)
        self.update_loss_scale()

    def _apply(self, grads, rule, found_inf, scaled) -> None:
        # Every rank must decide alike: a loss that was not finite on one rank skips the step on all.
        flag = _distributed.scalar_mean(self._loss_flag)
        state, metrics = apply_gradients(self.owner.state, grads, rule, loss=flag,
                                         found_inf=found_inf, scaled=scaled, update_loss_scale=False)
        self.owner.state = state
        if self.rule.fp16:
            self._skipped.append(metrics["skipped"])
        self._loss_flag = None

    def update_loss_scale(self, new_scale=None) -> None:
        """``scaler.update()``: back off if a step since the last update was skipped, else grow on
        schedule (fp16 only); ``new_scale`` sets the scale instead."""
        flags = self._skipped + list(self._unscaled.values())
        self._skipped, self._unscaled = [], {}
        if not self.rule.fp16:
            return
        state = self.owner.state
        if new_scale is not None:
            scale = torch.as_tensor(new_scale, dtype=state.scaler.scale.dtype, device=state.scaler.scale.device)
            self.owner.state = state.replace(scaler=state.scaler._replace(scale=scale))
            return
        if not flags:
            raise AssertionError("No inf checks were recorded prior to update.")  # GradScaler's own check
        found = flags[0]
        for flag in flags[1:]:
            found = found | flag
        self.owner.state = state.replace(scaler=next_loss_scale(self.rule, state.scaler, found))

    # -- hyperparameters ---------------------------------------------------------------------------

    def hyperparams(self, label: str) -> dict:
        return self.layout.hyperparams(self.owner.state.opt_state, label)

    def set_hyperparams(self, label: str, **values) -> None:
        state = self.owner.state
        self.owner.state = state.replace(opt_state=self.layout.with_hyperparams(state.opt_state, label, **values))
