"""Pure training and evaluation steps.

``make_train_step`` turns a loss function and an optimizer into
``train_step(state, batch) -> (state, metrics)``. One call computes the loss
and gradients (summing ``accumulation`` micro-batches), unscales them under
fp16, clips them by global norm, and applies the optimizer, unless the loss or
a gradient is not finite: then parameters, buffers and optimizer state stay as
they were and the counters record the skip. Every decision is a
``torch.where`` on the device; a step never reads a tensor value on the host.

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
import itertools
import types
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from fbrain import compiled_dropout
from fbrain import rng as _rng
from fbrain.distributed import mean_across_ranks
from fbrain.gradients import loss_and_grads, per_example_loss_and_grads, split_loss
from fbrain.loss_scale import DynamicLossScale
from fbrain.optim import _foreach as fe
from fbrain.optim.base import GradientTransformation, apply_updates, frozen_names
from fbrain.optim.clipping import clip_grads_by_global_norm, global_norm
from fbrain.precision import autocast, autocast_dtype
from fbrain.state import Counters, TrainState
from fbrain.tree import select, tree_leaves, tree_map


def _device_of(state: TrainState) -> torch.device:
    for p in state.params.values():
        return p.device
    return torch.device("cpu")


def _cuda_devices(state: TrainState) -> tuple[torch.device, ...]:
    device = _device_of(state)
    return (device,) if device.type == "cuda" else ()


def check_state(state: Any) -> None:
    """Raise a precise error if ``state`` is not a usable TrainState (host-side metadata only)."""
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected an fbrain.TrainState, got {type(state).__name__}")
    for name, p in state.params.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            what = f"dtype {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise TypeError(f"params[{name!r}]: expected a floating-point tensor, got {what}")


def both_finite(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``isfinite(a) & isfinite(b)`` for two scalars, in about half the time on the CPU.

    ``x - x`` is exactly 0 for every finite ``x`` and NaN for inf and NaN, and a NaN survives the
    sum; ``torch.isfinite`` is a composite of several kernels, which for one number costs more
    than the arithmetic (a step's fixed cost matters for small models).
    """
    return (a - a) + (b - b) == 0


class MicroBatches:
    """``k`` micro-batches kept apart, for ``accumulation=k`` when they cannot be stacked
    (padded batches of different lengths). A pytree node, so steps see the tensors inside.

    Example::

        step = fbrain.make_train_step(loss_fn, opt, accumulation=2)
        state, metrics = step(state, fbrain.MicroBatches([batch_a, batch_b]))
    """

    def __init__(self, batches):
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("MicroBatches: expected at least one batch")

    def __len__(self) -> int:
        return len(self.batches)

    def __repr__(self) -> str:
        return f"MicroBatches({len(self.batches)} batches)"


pytree.register_pytree_node(MicroBatches, lambda m: (m.batches, None), lambda children, _: MicroBatches(children),
                            serialized_type_name="fbrain.MicroBatches")


def micro_batches(batch: Any, count: int) -> list[Any]:
    """The ``count`` micro-batches of ``batch``: a :class:`MicroBatches`, or tensors stacked along
    a leading axis of size ``count`` (split here)."""
    if isinstance(batch, MicroBatches):
        if len(batch) != count:
            raise ValueError(f"batch: accumulation={count} expects {count} micro-batches, got {len(batch)}")
        return batch.batches
    if count == 1:
        return [batch]
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and (leaf.ndim == 0 or leaf.shape[0] != count):
            raise ValueError(
                f"batch: accumulation={count} expects every tensor to have a leading micro-batch "
                f"axis of size {count}, got a tensor of shape {tuple(leaf.shape)} "
                "(build one with fbrain.stack_micro_batches, or pass fbrain.MicroBatches([...]))"
            )
    return [tree_map(lambda x, i=i: x[i] if isinstance(x, torch.Tensor) else x, batch) for i in range(count)]


def stack_micro_batches(batches: list[Any]) -> Any:
    """Stack ``k`` batches of one structure into the batch ``accumulation=k`` expects."""
    if not batches:
        raise ValueError("stack_micro_batches: expected at least one batch")
    return tree_map(
        lambda *xs: torch.stack(xs) if isinstance(xs[0], torch.Tensor) else xs[0], *batches
    )


def structure(batch: Any) -> Any:
    """What must stay the same from one batch to the next: where the tensors are.

    Sizes do not count, nor do plain values (a shorter last batch has fewer ids): a sequence
    holding no tensor is one opaque value.
    """
    if isinstance(batch, torch.Tensor):
        return "tensor"
    node = pytree._get_node_type(batch)
    if node not in pytree.SUPPORTED_NODES:
        return None
    children, _ = pytree.SUPPORTED_NODES[node].flatten_fn(batch)
    inner = tuple(structure(c) for c in children)
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields") and all(s is None for s in inner):
        return None
    keys = tuple(batch) if isinstance(batch, dict) else None
    return (node.__qualname__, keys, inner)


def _train_pure(step: "TrainStep", state: TrainState, batch: Any):
    return step.pure(state, batch, use_func=True)


def _eval_pure(step: "EvalStep", state: TrainState, batch: Any):
    return step.pure(state, batch)


_copies = itertools.count()


def compile_pure(kind: str, **compile_kwargs) -> Callable:
    """``torch.compile`` of a fresh copy of the function that runs a ``kind`` ("train" or "eval")
    step's ``pure``; call it as ``compiled(step, state, batch)``.

    torch.compile keeps compiled graphs, its recompile budget and the shapes it has seen per code
    object, so each copy has its own: unrelated steps never share them. One compiled function can
    serve successive steps of the same kind (the Brain builds new steps at every fit; making a
    wrapper copies torch's whole compiler configuration, milliseconds): guards on the step's
    settings pick or make the right graph.
    """
    template = {"train": _train_pure, "eval": _eval_pure}[kind]
    code = template.__code__.replace(co_name=f"{template.__name__}_{next(_copies)}")
    fresh = types.FunctionType(code, template.__globals__, code.co_name)
    return torch.compile(fresh, **compile_kwargs)


class TrainStep:
    """The pure train step built by :func:`make_train_step`; call it as ``step(state, batch)``."""

    def __init__(
        self,
        loss_fn: Callable,
        optimizer: GradientTransformation,
        max_grad_norm: float | None,
        precision: str,
        accumulation: int,
        per_example: bool,
        loss_scale: DynamicLossScale,
        donate_state: bool = False,
        process_group=None,
    ):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a function (params, buffers, batch, rng) -> loss, got {loss_fn!r}")
        if not isinstance(optimizer, GradientTransformation):
            raise TypeError(
                f"optimizer: expected an fbrain.optim.GradientTransformation, got {type(optimizer).__name__}; "
                "wrap a torch.optim constructor with fbrain.optim.from_torch(...)"
            )
        autocast_dtype(precision)  # validates the string
        if not (isinstance(accumulation, int) and accumulation >= 1):
            raise ValueError(f"accumulation: expected an int >= 1, got {accumulation!r}")
        if max_grad_norm is not None and not isinstance(max_grad_norm, (int, float)):
            raise TypeError(f"max_grad_norm: expected a number or None, got {type(max_grad_norm).__name__}")
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        # SpeechBrain clips whenever max_grad_norm is set, even to 0 or below; here that disables clipping.
        self.max_grad_norm = max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else None
        self.precision = precision
        self.accumulation = accumulation
        self.per_example = per_example
        self.loss_scale = loss_scale
        self.donate_state = bool(donate_state)
        self.process_group = process_group
        self._batch_spec = None

    # -- the public, checked entry points ---------------------------------------------------------

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        if torch.compiler.is_compiling():
            # Inside torch.compile the global generators cannot be swapped; the key passes through
            # and random ops draw from the caller's generator. `TrainStep.compile` keeps the
            # state-driven randomness by swapping them outside the compiled graph.
            return self.pure(state, batch, use_func=True)
        self._check(state, batch)
        with _rng.scope(state.rng, _cuda_devices(state)) as out:
            new_state, metrics = self.pure(state, batch, use_func=False)
        return new_state.replace(rng=out.key), metrics

    def compile(self, **compile_kwargs) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
        """``torch.compile`` the step, keeping randomness a function of ``state.rng``.

        Keyword arguments go to ``torch.compile`` (e.g. ``fullgraph=True, mode="max-autotune"``).
        """
        return functools.partial(self.run_compiled, compile_pure("train", **compile_kwargs))

    def run_compiled(self, compiled: Callable, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """One step through ``compiled`` (from :func:`compile_pure`), randomness from ``state.rng``."""
        self._check(state, batch)
        with _rng.scope(state.rng, _cuda_devices(state)) as out:
            new_state, metrics = compiled(self, state, batch)
        return new_state.replace(rng=out.key), metrics

    def _check(self, state, batch) -> None:
        check_state(state)
        spec = structure(batch)
        if self._batch_spec is None:
            self._batch_spec = spec
        elif spec != self._batch_spec:
            raise TypeError(
                f"batch: its layout of tensors differs from the first batch this step saw.\n"
                f"  expected: {self._batch_spec}\n  got:      {spec}"
            )

    # -- the pure computation ----------------------------------------------------------------------

    def pure(self, state: TrainState, batch: Any, use_func: bool = True) -> tuple[TrainState, dict]:
        """One step without argument checks or RNG handling (what compile and vmap trace)."""
        # Under torch.compile, however it was entered, dropout takes the path inductor compiles
        # correctly (see fbrain.compiled_dropout).
        with compiled_dropout.when_compiling():
            return self._pure(state, batch, use_func)

    def _pure(self, state: TrainState, batch: Any, use_func: bool) -> tuple[TrainState, dict]:
        params, opt = state.params, self.optimizer
        frozen = frozen_names(opt, params)
        trainable = [n for n in params if n not in frozen]
        fp16 = self.precision == "fp16"
        k = self.accumulation
        # SpeechBrain's accumulation: each micro-batch contributes loss / k.
        multiplier = state.scaler.scale / k if fp16 else (None if k == 1 else 1.0 / k)
        context = functools.partial(autocast, self.precision, _device_of(state))

        buffers, grads, losses, aux = state.buffers, None, [], {}
        for mb in micro_batches(batch, k):
            loss, g, aux, extra = self._micro_step(params, buffers, mb, state.rng, trainable, multiplier,
                                                   use_func, context)
            buffers = aux.pop("buffers", buffers)
            losses.append(loss)
            grads = g if grads is None else dict(zip(g, fe.add(list(grads.values()), list(g.values()))))
        loss = losses[0] if k == 1 else torch.stack(losses).mean()
        if self.process_group is not None:
            # One collective per step, after the local micro-batches: all ranks then agree bit for bit.
            grads, loss = mean_across_ranks(grads, loss, self.process_group)

        names = list(grads)
        if fp16:
            inv_scale = state.scaler.scale.double().reciprocal().float()
            grads = dict(zip(names, fe.mul(list(grads.values()), inv_scale)))
        grad_norm = global_norm(list(grads.values())) if grads else torch.zeros((), device=loss.device)
        finite = both_finite(grad_norm, loss)
        if self.max_grad_norm is not None and not self.per_example and grads:
            grads, _ = clip_grads_by_global_norm(grads, self.max_grad_norm, grad_norm)

        skipped = ~finite
        # With fp16, scaled gradients that overflow while the loss is finite are the loss scale doing
        # its job (torch's GradScaler skips them silently and backs off): such a step is skipped but
        # not counted as non-finite, so nonfinite_patience never ends a healthy fp16 run.
        nonfinite = skipped & ~torch.isfinite(loss) if fp16 else skipped
        new_params, opt_state = self._apply(grads, state.opt_state, params, finite, skipped)
        c = state.counters
        new_state = state.replace(
            params=new_params,
            buffers=select(finite, buffers, state.buffers),
            opt_state=opt_state,
            scaler=self.loss_scale.update(state.scaler, skipped) if fp16 else state.scaler,
            counters=Counters(
                step=c.step + 1,
                optimizer_step=c.optimizer_step + finite.long(),
                epoch=c.epoch,
                nonfinite_count=c.nonfinite_count + nonfinite.long(),
                nonfinite_streak=torch.where(nonfinite, c.nonfinite_streak + 1, torch.zeros_like(c.nonfinite_streak)),
            ),
        )
        metrics = {**aux, **extra, "loss": loss, "grad_norm": grad_norm, "skipped": skipped}
        if fp16:
            metrics["loss_scale"] = state.scaler.scale
        return new_state, metrics

    def _apply(self, grads, opt_state, params, finite, skipped):
        """New params and optimizer state: the update, or everything unchanged if not finite."""
        opt = self.optimizer
        if opt.fused_apply is not None and not torch.compiler.is_compiling() and not fe.any_batched(
                list(grads.values())):
            fused = opt.fused_apply(grads, opt_state, params, skipped, in_place=self.donate_state)
            if fused is not None:
                return fused
        updates, new_opt_state = opt.update(grads, opt_state, params)
        new_params = apply_updates(params, updates)
        changed = list(updates)
        kept = select(finite, {n: new_params[n] for n in changed}, {n: params[n] for n in changed})
        return {**params, **kept}, select(finite, new_opt_state, opt_state)

    def _micro_step(self, params, buffers, batch, rng, trainable, multiplier, use_func, context):
        if not self.per_example:
            loss, grads, aux = loss_and_grads(self.loss_fn, params, buffers, batch, rng, trainable,
                                              multiplier, use_func, context)
            return loss, grads, dict(aux), {}
        losses, grads, aux = per_example_loss_and_grads(self.loss_fn, params, buffers, batch, rng,
                                                        trainable, multiplier, context)
        names = list(grads)
        per_norm = torch.linalg.vector_norm(
            torch.stack([grads[n].flatten(1).norm(dim=1) for n in names], dim=1), dim=1
        )
        if self.max_grad_norm is not None:
            # Per-example clipping (as in DP-SGD): every example's gradient to norm <= max_grad_norm.
            coef = torch.clamp(self.max_grad_norm / (per_norm + 1e-6), max=1.0)
            grads = {n: grads[n] * coef.view(-1, *([1] * (grads[n].ndim - 1))) for n in names}
        mean_grads = {n: grads[n].mean(dim=0) for n in names}
        extra = {"per_example_loss": losses, "per_example_grad_norm": per_norm}
        return losses.mean(), mean_grads, dict(aux), extra


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

    Metrics: ``loss``, ``grad_norm`` (before clipping), ``skipped``, ``loss_scale`` (fp16),
    per-example entries with ``per_example``, and the loss function's aux entries; all tensors.
    """
    return TrainStep(loss_fn, optimizer, max_grad_norm, precision, accumulation, per_example, loss_scale,
                     donate_state, process_group)


class EvalStep:
    """The pure evaluation step built by :func:`make_eval_step`: ``metrics = step(state, batch)``."""

    def __init__(self, eval_fn: Callable, precision: str):
        if not callable(eval_fn):
            raise TypeError(f"eval_fn: expected a function (params, buffers, batch, rng) -> loss, got {eval_fn!r}")
        autocast_dtype(precision)
        self.eval_fn = eval_fn
        self.precision = precision

    def pure(self, state: TrainState, batch: Any) -> dict:
        with torch.no_grad(), autocast(self.precision, _device_of(state)), compiled_dropout.when_compiling():
            loss, aux = split_loss(self.eval_fn(state.params, state.buffers, batch, state.rng))
        aux = {k: v for k, v in aux.items() if k != "buffers"}
        return {**aux, "loss": loss}

    def __call__(self, state: TrainState, batch: Any) -> dict:
        if torch.compiler.is_compiling():
            return self.pure(state, batch)
        check_state(state)
        with _rng.scope(state.rng, _cuda_devices(state)):
            return self.pure(state, batch)

    def compile(self, **compile_kwargs) -> Callable[[TrainState, Any], dict]:
        """``torch.compile`` the step, keeping randomness a function of ``state.rng`` (as
        :meth:`TrainStep.compile`)."""
        return functools.partial(self.run_compiled, compile_pure("eval", **compile_kwargs))

    def run_compiled(self, compiled: Callable, state: TrainState, batch: Any) -> dict:
        """One evaluation through ``compiled`` (from :func:`compile_pure`)."""
        check_state(state)
        with _rng.scope(state.rng, _cuda_devices(state)):
            return compiled(self, state, batch)


def make_eval_step(eval_fn: Callable, *, precision: str = "fp32") -> EvalStep:
    """A pure ``eval_step(state, batch) -> metrics``: the loss function without gradients."""
    return EvalStep(eval_fn, precision)
