"""Pure training and evaluation steps.

``make_train_step`` turns a loss function and an optimizer into
``train_step(state, batch) -> (state, metrics)``. A step is four stages, each a small function:

1. **gradients** of the loss, summed over ``accumulation`` micro-batches (:func:`loss_and_grads`);
2. **reduce** across ranks under torchrun (one flat all-reduce: :mod:`fbrain.distributed`);
3. unscale, check, clip and **apply** them: :func:`fbrain.update.apply_gradients`, the one
   function every way of training goes through;
4. the loss and the loss function's extras become the **metrics**.

Every decision is a ``torch.where`` on the device; a step never reads a tensor value on the host.

Example::

    >>> import torch, fbrain
    >>> from fbrain import optim
    >>> model = torch.nn.Linear(4, 1)
    >>> def loss_fn(params, buffers, batch, rng):
    ...     x, y = batch
    ...     pred, _ = fbrain.apply_module(model, params, buffers, x)
    ...     return torch.nn.functional.mse_loss(pred, y)
    >>> opt = optim.adam(lr=1e-2)
    >>> state = fbrain.TrainState.create(model, opt)
    >>> train_step = fbrain.make_train_step(loss_fn, opt, max_grad_norm=5.0)
    >>> batch = (torch.randn(8, 4), torch.randn(8, 1))
    >>> state, metrics = train_step(state, batch)
    >>> int(state.counters.optimizer_step), bool(metrics["skipped"])
    (1, False)
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from fbrain import compiled_dropout
from fbrain import rng as _rng
from fbrain.batches import micro_batches, structure
from fbrain.compiling import compile_pure
from fbrain.distributed import mean_across_ranks
from fbrain import sharding
from fbrain.gradients import loss_and_grads, per_example_loss_and_grads, split_loss
from fbrain.loss_scale import DynamicLossScale
from fbrain.optim import _foreach as fe
from fbrain.optim.base import GradientTransformation, frozen_names
from fbrain.precision import autocast, autocast_dtype
from fbrain.state import TrainState, check_opt_state, check_state
from fbrain.tree import device_of
from fbrain.update import UpdateRule, apply_gradients


def _cuda_devices(state: TrainState) -> tuple[torch.device, ...]:
    device = device_of(state.params)
    return (device,) if device.type == "cuda" else ()


class _RandomnessFromState:
    """Checked entry points shared by both steps: random draws come from ``state.rng``."""

    def run_compiled(self, compiled: Callable, state: TrainState, batch: Any):
        """One call of ``compiled`` (from :func:`fbrain.compiling.compile_pure`), randomness from
        ``state.rng``."""
        self._check(state, batch)
        with _rng.scope(state.rng, _cuda_devices(state)) as out:
            result = compiled(self, state, batch)
        return self._with_key(result, out.key)

    def compile(self, **compile_kwargs) -> Callable:
        """``torch.compile`` the step, keeping randomness a function of ``state.rng``.

        Keyword arguments go to ``torch.compile`` (e.g. ``fullgraph=True, mode="max-autotune"``).
        """
        return functools.partial(self.run_compiled, compile_pure(self.kind, **compile_kwargs))

    def __call__(self, state: TrainState, batch: Any):
        if torch.compiler.is_compiling():
            # Inside torch.compile the global generators cannot be swapped; the key passes through
            # and random ops draw from the caller's generator. `compile()` keeps the state-driven
            # randomness by swapping them outside the compiled graph.
            return self.pure(state, batch)
        self._check(state, batch)
        with _rng.scope(state.rng, _cuda_devices(state)) as out:
            result = self.pure(state, batch)
        return self._with_key(result, out.key)


class TrainStep(_RandomnessFromState):
    """The pure train step built by :func:`make_train_step`; call it as ``step(state, batch)``."""

    kind = "train"

    def __init__(self, loss_fn: Callable, rule: UpdateRule, *, accumulation: int = 1, per_example: bool = False,
                 process_group=None, shard_optimizer_state: bool = False,
                 bucket_elements: int = sharding.BUCKET_ELEMENTS):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a function (params, buffers, batch, rng) -> loss, got {loss_fn!r}")
        if not (isinstance(accumulation, int) and not isinstance(accumulation, bool) and accumulation >= 1):
            raise ValueError(f"accumulation: expected an int >= 1, got {accumulation!r}")
        self.loss_fn = loss_fn
        self.rule = rule
        self.accumulation = accumulation
        self.per_example = bool(per_example)
        # Per-example steps clip each example's gradient (in `gradients`), not their mean.
        self._apply_rule = rule.replace(max_grad_norm=None) if self.per_example else rule
        self.process_group = process_group
        if shard_optimizer_state and (process_group is None or per_example):
            raise ValueError("shard_optimizer_state: needs a process_group (the ranks sharing the state), "
                             "and is not available with per_example steps")
        self.shard_optimizer_state = bool(shard_optimizer_state)
        self.bucket_elements = sharding.checked_bucket_elements(bucket_elements)
        self._batch_spec = None
        self._trainable: dict = {}  # parameter names -> those the optimizer does not freeze
        self._opt_layouts: dict = {}  # layouts of (params, opt_state) checked against the optimizer

    @property
    def optimizer(self) -> GradientTransformation:
        return self.rule.optimizer

    def _check(self, state, batch) -> None:
        check_state(state)
        if not self.shard_optimizer_state:  # a sharded state keeps slices (see fbrain.sharding)
            check_opt_state(state, self.optimizer, self._opt_layouts)
        spec = structure(batch)
        if self._batch_spec is None:
            self._batch_spec = spec
        elif spec != self._batch_spec:
            raise TypeError(
                f"batch: its layout of tensors differs from the first batch this step saw.\n"
                f"  expected: {self._batch_spec}\n  got:      {spec}"
            )

    @staticmethod
    def _with_key(result, key):
        new_state, metrics = result
        return new_state.replace(rng=key), metrics

    def pure(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """One step without argument checks or RNG handling (what compile and vmap trace)."""
        # Under torch.compile, however it was entered, dropout takes the path inductor compiles
        # correctly (see fbrain.compiled_dropout).
        with compiled_dropout.when_compiling():
            loss, grads, buffers, aux = self.gradients(state, batch)
            if self.shard_optimizer_state:
                # Each rank updates its slice of every parameter (see fbrain.sharding).
                new_state, metrics, loss = sharding.sharded_apply_gradients(
                    state, grads, loss, self._apply_rule, self.process_group, buffers, self.bucket_elements)
                return new_state, {**aux, **metrics, "loss": loss}
            if self.process_group is not None:
                # One collective per step, after the local micro-batches: all ranks then agree bit for bit.
                grads, loss = mean_across_ranks(grads, loss, self.process_group)
            new_state, metrics = apply_gradients(state, grads, self._apply_rule, loss=loss, buffers=buffers)
        return new_state, {**aux, **metrics, "loss": loss}

    def trainable(self, params: dict) -> list[str]:
        """The names of ``params`` that get gradients (a function of the names alone, kept)."""
        names = tuple(params)
        if torch.compiler.is_compiling():  # a cache filled while tracing would fail the guards next call
            return [n for n in names if n not in frozen_names(self.rule.optimizer, params)]
        if names not in self._trainable:
            frozen = frozen_names(self.rule.optimizer, params)
            self._trainable[names] = [n for n in names if n not in frozen]
        return self._trainable[names]

    def gradients(self, state: TrainState, batch: Any) -> tuple[torch.Tensor, dict, dict, dict]:
        """``(loss, grads, buffers, aux)`` of one step, summed over its micro-batches."""
        params, rule, k = state.params, self.rule, self.accumulation
        trainable = self.trainable(params)
        # SpeechBrain's accumulation: each micro-batch contributes loss / k.
        multiplier = state.scaler.scale / k if rule.fp16 else (None if k == 1 else 1.0 / k)
        context = functools.partial(autocast, rule.precision, device_of(params))
        buffers, grads, losses, aux = state.buffers, None, [], {}
        for mb in micro_batches(batch, k):
            if self.per_example:
                loss, g, aux = self._per_example(params, buffers, mb, state.rng, trainable, multiplier, context)
            else:
                loss, g, aux = loss_and_grads(self.loss_fn, params, buffers, mb, state.rng, trainable,
                                              multiplier, context)
                aux = dict(aux)
            buffers = aux.pop("buffers", buffers)
            losses.append(loss)
            grads = g if grads is None else dict(zip(g, fe.add(list(grads.values()), list(g.values()))))
        loss = losses[0] if k == 1 else torch.stack(losses).mean()
        return loss, grads, buffers, aux

    def _per_example(self, params, buffers, batch, rng, trainable, multiplier, context):
        losses, grads, aux = per_example_loss_and_grads(self.loss_fn, params, buffers, batch, rng,
                                                        trainable, multiplier, context)
        names = list(grads)
        per_norm = torch.linalg.vector_norm(
            torch.stack([grads[n].flatten(1).norm(dim=1) for n in names], dim=1), dim=1
        )
        if self.rule.max_grad_norm is not None:
            # Per-example clipping (as in DP-SGD): every example's gradient to norm <= max_grad_norm.
            coef = torch.clamp(self.rule.max_grad_norm / (per_norm + 1e-6), max=1.0)
            grads = {n: grads[n] * coef.view(-1, *([1] * (grads[n].ndim - 1))) for n in names}
        mean_grads = {n: grads[n].mean(dim=0) for n in names}
        return losses.mean(), mean_grads, {**aux, "per_example_loss": losses, "per_example_grad_norm": per_norm}


def make_train_step(
    loss_fn: Callable,
    optimizer: GradientTransformation,
    *,
    max_grad_norm: float | None = None,
    precision: str = "fp32",
    accumulation: int = 1,
    per_example: bool = False,
    loss_scale: DynamicLossScale = DynamicLossScale(),
    donate_state: bool = False,
    process_group=None,
    shard_optimizer_state: bool = False,
    bucket_elements: int = sharding.BUCKET_ELEMENTS,
) -> TrainStep:
    """A pure ``train_step(state, batch) -> (state, metrics)``.

    Args:
        loss_fn: ``(params, buffers, batch, rng) -> loss`` or ``(loss, aux)``; ``aux["buffers"]``,
            if present, become the new buffers, other ``aux`` entries are returned as metrics.
        optimizer: an :mod:`fbrain.optim` transformation (the one the state was created with).
        max_grad_norm: clip all gradients together to this global norm; None or <= 0 disables.
        precision: "fp32", "bf16" or "fp16" (autocast; fp16 adds dynamic loss scaling).
        accumulation: micro-batches per step; every tensor in the batch then has a leading
            axis of that size (see :func:`stack_micro_batches`).
        per_example: compute per-example losses and gradients with vmap; ``max_grad_norm``
            then clips each example's gradient before averaging.
        loss_scale: the loss-scale rule used under fp16 (GradScaler's defaults).
        donate_state: let the step write the new parameters and optimizer state into the input
            state's tensors (like JAX's buffer donation) when a fused in-place kernel can do the
            whole update; the input state must not be used after the call. Saves a copy of the
            parameters and moments per step. Off by default: the step is then pure.
        process_group: a ``torch.distributed`` group: gradients and loss are averaged over its
            ranks inside the step (one flat all-reduce per step; see :mod:`fbrain.distributed`).
        shard_optimizer_state: with ``process_group``, each rank keeps and updates 1/N of the
            optimizer state (ZeRO; :mod:`fbrain.sharding`): give the step a state made by
            ``fbrain.sharding.shard_state``.
        bucket_elements: with ``shard_optimizer_state``, the most elements per rank one collective
            carries (consecutive parameters travel together up to it; a larger one alone): memory
            for the collectives' buffers against the number of calls. Default 4 Mi (16 MB float32).

    Metrics: ``loss``, ``grad_norm`` (before clipping), ``skipped``, ``loss_scale`` (fp16),
    per-example entries with ``per_example``, and the loss function's aux entries; all tensors.

    The state it is given must be one ``optimizer`` made: before anything runs, each call checks that
    ``state.opt_state`` is laid out as ``optimizer.init(state.params)`` would lay it out (the same
    optimizer; every per-parameter tensor with its parameter's shape and dtype) and raises a
    ``ValueError`` naming the path otherwise (a layout seen before costs one walk over the state's
    structure). Not for ``shard_optimizer_state`` steps, whose state holds slices.

    Frozen parameters: the step trains every parameter its optimizer does not freeze, whatever
    ``requires_grad`` the module's parameter has. The state holds no such flag (``TrainState.create``
    copies the parameters as detached tensors, and ``loss_fn`` is opaque), so the step cannot know
    it; ``TrainState.create`` warns when it sees one. Freeze through the optimizer (the Brain, which
    has the modules, does this for ``requires_grad=False`` parameters)::

        names = {n for n, p in model.named_parameters() if not p.requires_grad}
        opt = optim.partition({"train": optim.adam(1e-3), "frozen": optim.frozen()},
                              lambda n: "frozen" if n in names else "train")

    Frozen parameters get no gradient computed and no optimizer state.
    """
    for name, value in (("per_example", per_example), ("donate_state", donate_state),
                        ("shard_optimizer_state", shard_optimizer_state)):
        if not isinstance(value, bool):  # a string such as "false" must not switch it on
            raise TypeError(f"make_train_step: {name}: expected True or False, got {value!r}")
    if not isinstance(loss_scale, DynamicLossScale):
        raise TypeError(f"make_train_step: loss_scale: expected an fbrain.DynamicLossScale, got "
                        f"{type(loss_scale).__name__}")
    rule = UpdateRule(optimizer, max_grad_norm=max_grad_norm, precision=precision, loss_scale=loss_scale,
                      donate=donate_state)
    return TrainStep(loss_fn, rule, accumulation=accumulation, per_example=per_example, process_group=process_group,
                     shard_optimizer_state=shard_optimizer_state, bucket_elements=bucket_elements)


class EvalStep(_RandomnessFromState):
    """The pure evaluation step built by :func:`make_eval_step`: ``metrics = step(state, batch)``."""

    kind = "eval"

    def __init__(self, eval_fn: Callable, precision: str):
        if not callable(eval_fn):
            raise TypeError(f"eval_fn: expected a function (params, buffers, batch, rng) -> loss, got {eval_fn!r}")
        autocast_dtype(precision)
        self.eval_fn = eval_fn
        self.precision = precision

    def _check(self, state, batch) -> None:
        check_state(state)

    @staticmethod
    def _with_key(result, key):
        # Evaluation returns no state; the advanced key comes back as metrics["rng"], so a caller
        # evaluating many batches continues one random stream: state.replace(rng=metrics["rng"]).
        return {**result, "rng": key}

    def pure(self, state: TrainState, batch: Any) -> dict:
        with torch.no_grad(), autocast(self.precision, device_of(state.params)), compiled_dropout.when_compiling():
            loss, aux = split_loss(self.eval_fn(state.params, state.buffers, batch, state.rng))
        aux = {k: v for k, v in aux.items() if k != "buffers"}
        return {**aux, "loss": loss}


def make_eval_step(eval_fn: Callable, *, precision: str = "fp32") -> EvalStep:
    """A pure ``eval_step(state, batch) -> metrics``: the loss function without gradients."""
    return EvalStep(eval_fn, precision)
