"""The one place gradients become the next state: :func:`apply_gradients`.

Every way of training ends here: the pure train step, the optimizer and scaler views an imperative
``fit_batch`` uses (``optimizer.step()``, ``scaler.step(optimizer)``), the Brain's
``optimizers_step``, and accumulation (which sums micro-batch gradients first). Same gradients in,
same state out, bit for bit, whichever path. The stages, in order:

1. **unscale** (fp16): gradients of ``loss * scale`` times ``1 / scale``, as GradScaler computes it;
2. **check**: the step is skipped if the global gradient norm, the loss, or a flag found earlier is
   not finite (a global norm that overflows skips the step too, although every gradient is finite);
3. **clip** all gradients together by global norm, with ``clip_grad_norm_``'s arithmetic;
4. **apply** the optimizer (:func:`fbrain.optim.apply`: its fused kernel where it serves), keeping
   parameters, buffers and optimizer state as they were where the step is skipped;
5. **count** (``step``, ``optimizer_step``, non-finite counts) and **grow or back off** the loss scale.

Every decision is a ``torch.where`` on the device: nothing is read on the host.

Example::

    >>> import torch, fbrain
    >>> from fbrain import optim
    >>> from fbrain.update import UpdateRule, apply_gradients
    >>> state = fbrain.TrainState.create(torch.nn.Linear(2, 1), optim.sgd(lr=0.1))
    >>> rule = UpdateRule(optim.sgd(lr=0.1), max_grad_norm=1.0)
    >>> grads = {"weight": torch.tensor([[float("inf"), 0.0]]), "bias": torch.zeros(1)}
    >>> new, metrics = apply_gradients(state, grads, rule)
    >>> bool(metrics["skipped"]), int(new.counters.nonfinite_count), torch.equal(new.params["weight"], state.params["weight"])
    (True, 1, True)
"""

from __future__ import annotations

import dataclasses

import torch

from fbrain.loss_scale import DynamicLossScale, LossScaleState
from fbrain.optim import _foreach as fe
from fbrain.optim.base import GradientTransformation, apply
from fbrain.optim.clipping import clip_grads_by_global_norm, global_norm
from fbrain.precision import autocast_dtype
from fbrain.state import Counters, TrainState
from fbrain.tree import device_of, select

Grads = dict[str, torch.Tensor]


_LARGEST_FLOAT32 = float(torch.finfo(torch.float32).max)


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """How gradients become the next state; fixed when a step is built.

    ``max_grad_norm`` None or <= 0 disables clipping (SpeechBrain clips even then). ``precision``
    "fp16" unscales gradients and keeps the dynamic loss scale with ``loss_scale``'s rules.
    ``donate`` lets the update write into the input state's tensors and into the gradients it is
    given (a step's own), as torch's optimizers and ``clip_grad_norm_`` do: no copies of them.
    """

    optimizer: GradientTransformation
    max_grad_norm: float | None = None
    precision: str = "fp32"
    loss_scale: DynamicLossScale = DynamicLossScale()
    donate: bool = False

    def __post_init__(self):
        if not isinstance(self.optimizer, GradientTransformation):
            raise TypeError(
                f"optimizer: expected an fbrain.optim.GradientTransformation, got {type(self.optimizer).__name__}; "
                "wrap a torch.optim constructor with fbrain.optim.from_torch(...)"
            )
        autocast_dtype(self.precision)  # validates the string
        norm = self.max_grad_norm
        if norm is not None and (not isinstance(norm, (int, float)) or isinstance(norm, bool)):
            raise TypeError(f"max_grad_norm: expected a number or None, got {type(norm).__name__}")
        if norm is not None and (norm != norm or abs(norm) > _LARGEST_FLOAT32):
            # NaN is neither a norm nor "disabled" (None or <= 0); a norm past float32's range
            # (inf included) is no clipping: say None.
            raise ValueError(f"max_grad_norm: expected a finite float32 number (None or <= 0 disables clipping), "
                             f"got {norm}")
        object.__setattr__(self, "max_grad_norm", float(norm) if norm is not None and norm > 0 else None)

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"

    def replace(self, **changes) -> "UpdateRule":
        return dataclasses.replace(self, **changes)


def unscale(grads: Grads, scaler: LossScaleState) -> Grads:
    """``grads / scale``, multiplied by the float32 reciprocal GradScaler uses."""
    if not grads:
        return grads
    inv_scale = scaler.scale.double().reciprocal().float()
    return dict(zip(grads, fe.mul(list(grads.values()), inv_scale)))


def is_finite(x: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite`` of a scalar in two kernels: ``x - x`` is 0 for every finite ``x`` and NaN
    otherwise (``torch.isfinite`` is a composite of several, which for one number costs more than
    the arithmetic; a step's fixed cost matters for small models)."""
    return (x - x) == 0


def owned(grads: Grads) -> Grads:
    """``grads`` with every tensor in memory of its own, so an update may write into each: autograd
    hands one tensor to both sides of ``a + b`` (or views of one, ``a.view(-1) + b``), and an
    expanded one (stride 0) to ``a.sum()``; those become copies (found by where their data starts:
    one comparison per tensor). Written into twice, a shared gradient would be clipped twice and
    hold two parameters' Adam denominators."""
    seen: set = set()
    out = {}
    for name, g in grads.items():
        start = g.data_ptr()
        if start in seen or (not g.is_contiguous() and 0 in g.stride()):
            g = g.clone(memory_format=torch.contiguous_format)
        seen.add(start)
        out[name] = g
    return out


def count(counters: Counters, applied: torch.Tensor, nonfinite: torch.Tensor) -> Counters:
    """The counters after one step: ``applied`` (bool) or skipped; ``nonfinite`` counts as such.

    A bool adds to an int64 count as 0 or 1, and a finite step multiplies the streak by 0: five
    small kernels, no conversions (a step's fixed cost matters for small models)."""
    c = counters
    # Built whole, not with NamedTuple._replace, which torch.compile (2.11) fails to trace.
    return Counters(
        step=c.step + 1,
        optimizer_step=c.optimizer_step + applied,
        epoch=c.epoch,
        nonfinite_count=c.nonfinite_count + nonfinite,
        nonfinite_streak=(c.nonfinite_streak + 1) * nonfinite,
    )


def apply_gradients(
    state: TrainState,
    grads: Grads,
    rule: UpdateRule,
    *,
    loss: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
    scaled: bool = True,
    update_loss_scale: bool = True,
    grad_norm: torch.Tensor | None = None,
) -> tuple[TrainState, dict]:
    """The state after one step with ``grads`` (name -> gradient, the trainable parameters).

    Args:
        loss: the step's loss, or any 0-dim tensor that is finite exactly when it is (the imperative
            path sums ``x - x`` over the losses it saw: 0, or NaN); None when it is not known (an
            imperative ``loss.backward()``): the gradients decide alone.
        found_inf: a non-finite flag found earlier (``scaler.unscale_`` before a recipe's own
            clipping: an overflowing norm is clipped to zeros, which look finite afterwards).
        buffers: buffers the forward pass produced (BatchNorm statistics); kept only if applied.
        scaled: under fp16, whether ``grads`` still carry the loss scale (``scaler.unscale_``
            already divided them on the imperative path).
        update_loss_scale: under fp16, grow or back off the loss scale here (the imperative path
            does it in ``scaler.update()``, with :func:`next_loss_scale`).
        grad_norm: the global norm of the (unscaled) gradients, when ``grads`` are one rank's shard
            of them (:mod:`fbrain.sharding` computes it across the ranks); else computed here.

    Returns ``(new_state, metrics)``; metrics: ``grad_norm`` (before clipping), ``skipped`` and,
    under fp16, ``loss_scale`` (the scale the gradients were computed with).
    """
    if rule.fp16 and scaled:
        grads = unscale(grads, state.scaler)
    if grad_norm is None:
        grad_norm = global_norm(list(grads.values())) if grads else torch.zeros((), device=device_of(state.params))
    # x - x is 0 for a finite x and NaN otherwise, and a NaN survives the sum: one comparison checks both.
    finite = is_finite(grad_norm) if loss is None else (grad_norm - grad_norm) + (loss - loss) == 0
    if found_inf is not None:
        finite = finite & ~found_inf
    skipped = ~finite
    if rule.donate and not torch.compiler.is_compiling():  # a traced tensor has no address to compare
        grads = owned(grads)
    if rule.max_grad_norm is not None and grads:
        grads, _ = clip_grads_by_global_norm(grads, rule.max_grad_norm, grad_norm, in_place=rule.donate)
    params, opt_state = apply(rule.optimizer, grads, state.opt_state, state.params, skipped, rule.donate)
    # Under fp16, gradients that overflow while the loss is finite are the loss scale doing its job
    # (GradScaler skips them silently and backs off): skipped, but not a non-finite step, so
    # nonfinite_patience never ends a healthy fp16 run.
    if not rule.fp16:
        nonfinite = skipped
    else:
        nonfinite = skipped & ~is_finite(loss) if loss is not None else torch.zeros_like(skipped)
    new_state = state.replace(
        params=params,
        buffers=state.buffers if buffers is None else select(finite, buffers, state.buffers),
        opt_state=opt_state,
        scaler=next_loss_scale(rule, state.scaler, skipped) if update_loss_scale else state.scaler,
        counters=count(state.counters, finite, nonfinite),
    )
    metrics = {"grad_norm": grad_norm, "skipped": skipped}
    if rule.fp16:
        metrics["loss_scale"] = state.scaler.scale
    return new_state, metrics


def next_loss_scale(rule: UpdateRule, scaler: LossScaleState, skipped: torch.Tensor) -> LossScaleState:
    """The loss scale after a step (unchanged unless fp16): backs off if ``skipped``, else grows
    on schedule."""
    return rule.loss_scale.update(scaler, skipped) if rule.fp16 else scaler
