"""Adam and AdamW with torch.optim.Adam's semantics (bias correction, AMSGrad, maximize).

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> opt = optim.adamw(lr=1e-3, weight_decay=1e-2)
    >>> params = {"w": torch.ones(3)}
    >>> updates, state = opt.update({"w": torch.ones(3)}, opt.init(params), params)
    >>> int(state.count)
    1
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fbrain.optim import hyperparams as hp
from fbrain.optim import _foreach as fe
from fbrain.optim import _fused
from fbrain.optim._foreach import decayed_gradients, ordered
from fbrain.optim.base import GradientTransformation, unless_skipped
from fbrain.torch_compat import fused_kernel


class AdamState(NamedTuple):
    count: torch.Tensor
    mu: dict[str, torch.Tensor]
    nu: dict[str, torch.Tensor]
    nu_max: dict[str, torch.Tensor]
    hyperparams: dict  # name -> 0-dim tensor or hp.Static (see fbrain.optim.hyperparams)


def adam(
    lr: hp.Hyperparam = 1e-3,
    betas: tuple[hp.Hyperparam, hp.Hyperparam] = (0.9, 0.999),
    eps: hp.Hyperparam = 1e-8,
    weight_decay: hp.Hyperparam = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    fused: bool = True,
) -> GradientTransformation:
    """``torch.optim.Adam`` as a pure transformation (``decoupled_weight_decay`` makes it AdamW).

    ``fused=True`` runs ATen's fused CPU kernel where it serves (float32/64 CPU tensors, eager,
    unscheduled betas): fastest, and equal to ``torch.optim.Adam(fused=True)``. Everywhere else,
    and always with ``fused=False``, the update is torch.optim's default (single-tensor / foreach)
    arithmetic, bit for bit; the two round differently in the last bit. :func:`fbrain.optim.from_torch`
    picks what the torch optimizer it is given would have run.
    """
    owner = "adamw" if decoupled_weight_decay else "adam"
    schedules = hp.checked(owner, lr=lr, **hp.betas(owner, betas), eps=eps, weight_decay=weight_decay)
    has_decay = hp.given(schedules["weight_decay"])

    def init(params):
        zeros = lambda: {n: torch.zeros_like(p) for n, p in params.items()}  # noqa: E731
        return AdamState(
            count=torch.zeros((), dtype=torch.int64, device=hp.device_of(params)),
            mu=zeros(),
            nu=zeros(),
            nu_max=zeros() if amsgrad else {},
            hyperparams=hp.init(params, **schedules),
        )

    def moments(grads, state, params):
        """torch.optim's single-tensor Adam, op for op and rounding for rounding (its lerp,
        addcmul and addcdiv round a multiply-add once on the CPU; its bias corrections are
        float64 numbers rounded to the tensors' dtype): the change ``delta``, the factor
        ``shrink`` AdamW multiplies the parameters by first (None for Adam), and the new state."""
        h = hp.current(state.hyperparams, schedules, state.count)
        x = hp.operands(h, state.count.device)
        lr_, b1, b2 = x["lr"], x["beta1"], x["beta2"]
        count = state.count + 1
        names, g = ordered(grads)
        decay = x["weight_decay"] if has_decay else None
        g = decayed_gradients(g, names, params, None if decoupled_weight_decay else decay, maximize)

        c = lambda value: hp.scalar(value, g)  # noqa: E731
        mu = fe.lerp([state.mu[n] for n in names], g, c(1 - b1))
        nu = fe.addcmul(fe.mul([state.nu[n] for n in names], c(b2)), fe.mul(g, c(1 - b2)), g)
        second = nu
        nu_max = state.nu_max
        if amsgrad:
            second = fe.maximum([nu_max[n] for n in names], nu)
            nu_max = {**nu_max, **dict(zip(names, second))}

        steps = count.to(lr_.dtype)  # float64: b ** steps rounds as torch.optim's Python ``beta ** step``
        bias_correction1, bias_correction2_sqrt = hp.hoisted(1 - b1**steps, torch.sqrt(1 - b2**steps))
        denom = fe.sqrt(second)
        fe.div_(denom, c(bias_correction2_sqrt))
        fe.add_(denom, c(x["eps"]))
        delta = fe.div(fe.mul(mu, c(-(lr_ / bias_correction1))), denom)  # addcdiv: (value * mu) / denom
        # AdamW multiplies the parameters by (1 - lr * wd), rounded to their dtype, before the step.
        shrink = c(1 - lr_ * decay) if decoupled_weight_decay and decay is not None else None
        new_state = AdamState(
            count,
            {**state.mu, **dict(zip(names, mu))},
            {**state.nu, **dict(zip(names, nu))},
            nu_max,
            h,
        )
        return dict(zip(names, delta)), shrink, new_state

    def update(grads, state, params=None):
        delta, shrink, new_state = moments(grads, state, params)
        if shrink is None:
            return delta, new_state
        names = list(delta)
        # As a change to add (for chains): delta + (shrink - 1) * params. ``apply`` instead
        # multiplies the parameters first, as torch does; the two may differ in the last bit.
        changed = fe.addcmul([delta[n] for n in names], [params[n] for n in names], shrink - 1)
        return dict(zip(names, changed)), new_state

    def arithmetic(grads, state, params, skip):
        delta, shrink, new_state = moments(grads, state, params)
        names = list(delta)
        base = [params[n] for n in names]
        if shrink is not None:
            base = fe.mul(base, shrink)
        new_params = dict(zip(names, fe.add(base, [delta[n] for n in names])))
        return unless_skipped(skip, new_params, new_state, params, state, names)

    def fused_apply(grads, state, params, skip, in_place):
        """ATen's fused CPU Adam (see :mod:`fbrain.optim._fused`); None where it does not serve."""
        kernel = fused_kernel("_fused_adamw_" if decoupled_weight_decay else "_fused_adam_")
        names, g = ordered(grads)
        h = hp.current(state.hyperparams, schedules, state.count)
        f = _fused.host_numbers(g, h, ["beta1", "beta2", "eps"] + (["weight_decay"] if has_decay else []))
        if f is None or kernel is None:
            return None
        new_p, mu, nu = (_fused.working_copies(t, names, in_place) for t in (params, state.mu, state.nu))
        nu_max = _fused.working_copies(state.nu_max, names, in_place) if amsgrad else []
        count = state.count + 1
        kernel(new_p, list(g), mu, nu, nu_max, [count.to(g[0].dtype)] * len(g),
               lr=h["lr"], beta1=f["beta1"], beta2=f["beta2"],
               weight_decay=f.get("weight_decay", 0.0), eps=f["eps"],
               amsgrad=amsgrad, maximize=maximize, grad_scale=None, found_inf=skip.to(torch.float32))
        new_state = AdamState(
            torch.where(skip, state.count, count),
            {**state.mu, **dict(zip(names, mu))},
            {**state.nu, **dict(zip(names, nu))},
            {**state.nu_max, **dict(zip(names, nu_max))} if amsgrad else state.nu_max,
            h,
        )
        return {**params, **dict(zip(names, new_p))}, new_state

    def arithmetic_in_place(grads, state, params, skip):
        """torch.optim's single-tensor Adam run on the donated state's own tensors, rounding for
        rounding as `moments` (so, as torch), with no per-step copy of the parameters and moments
        and, for plain Adam on the CPU, no full-size temporary (there, each fresh one costs ten times
        the arithmetic it holds: the allocator hands back new pages for it). The gradients are
        donated too (each in memory of its own: `fbrain.update.owned`): they end up holding the
        denominators.

        A skipped step must leave every tensor as it was without a host read: its gradients are
        zeroed (non-finite entries made 0, then all multiplied by 0; a step taken has only finite
        gradients, which this leaves as they are) and its factors made 0 and 1, which makes every op
        an exact identity provided the denominator is never 0 (eps > 0); the sign of a zero may flip
        (-0.0 to 0.0). None where this does not serve (eps a schedule or 0, AMSGrad, vmap,
        compiling): the general arithmetic."""
        h = hp.current(state.hyperparams, schedules, state.count)
        x = hp.operands(h, state.count.device)
        names, g = ordered(grads)
        eps = x["eps"]
        if amsgrad or not isinstance(eps, float) or eps <= 0 or fe.any_batched(g) or torch.compiler.is_compiling():
            return None
        keep = (~skip).to(x["lr"].dtype)  # 1 for a step taken, 0 for a skipped one (float64)
        lr_, b1, b2 = x["lr"], x["beta1"], x["beta2"]
        decay = x["weight_decay"] if has_decay else None
        p, mu, nu = ([tree[n] for n in names] for tree in (params, state.mu, state.nu))
        count = state.count + 1
        steps = count.to(lr_.dtype)
        bias_correction1 = 1 - b1**steps
        adamw = decoupled_weight_decay and decay is not None
        # The step's factors in float64, as torch.optim's Python numbers, rounded to the tensors'
        # dtype together (one conversion, not seven); keep = 0 makes each one an identity.
        factors = hp.scalar(torch.stack([
            (1 - b1) * keep,  # mu's lerp weight
            b2 + (1 - b2) * (1 - keep),  # nu's decay (1 when skipped)
            (1 - b2) * keep,  # the new squared gradient's weight
            torch.sqrt(1 - b2**steps),  # the second bias correction's square root
            -(lr_ / bias_correction1) * keep,  # the step size
            1 - lr_ * decay * keep if adamw else keep,  # AdamW's shrink of the parameters
            keep,
        ]), g)
        w_mu, decay_nu, w_nu, bias_correction2_sqrt, step_size, shrink, keep_g = factors.unbind()
        # The step's own gradients (donated with the state), zeroed when skipped: non-finite entries
        # to 0, then a multiply by keep (a boolean-masked fill is 10x slower on the CPU).
        g = [t.nan_to_num_(0.0, 0.0, 0.0) for t in g]
        torch._foreach_mul_(g, keep_g)
        g = decayed_gradients(g, names, params, None if decoupled_weight_decay else decay, maximize)
        # Eager and unbatched (checked above): the foreach kernels directly.
        if adamw:
            torch._foreach_mul_(p, shrink)
        torch._foreach_lerp_(mu, g, w_mu)
        torch._foreach_mul_(nu, decay_nu)
        _scaled(torch._foreach_addcmul_, nu, g, g, w_nu)  # nu + (w_nu * g) * g, as addcmul_
        # The gradients are spent: the denominator is computed in their memory.
        torch._foreach_copy_(g, nu)
        denom = g
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        _scaled(torch._foreach_addcdiv_, p, mu, denom, step_size)  # p + (step_size * mu) / denom
        new_state = AdamState(torch.where(skip, state.count, count), state.mu, state.nu, state.nu_max, h)
        return params, new_state

    def apply(grads, state, params, skip, in_place=False):
        # One signature, three implementations: the fused kernel where it serves and is allowed,
        # else torch's single-tensor arithmetic, on the donated state's tensors when it may write
        # into them. Which one runs depends on the optimizer and the values of its inputs only.
        return ((fused and fused_apply(grads, state, params, skip, in_place))
                or (in_place and arithmetic_in_place(grads, state, params, skip))
                or arithmetic(grads, state, params, skip))

    return GradientTransformation(init, update, apply=apply)


def adamw(
    lr: hp.Hyperparam = 1e-3,
    betas: tuple[hp.Hyperparam, hp.Hyperparam] = (0.9, 0.999),
    eps: hp.Hyperparam = 1e-8,
    weight_decay: hp.Hyperparam = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    fused: bool = True,
) -> GradientTransformation:
    """``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2, as in torch)."""
    return adam(lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay=True, fused=fused)


def _scaled(kernel, a: list[torch.Tensor], b: list[torch.Tensor], c: list[torch.Tensor], factor: torch.Tensor,
            scalars_in_kernel: bool | None = None) -> None:
    """``kernel(a, factor * b, c)`` for ``torch._foreach_addcmul_`` / ``_foreach_addcdiv_``:
    ``a + (factor * b) * c`` or ``a + (factor * b) / c``, ``factor`` a 0-dim tensor.

    On the CPU the kernel multiplies by per-tensor scalars given as a CPU tensor, read in place (no
    host synchronisation there): no full-size temporary of ``factor * b`` per tensor, and the same
    rounding as torch.optim's ``addcmul_``/``addcdiv_`` with ``value=``. Elsewhere that tensor would
    have to come to the host, so the product is a temporary instead (cheap from a caching allocator).
    ``scalars_in_kernel`` forces one way (None: by ``factor``'s device); both give the same bits.
    """
    if scalars_in_kernel if scalars_in_kernel is not None else factor.device.type == "cpu":
        kernel(a, b, c, factor.expand(len(a)).contiguous())
    else:
        kernel(a, torch._foreach_mul(b, factor), c)
